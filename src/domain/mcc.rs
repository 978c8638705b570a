//! Merchant category codes (ISO 18245): four digits.

use std::fmt;

use crate::domain::FieldError;

#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Mcc([u8; 4]);

impl Mcc {
    pub fn parse(s: &str) -> Result<Mcc, FieldError> {
        let bytes: [u8; 4] = s
            .as_bytes()
            .try_into()
            .ok()
            .filter(|b: &[u8; 4]| b.iter().all(u8::is_ascii_digit))
            .ok_or_else(|| FieldError::new("", "must be a 4-digit merchant category code"))?;
        Ok(Mcc(bytes))
    }

    /// Parses a repeated field, naming the bad element (`allowed_mccs[2]`).
    pub fn parse_list(field: &str, items: &[String]) -> Result<Vec<Mcc>, FieldError> {
        const MAX: usize = 200;
        if items.len() > MAX {
            return Err(FieldError::new(field, format!("at most {MAX} codes")));
        }
        let mut out = Vec::with_capacity(items.len());
        for (i, s) in items.iter().enumerate() {
            let mcc = Mcc::parse(s).map_err(|e| e.within(&format!("{field}[{i}]")))?;
            if !out.contains(&mcc) {
                out.push(mcc);
            }
        }
        out.sort();
        Ok(out)
    }

    pub fn as_str(&self) -> &str {
        // Only ASCII digits are ever stored.
        std::str::from_utf8(&self.0).unwrap_or("????")
    }
}

impl fmt::Display for Mcc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for Mcc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Mcc({})", self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn four_digits_only() {
        assert_eq!(Mcc::parse("5411").unwrap().as_str(), "5411");
        assert_eq!(Mcc::parse("0742").unwrap().to_string(), "0742");
        for bad in ["", "541", "54111", "54a1", " 541", "５４１１"] {
            assert!(Mcc::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn list_names_the_bad_element_and_dedups() {
        let ok = Mcc::parse_list(
            "allowed_mccs",
            &["5999".into(), "5411".into(), "5999".into()],
        )
        .unwrap();
        assert_eq!(
            ok,
            vec![Mcc::parse("5411").unwrap(), Mcc::parse("5999").unwrap()]
        );
        let err = Mcc::parse_list("blocked_mccs", &["5411".into(), "77".into()]).unwrap_err();
        assert_eq!(err.field, "blocked_mccs[1]");
    }
}
