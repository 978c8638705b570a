//! Certificates: a development CA with a server certificate for localhost
//! and one client certificate per named client (`vcn certs dev`), and the
//! fingerprint a client certificate is registered by.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("certificate generation failed: {0}")]
    Generate(String),
    #[error("client name {0:?} must be 1 to 64 letters, digits, '.', '_' or '-'")]
    BadName(String),
}

fn gen(e: rcgen::Error) -> CertsError {
    CertsError::Generate(e.to_string())
}

/// What `dev` wrote.
#[derive(Debug)]
pub struct DevCerts {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    /// Per client: name, certificate, key.
    pub clients: Vec<(String, PathBuf, PathBuf)>,
}

fn write(path: &Path, text: &str, mode: u32) -> Result<(), CertsError> {
    let err = |e: std::io::Error| CertsError::File {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(err)?;
    f.write_all(text.as_bytes()).map_err(err)
}

/// Makes a development CA in `out`, a server certificate for localhost
/// and 127.0.0.1, and a client certificate for each of `clients`. Private
/// keys are written mode 0600. For development and tests only.
pub fn dev(out: &Path, clients: &[String]) -> Result<DevCerts, CertsError> {
    for c in clients {
        let ok = !c.is_empty()
            && c.len() <= 64
            && c.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if !ok {
            return Err(CertsError::BadName(c.clone()));
        }
    }
    fs::create_dir_all(out).map_err(|e| CertsError::File {
        path: out.to_path_buf(),
        reason: e.to_string(),
    })?;
    let ca_key = KeyPair::generate().map_err(gen)?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(gen)?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "vcn development CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca_params.self_signed(&ca_key).map_err(gen)?;
    let issuer = Issuer::new(ca_params, ca_key);
    let ca = out.join("ca.pem");
    write(&ca, &ca_cert.pem(), 0o644)?;

    let server_key = KeyPair::generate().map_err(gen)?;
    let mut sp = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
        .map_err(gen)?;
    sp.distinguished_name.push(DnType::CommonName, "localhost");
    sp.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server = sp.signed_by(&server_key, &issuer).map_err(gen)?;
    let server_cert = out.join("server.pem");
    let server_key_path = out.join("server.key");
    write(&server_cert, &server.pem(), 0o644)?;
    write(&server_key_path, &server_key.serialize_pem(), 0o600)?;

    let mut written = vec![];
    for name in clients {
        let key = KeyPair::generate().map_err(gen)?;
        let mut cp = CertificateParams::new(Vec::<String>::new()).map_err(gen)?;
        cp.distinguished_name
            .push(DnType::CommonName, name.as_str());
        cp.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let cert = cp.signed_by(&key, &issuer).map_err(gen)?;
        let (c, k) = (
            out.join(format!("{name}.pem")),
            out.join(format!("{name}.key")),
        );
        write(&c, &cert.pem(), 0o644)?;
        write(&k, &key.serialize_pem(), 0o600)?;
        written.push((name.clone(), c, k));
    }
    Ok(DevCerts {
        ca,
        server_cert,
        server_key: server_key_path,
        clients: written,
    })
}

/// The SHA-256 of a certificate's DER bytes, in hex: how a client
/// certificate is registered and recognised.
pub fn fingerprint_der(der: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, der))
}

/// The fingerprint of the first certificate in a PEM file.
pub fn fingerprint_pem_file(path: &Path) -> Result<String, CertsError> {
    let text = fs::read(path).map_err(|e| CertsError::File {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let pems = pem::parse_many(&text).map_err(|_| CertsError::NoCertificate {
        path: path.to_path_buf(),
    })?;
    pems.iter()
        .find(|p| p.tag() == "CERTIFICATE")
        .map(|p| fingerprint_der(p.contents()))
        .ok_or_else(|| CertsError::NoCertificate {
            path: path.to_path_buf(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn dev_writes_a_ca_server_and_client_certs_with_private_keys_0600() {
        let dir = tempfile::tempdir().unwrap();
        let d = dev(dir.path(), &["switch".into()]).unwrap();
        for p in [&d.server_key, &d.clients[0].2] {
            assert_eq!(fs::metadata(p).unwrap().permissions().mode() & 0o777, 0o600);
        }
        let f = fingerprint_pem_file(&d.clients[0].1).unwrap();
        assert_eq!(f.len(), 64);
        assert_ne!(f, fingerprint_pem_file(&d.server_cert).unwrap());
        assert!(matches!(
            fingerprint_pem_file(&d.server_key),
            Err(CertsError::NoCertificate { .. })
        ));
        assert!(matches!(
            dev(dir.path(), &["bad name".into()]),
            Err(CertsError::BadName(_))
        ));
    }
}
