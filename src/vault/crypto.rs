//! The vault's cryptography.
//!
//! One 256-bit master key per key version. From it HKDF-SHA256 derives:
//! - a key-encryption key (KEK) that wraps each card's own data key (DEK);
//! - an index key: HMAC-SHA256 of a card number is how a card is found, so
//!   numbers are never stored in clear, not even as an unkeyed hash;
//! - a CVV key: the CVV2 is an HMAC of number and expiry, never stored;
//! - a key check value that tells a wrong master key at start.
//!
//! Envelope encryption: every card gets a fresh random DEK; its funding and
//! virtual numbers are sealed under the DEK with AES-256-GCM, fresh nonces,
//! and the card id in the associated data; the DEK is sealed under the KEK
//! with the card id and key version in the associated data. A ciphertext
//! moved to another record, or opened with another key, fails to open.

use std::collections::BTreeMap;
use std::fmt;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use ring::rand::{SecureRandom, SystemRandom};
use ring::{hkdf, hmac};
use zeroize::Zeroizing;

use crate::domain::number::DigitSource;
use crate::domain::{Cvv, Expiry, Pan};

pub const KEY_LEN: usize = 32;
const NONCE_LEN: usize = 12;

/// A master key's raw bytes, wiped on drop.
pub type MasterKey = Zeroizing<[u8; KEY_LEN]>;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CryptoError {
    #[error("a sealed value failed to open (wrong key, or tampered with)")]
    Open,
    #[error("no key of version {0} is loaded")]
    UnknownVersion(u32),
    #[error("the system random number generator failed")]
    Random,
}

/// The keys derived from one master key.
pub struct DataKeys {
    kek: Aes256Gcm,
    index: hmac::Key,
    cvv: hmac::Key,
    check_value: String,
}

impl fmt::Debug for DataKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DataKeys(kcv {})", self.check_value)
    }
}

fn derive(prk: &hkdf::Prk, label: &[u8]) -> Zeroizing<[u8; KEY_LEN]> {
    let mut out = Zeroizing::new([0u8; KEY_LEN]);
    // HKDF-SHA256 can expand 32 bytes under any label: these cannot fail.
    let info = [label];
    if let Ok(okm) = prk.expand(&info, hkdf::HKDF_SHA256) {
        let _ = okm.fill(&mut out[..]);
    }
    out
}

impl DataKeys {
    pub fn derive(master: &MasterKey) -> DataKeys {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, b"vcn master key").extract(&master[..]);
        let kek = derive(&prk, b"vcn/v1/kek");
        let index = derive(&prk, b"vcn/v1/index");
        let cvv = derive(&prk, b"vcn/v1/cvv");
        let kcv = derive(&prk, b"vcn/v1/key-check-value");
        DataKeys {
            kek: Aes256Gcm::new((&*kek).into()),
            index: hmac::Key::new(hmac::HMAC_SHA256, &index[..]),
            cvv: hmac::Key::new(hmac::HMAC_SHA256, &cvv[..]),
            check_value: hex::encode(&kcv[..8]),
        }
    }

    /// A short public fingerprint of the master key (16 hex digits): it
    /// tells keys apart without revealing them.
    pub fn check_value(&self) -> &str {
        &self.check_value
    }
}

/// Every loaded key version; new records use `current`.
pub struct Keyring {
    current: u32,
    versions: BTreeMap<u32, DataKeys>,
    rng: SystemRandom,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyring")
            .field("current", &self.current)
            .field("versions", &self.versions.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// A card's secrets as stored: the wrapped DEK and the two sealed numbers.
#[derive(Clone, PartialEq, Eq)]
pub struct Sealed {
    pub key_version: u32,
    pub wrapped_dek: Vec<u8>,
    pub funding_pan: Vec<u8>,
    pub token_pan: Vec<u8>,
}

impl Keyring {
    pub fn new(versions: BTreeMap<u32, DataKeys>) -> Option<Keyring> {
        let current = *versions.keys().next_back()?;
        Some(Keyring {
            current,
            versions,
            rng: SystemRandom::new(),
        })
    }

    /// A keyring of every given master key version.
    pub fn from_masters(masters: &BTreeMap<u32, MasterKey>) -> Option<Keyring> {
        Keyring::new(
            masters
                .iter()
                .map(|(v, k)| (*v, DataKeys::derive(k)))
                .collect(),
        )
    }

    /// The loaded versions, oldest first.
    pub fn versions(&self) -> impl Iterator<Item = u32> + '_ {
        self.versions.keys().copied()
    }

    /// The check value of a loaded version.
    pub fn check_value(&self, v: u32) -> Option<&str> {
        self.versions.get(&v).map(DataKeys::check_value)
    }

    /// A keyring of one version, for tests and single-key installations.
    pub fn single(master: &MasterKey) -> Keyring {
        let mut versions = BTreeMap::new();
        versions.insert(1, DataKeys::derive(master));
        Keyring {
            current: 1,
            versions,
            rng: SystemRandom::new(),
        }
    }

    pub fn current_version(&self) -> u32 {
        self.current
    }

    pub fn current(&self) -> &DataKeys {
        // `new` and `single` guarantee the current version is present.
        &self.versions[&self.current]
    }

    fn version(&self, v: u32) -> Result<&DataKeys, CryptoError> {
        self.versions.get(&v).ok_or(CryptoError::UnknownVersion(v))
    }

    /// Index versions to try when looking a number up, newest first.
    pub fn index_versions(&self) -> impl Iterator<Item = u32> + '_ {
        self.versions.keys().rev().copied()
    }

    pub fn fill_random(&self, out: &mut [u8]) -> Result<(), CryptoError> {
        self.rng.fill(out).map_err(|_| CryptoError::Random)
    }

    /// The keyed hash of a card number under index key `version`.
    pub fn pan_index(&self, version: u32, pan: &Pan) -> Result<[u8; 32], CryptoError> {
        let tag = hmac::sign(&self.version(version)?.index, pan.expose().as_bytes());
        let mut out = [0u8; 32];
        out.copy_from_slice(tag.as_ref());
        Ok(out)
    }

    /// A keyed hash of arbitrary request content under index key
    /// `version`, to recognise a retry without storing what was sent.
    pub fn fingerprint(&self, version: u32, parts: &[&[u8]]) -> Result<Vec<u8>, CryptoError> {
        let mut ctx = hmac::Context::with_key(&self.version(version)?.index);
        ctx.update(b"vcn/fingerprint");
        for p in parts {
            ctx.update(&(p.len() as u64).to_be_bytes());
            ctx.update(p);
        }
        Ok(ctx.sign().as_ref().to_vec())
    }

    /// The CVV2 of a number and expiry: HMAC-SHA256 under the CVV key of
    /// `version`, reduced to 3 decimal digits. A card keeps the CVV key
    /// version it was issued under (its CVV is printed), so a version stays
    /// needed while a live card uses it.
    pub fn cvv(&self, version: u32, pan: &Pan, expiry: Expiry) -> Result<Cvv, CryptoError> {
        let mut ctx = hmac::Context::with_key(&self.version(version)?.cvv);
        ctx.update(pan.expose().as_bytes());
        ctx.update(b"|");
        ctx.update(expiry.mmyy().as_bytes());
        let tag = ctx.sign();
        let b = tag.as_ref();
        let n = u32::from_be_bytes([b[0], b[1], b[2], b[3]]) % 1000;
        let digits = Zeroizing::new(format!("{n:03}"));
        // Three digits always parse.
        Ok(Cvv::parse(&digits).unwrap_or_else(|_| unreachable_cvv()))
    }

    /// Whether `cvv` is the one derived for `pan` and `expiry` under CVV key
    /// `version`, compared in constant time.
    pub fn verify_cvv(
        &self,
        version: u32,
        pan: &Pan,
        expiry: Expiry,
        cvv: &Cvv,
    ) -> Result<bool, CryptoError> {
        let want = self.cvv(version, pan, expiry)?;
        let (a, b) = (want.expose().as_bytes(), cvv.expose().as_bytes());
        Ok(a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0)
    }

    /// The same card's sealed numbers with its data key re-wrapped under
    /// the current KEK (the numbers' ciphertexts are unchanged: they are
    /// sealed under the card's own DEK). Used by key rotation.
    pub fn rewrap(&self, card_id: &str, sealed: &Sealed) -> Result<Sealed, CryptoError> {
        let kek = &self.version(sealed.key_version)?.kek;
        let dek = Zeroizing::new(aead_open(
            kek,
            &sealed.wrapped_dek,
            &dek_aad(card_id, sealed.key_version),
        )?);
        if dek.len() != KEY_LEN {
            return Err(CryptoError::Open);
        }
        let version = self.current;
        let wrapped_dek = self.aead_seal(&self.current().kek, &dek, &dek_aad(card_id, version))?;
        Ok(Sealed {
            key_version: version,
            wrapped_dek,
            funding_pan: sealed.funding_pan.clone(),
            token_pan: sealed.token_pan.clone(),
        })
    }

    /// Seals a card's numbers under a fresh DEK wrapped by the current KEK.
    pub fn seal(&self, card_id: &str, funding: &Pan, token: &Pan) -> Result<Sealed, CryptoError> {
        let mut dek = Zeroizing::new([0u8; KEY_LEN]);
        self.fill_random(&mut dek[..])?;
        let version = self.current;
        let wrapped_dek =
            self.aead_seal(&self.current().kek, &dek[..], &dek_aad(card_id, version))?;
        let cipher = Aes256Gcm::new((&*dek).into());
        Ok(Sealed {
            key_version: version,
            wrapped_dek,
            funding_pan: self.aead_seal(
                &cipher,
                funding.expose().as_bytes(),
                &field_aad(b"funding_pan", card_id),
            )?,
            token_pan: self.aead_seal(
                &cipher,
                token.expose().as_bytes(),
                &field_aad(b"token_pan", card_id),
            )?,
        })
    }

    /// Opens the funding card number of a sealed record.
    pub fn open_funding(&self, card_id: &str, sealed: &Sealed) -> Result<Pan, CryptoError> {
        self.open_field(card_id, sealed, &sealed.funding_pan, b"funding_pan")
    }

    /// Opens the virtual card number of a sealed record.
    pub fn open_token(&self, card_id: &str, sealed: &Sealed) -> Result<Pan, CryptoError> {
        self.open_field(card_id, sealed, &sealed.token_pan, b"token_pan")
    }

    fn open_field(
        &self,
        card_id: &str,
        sealed: &Sealed,
        ct: &[u8],
        name: &[u8],
    ) -> Result<Pan, CryptoError> {
        let kek = &self.version(sealed.key_version)?.kek;
        let dek = Zeroizing::new(aead_open(
            kek,
            &sealed.wrapped_dek,
            &dek_aad(card_id, sealed.key_version),
        )?);
        if dek.len() != KEY_LEN {
            return Err(CryptoError::Open);
        }
        let cipher = Aes256Gcm::new_from_slice(&dek).map_err(|_| CryptoError::Open)?;
        let plain = Zeroizing::new(aead_open(&cipher, ct, &field_aad(name, card_id))?);
        let s = std::str::from_utf8(&plain).map_err(|_| CryptoError::Open)?;
        Pan::parse(s).map_err(|_| CryptoError::Open)
    }

    fn aead_seal(
        &self,
        cipher: &Aes256Gcm,
        plain: &[u8],
        aad: &[u8],
    ) -> Result<Vec<u8>, CryptoError> {
        let mut nonce = [0u8; NONCE_LEN];
        self.fill_random(&mut nonce)?;
        let ct = cipher
            .encrypt(Nonce::from_slice(&nonce), Payload { msg: plain, aad })
            .map_err(|_| CryptoError::Open)?;
        let mut out = Vec::with_capacity(NONCE_LEN + ct.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        Ok(out)
    }
}

fn unreachable_cvv() -> Cvv {
    // Never reached: "{n:03}" of n < 1000 is three digits.
    Cvv::parse("000").unwrap_or_else(|_| unreachable!())
}

fn aead_open(cipher: &Aes256Gcm, sealed: &[u8], aad: &[u8]) -> Result<Vec<u8>, CryptoError> {
    if sealed.len() < NONCE_LEN {
        return Err(CryptoError::Open);
    }
    let (nonce, ct) = sealed.split_at(NONCE_LEN);
    cipher
        .decrypt(Nonce::from_slice(nonce), Payload { msg: ct, aad })
        .map_err(|_| CryptoError::Open)
}

fn dek_aad(card_id: &str, version: u32) -> Vec<u8> {
    let mut aad = b"vcn/dek/".to_vec();
    aad.extend_from_slice(&version.to_be_bytes());
    aad.extend_from_slice(card_id.as_bytes());
    aad
}

fn field_aad(name: &[u8], card_id: &str) -> Vec<u8> {
    let mut aad = b"vcn/".to_vec();
    aad.extend_from_slice(name);
    aad.push(b'/');
    aad.extend_from_slice(card_id.as_bytes());
    aad
}

/// Uniform random digits from the keyring's CSPRNG, by rejection sampling
/// bytes (values 250-255 are redrawn so every digit is equally likely).
pub struct RandomDigits<'a> {
    keyring: &'a Keyring,
    buf: [u8; 32],
    pos: usize,
    /// Set when the system RNG failed: the caller must not use the number.
    pub failed: bool,
}

impl<'a> RandomDigits<'a> {
    pub fn new(keyring: &'a Keyring) -> Self {
        RandomDigits {
            keyring,
            buf: [0; 32],
            pos: 32,
            failed: false,
        }
    }
}

impl DigitSource for RandomDigits<'_> {
    fn digit(&mut self) -> u8 {
        loop {
            if self.pos == self.buf.len() {
                if self.keyring.fill_random(&mut self.buf).is_err() {
                    self.failed = true;
                    return 0;
                }
                self.pos = 0;
            }
            let b = self.buf[self.pos];
            self.pos += 1;
            if b < 250 {
                return b % 10;
            }
        }
    }
}

impl Drop for RandomDigits<'_> {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.buf);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keyring(byte: u8) -> Keyring {
        Keyring::single(&Zeroizing::new([byte; KEY_LEN]))
    }

    fn pans() -> (Pan, Pan) {
        (
            Pan::parse("4111111111111111").unwrap(),
            Pan::parse("4111112345678909").unwrap(),
        )
    }

    /// Fingerprints are stored (transaction and idempotency records) and
    /// compared with a retry's: the tag must stay the HMAC of the label and
    /// each part's length and bytes, however it is computed, and must tell
    /// parts apart by their boundaries.
    #[test]
    fn fingerprint_is_the_hmac_of_label_and_length_prefixed_parts() {
        let k = keyring(3);
        let parts: [&[u8]; 3] = [b"authorize", b"txn-1", b"4111111111111111"];
        let mut ctx = hmac::Context::with_key(&k.current().index);
        ctx.update(b"vcn/fingerprint");
        for p in parts {
            ctx.update(&(p.len() as u64).to_be_bytes());
            ctx.update(p);
        }
        let fp = |k: &Keyring, parts: &[&[u8]]| k.fingerprint(k.current_version(), parts).unwrap();
        assert_eq!(fp(&k, &parts), ctx.sign().as_ref().to_vec());
        assert_ne!(fp(&k, &[b"ab", b"c"]), fp(&k, &[b"a", b"bc"]));
        assert_ne!(fp(&k, &parts), fp(&keyring(4), &parts));
    }

    #[test]
    fn seal_and_open_round_trip() {
        let k = keyring(1);
        let (funding, token) = pans();
        let sealed = k.seal("vc_1", &funding, &token).unwrap();
        assert_eq!(k.open_funding("vc_1", &sealed).unwrap(), funding);
        assert_eq!(k.open_token("vc_1", &sealed).unwrap(), token);
        // Nothing of either number shows in the stored bytes.
        for blob in [&sealed.wrapped_dek, &sealed.funding_pan, &sealed.token_pan] {
            assert!(!blob.windows(16).any(|w| w == funding.expose().as_bytes()));
            assert!(!blob.windows(16).any(|w| w == token.expose().as_bytes()));
        }
    }

    #[test]
    fn every_tampered_byte_fails_to_open() {
        let k = keyring(1);
        let (funding, token) = pans();
        let sealed = k.seal("vc_1", &funding, &token).unwrap();
        for i in 0..sealed.funding_pan.len() {
            let mut bad = sealed.clone();
            bad.funding_pan[i] ^= 0x01;
            assert_eq!(
                k.open_funding("vc_1", &bad),
                Err(CryptoError::Open),
                "byte {i}"
            );
        }
        for i in 0..sealed.wrapped_dek.len() {
            let mut bad = sealed.clone();
            bad.wrapped_dek[i] ^= 0x80;
            assert_eq!(
                k.open_funding("vc_1", &bad),
                Err(CryptoError::Open),
                "dek byte {i}"
            );
        }
        let mut short = sealed.clone();
        short.funding_pan.truncate(5);
        assert_eq!(k.open_funding("vc_1", &short), Err(CryptoError::Open));
    }

    #[test]
    fn wrong_key_wrong_record_or_swapped_field_fails() {
        let (funding, token) = pans();
        let k = keyring(1);
        let sealed = k.seal("vc_1", &funding, &token).unwrap();
        assert_eq!(
            keyring(2).open_funding("vc_1", &sealed),
            Err(CryptoError::Open)
        );
        assert_eq!(k.open_funding("vc_2", &sealed), Err(CryptoError::Open));
        let swapped = Sealed {
            funding_pan: sealed.token_pan.clone(),
            ..sealed.clone()
        };
        assert_eq!(k.open_funding("vc_1", &swapped), Err(CryptoError::Open));
        let other = k.seal("vc_2", &funding, &token).unwrap();
        let moved = Sealed {
            funding_pan: other.funding_pan,
            ..sealed.clone()
        };
        assert_eq!(k.open_funding("vc_1", &moved), Err(CryptoError::Open));
        let unknown = Sealed {
            key_version: 9,
            ..sealed
        };
        assert_eq!(
            k.open_funding("vc_1", &unknown),
            Err(CryptoError::UnknownVersion(9))
        );
    }

    #[test]
    fn fresh_nonces_and_deks_every_time() {
        let k = keyring(1);
        let (funding, token) = pans();
        let a = k.seal("vc_1", &funding, &token).unwrap();
        let b = k.seal("vc_1", &funding, &token).unwrap();
        assert_ne!(a.funding_pan, b.funding_pan);
        assert_ne!(a.wrapped_dek, b.wrapped_dek);
    }

    #[test]
    fn index_and_cvv_are_keyed_and_stable() {
        let (funding, token) = pans();
        let (k1, k2) = (keyring(1), keyring(2));
        assert_eq!(
            k1.pan_index(1, &token).unwrap(),
            k1.pan_index(1, &token).unwrap()
        );
        assert_ne!(
            k1.pan_index(1, &token).unwrap(),
            k2.pan_index(1, &token).unwrap()
        );
        assert_ne!(
            k1.pan_index(1, &token).unwrap(),
            k1.pan_index(1, &funding).unwrap()
        );
        assert!(k1.pan_index(2, &token).is_err());

        let exp = Expiry {
            month: 3,
            year: 2027,
        };
        let cvv = k1.cvv(1, &token, exp).unwrap();
        assert_eq!(cvv.expose().len(), 3);
        assert!(k1.verify_cvv(1, &token, exp, &cvv).unwrap());
        assert!(!k1
            .verify_cvv(
                1,
                &token,
                Expiry {
                    month: 4,
                    year: 2027
                },
                &cvv
            )
            .unwrap());
        let wrong = Cvv::parse(&format!(
            "{:03}",
            (cvv.expose().parse::<u32>().unwrap() + 1) % 1000
        ))
        .unwrap();
        assert!(!k1.verify_cvv(1, &token, exp, &wrong).unwrap());
        assert_eq!(k1.cvv(2, &token, exp), Err(CryptoError::UnknownVersion(2)));
    }

    #[test]
    fn cvvs_spread_over_all_three_digit_values() {
        let k = keyring(3);
        let token = pans().1;
        let mut seen = std::collections::HashSet::new();
        for m in 1..=12u8 {
            for y in 2026..2126u16 {
                seen.insert(
                    k.cvv(1, &token, Expiry { month: m, year: y })
                        .unwrap()
                        .expose()
                        .to_string(),
                );
            }
        }
        // 1 200 draws over 1 000 values: a uniform spread covers ~70%.
        assert!(seen.len() > 600, "{}", seen.len());
    }

    #[test]
    fn key_check_value_tells_keys_apart() {
        assert_eq!(
            keyring(1).current().check_value(),
            keyring(1).current().check_value()
        );
        assert_ne!(
            keyring(1).current().check_value(),
            keyring(2).current().check_value()
        );
        assert_eq!(keyring(1).current().check_value().len(), 16);
        assert!(!format!("{:?}", keyring(1)).contains("0101"));
    }

    #[test]
    fn rewrap_moves_a_card_to_the_new_kek_and_keeps_its_numbers() {
        let (funding, token) = pans();
        let mut masters = BTreeMap::new();
        masters.insert(1, Zeroizing::new([1u8; KEY_LEN]));
        let old = Keyring::from_masters(&masters).unwrap();
        let sealed = old.seal("vc_1", &funding, &token).unwrap();
        masters.insert(2, Zeroizing::new([2u8; KEY_LEN]));
        let both = Keyring::from_masters(&masters).unwrap();
        assert_eq!(both.current_version(), 2);
        let moved = both.rewrap("vc_1", &sealed).unwrap();
        assert_eq!(moved.key_version, 2);
        masters.remove(&1);
        let new_only = Keyring::from_masters(&masters).unwrap();
        assert_eq!(new_only.open_funding("vc_1", &moved).unwrap(), funding);
        assert_eq!(new_only.open_token("vc_1", &moved).unwrap(), token);
        assert_eq!(
            new_only.open_funding("vc_1", &sealed),
            Err(CryptoError::UnknownVersion(1))
        );
        // The re-wrapped DEK is bound to its card id like the original.
        assert!(matches!(
            both.rewrap("vc_2", &sealed),
            Err(CryptoError::Open)
        ));
        // Fingerprints and CVVs are per version.
        assert_ne!(
            both.fingerprint(1, &[b"x"]).unwrap(),
            both.fingerprint(2, &[b"x"]).unwrap()
        );
    }

    #[test]
    fn random_digits_are_digits() {
        let k = keyring(1);
        let mut d = RandomDigits::new(&k);
        let mut counts = [0u32; 10];
        for _ in 0..10_000 {
            counts[usize::from(d.digit())] += 1;
        }
        assert!(!d.failed);
        assert!(
            counts.iter().all(|&c| (800..1200).contains(&c)),
            "{counts:?}"
        );
    }
}
