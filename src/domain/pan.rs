//! Primary account numbers (card numbers) and card verification values.
//!
//! A [`Pan`] is 13 to 19 ASCII digits with a valid Luhn check digit. Its
//! digits are wiped from memory when it is dropped, and neither `Debug` nor
//! any method but [`Pan::expose`] shows more than the first 6 and last 4.

use std::fmt;

use zeroize::Zeroizing;

/// Shortest and longest card numbers (ISO/IEC 7812).
pub const MIN_LEN: usize = 13;
pub const MAX_LEN: usize = 19;

/// Why a string is not a card number. The Luhn failure is told apart because
/// an authorisation answers it with response code 14 rather than rejecting
/// the request as malformed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PanError {
    Empty,
    NotDigits,
    Length(usize),
    Luhn,
}

impl PanError {
    pub fn reason(self) -> String {
        match self {
            PanError::Empty => "is required".into(),
            PanError::NotDigits => "must contain digits only".into(),
            PanError::Length(n) => {
                format!("must be {MIN_LEN} to {MAX_LEN} digits long, not {n}")
            }
            PanError::Luhn => "fails the Luhn check".into(),
        }
    }
}

/// A valid card number.
#[derive(Clone, PartialEq, Eq)]
pub struct Pan(Zeroizing<String>);

impl Pan {
    pub fn parse(s: &str) -> Result<Pan, PanError> {
        Self::check_format(s)?;
        if !luhn_valid(s) {
            return Err(PanError::Luhn);
        }
        Ok(Pan(Zeroizing::new(s.to_string())))
    }

    /// Checks everything but the Luhn digit.
    pub fn check_format(s: &str) -> Result<(), PanError> {
        if s.is_empty() {
            return Err(PanError::Empty);
        }
        if !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(PanError::NotDigits);
        }
        if !(MIN_LEN..=MAX_LEN).contains(&s.len()) {
            return Err(PanError::Length(s.len()));
        }
        Ok(())
    }

    /// Builds a number from a payload (every digit but the last) by appending
    /// its Luhn check digit. The payload must be digits of a valid length.
    pub fn with_check_digit(payload: &str) -> Result<Pan, PanError> {
        let mut digits = Zeroizing::new(String::with_capacity(payload.len() + 1));
        digits.push_str(payload);
        digits.push(char::from(b'0' + luhn_check_digit(payload)?));
        Self::check_format(&digits)?;
        Ok(Pan(digits))
    }

    /// The full number. Named so that every use stands out in review: it
    /// goes only to the vault's crypto and to the one response allowed to
    /// carry it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The first `n` digits (the BIN / IIN for n = 6 or 8).
    pub fn prefix(&self, n: usize) -> &str {
        &self.0[..n.min(self.0.len())]
    }

    pub fn last4(&self) -> &str {
        &self.0[self.0.len() - 4..]
    }

    /// First 6 and last 4 digits, the rest as `*`: the most PCI DSS 3.3
    /// allows to be shown.
    pub fn masked(&self) -> String {
        mask(&self.0)
    }
}

/// Masks a digit string as first 6 + last 4; strings too short to keep any
/// digit hidden are masked entirely.
pub fn mask(digits: &str) -> String {
    let n = digits.len();
    if n < MIN_LEN || !digits.is_ascii() {
        return "*".repeat(n);
    }
    format!("{}{}{}", &digits[..6], "*".repeat(n - 10), &digits[n - 4..])
}

impl fmt::Debug for Pan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pan({})", self.masked())
    }
}

/// Whether a digit string passes the Luhn (mod 10) check. Non-digits fail.
pub fn luhn_valid(digits: &str) -> bool {
    let mut sum = 0u32;
    for (i, b) in digits.bytes().rev().enumerate() {
        if !b.is_ascii_digit() {
            return false;
        }
        let mut d = u32::from(b - b'0');
        if i % 2 == 1 {
            d *= 2;
            if d > 9 {
                d -= 9;
            }
        }
        sum += d;
    }
    !digits.is_empty() && sum.is_multiple_of(10)
}

/// The Luhn check digit to append to `payload`.
pub fn luhn_check_digit(payload: &str) -> Result<u8, PanError> {
    let mut sum = 0u32;
    for (i, b) in payload.bytes().rev().enumerate() {
        if !b.is_ascii_digit() {
            return Err(PanError::NotDigits);
        }
        let mut d = u32::from(b - b'0');
        // The check digit will take position 0, so the payload's last digit
        // is the first one doubled.
        if i % 2 == 0 {
            d *= 2;
            if d > 9 {
                d -= 9;
            }
        }
        sum += d;
    }
    Ok(((10 - sum % 10) % 10) as u8)
}

/// A card verification value (CVV2/CVC2): 3 digits. Wiped on drop, never
/// printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Cvv(Zeroizing<String>);

impl Cvv {
    pub const LEN: usize = 3;

    pub fn parse(s: &str) -> Result<Cvv, String> {
        if s.is_empty() {
            return Err("is required".into());
        }
        if s.len() != Self::LEN || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!("must be {} digits", Self::LEN));
        }
        Ok(Cvv(Zeroizing::new(s.to_string())))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Cvv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Cvv(***)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Published test numbers of the card schemes.
    const VALID: &[&str] = &[
        "4111111111111111",
        "4012888888881881",
        "5555555555554444",
        "378282246310005",
        "6011111111111117",
        "4222222222222",
        "6250941006528599",
        "6759649826438453",
        "4000000000000000006",
    ];

    #[test]
    fn accepts_scheme_test_numbers() {
        for n in VALID {
            let pan = Pan::parse(n).unwrap_or_else(|e| panic!("{n}: {e:?}"));
            assert_eq!(pan.expose(), *n);
        }
    }

    #[test]
    fn rejects_each_kind_of_bad_number() {
        assert_eq!(Pan::parse(""), Err(PanError::Empty));
        assert_eq!(Pan::parse("4111a11111111111"), Err(PanError::NotDigits));
        assert_eq!(Pan::parse("4111 1111 1111 1111"), Err(PanError::NotDigits));
        assert_eq!(Pan::parse("٤١١١١١١١١١١١١١١١"), Err(PanError::NotDigits));
        assert_eq!(Pan::parse("411111111111"), Err(PanError::Length(12)));
        assert_eq!(
            Pan::parse("41111111111111111111"),
            Err(PanError::Length(20))
        );
        assert_eq!(Pan::parse("4111111111111112"), Err(PanError::Luhn));
    }

    #[test]
    fn every_single_digit_error_is_caught_by_luhn() {
        for n in VALID {
            for pos in 0..n.len() {
                for d in b'0'..=b'9' {
                    let mut bytes = n.as_bytes().to_vec();
                    if bytes[pos] == d {
                        continue;
                    }
                    bytes[pos] = d;
                    let s = String::from_utf8(bytes).unwrap();
                    assert!(!luhn_valid(&s), "{s} should fail Luhn");
                }
            }
        }
    }

    #[test]
    fn check_digit_completes_a_valid_number() {
        for n in VALID {
            let (payload, check) = n.split_at(n.len() - 1);
            assert_eq!(
                luhn_check_digit(payload).unwrap(),
                check.parse::<u8>().unwrap()
            );
            assert_eq!(Pan::with_check_digit(payload).unwrap().expose(), *n);
        }
    }

    #[test]
    fn masks_all_but_first_six_and_last_four() {
        let pan = Pan::parse("4111111111111111").unwrap();
        assert_eq!(pan.masked(), "411111******1111");
        assert_eq!(pan.last4(), "1111");
        assert_eq!(pan.prefix(6), "411111");
        let short = Pan::parse("4222222222222").unwrap();
        assert_eq!(short.masked(), "422222***2222");
        assert_eq!(mask("1234"), "****");
    }

    #[test]
    fn debug_never_shows_the_full_number_or_cvv() {
        let pan = Pan::parse("4012888888881881").unwrap();
        let shown = format!("{pan:?} {:?}", Some(&pan));
        assert!(!shown.contains("4012888888881881"), "{shown}");
        assert!(shown.contains("401288******1881"));
        let cvv = Cvv::parse("737").unwrap();
        assert!(!format!("{cvv:?}").contains("737"));
    }

    #[test]
    fn cvv_is_three_digits() {
        assert!(Cvv::parse("012").is_ok());
        assert!(Cvv::parse("").is_err());
        assert!(Cvv::parse("12").is_err());
        assert!(Cvv::parse("1234").is_err());
        assert!(Cvv::parse("12a").is_err());
    }
}
