//! Free-text identifiers that clients send: owners, merchants, idempotency
//! keys, transaction ids. Bounded, printable, no control characters, so they
//! are safe as storage keys and in logs.

use std::fmt;

use crate::domain::FieldError;

/// Checks an identifier: 1 to `max` characters, none of them a control
/// character or whitespace other than a plain space inside.
pub fn parse_ident(field: &str, s: &str, max: usize) -> Result<String, FieldError> {
    if s.is_empty() {
        return Err(FieldError::new(field, "is required"));
    }
    if s.chars().count() > max {
        return Err(FieldError::new(
            field,
            format!("must be at most {max} characters"),
        ));
    }
    if s.chars().any(|c| c.is_control()) || s.trim() != s {
        return Err(FieldError::new(
            field,
            "must not contain control characters or leading/trailing spaces",
        ));
    }
    Ok(s.to_string())
}

/// The bank's customer reference for a cardholder.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Owner(String);

impl Owner {
    pub const MAX_LEN: usize = 128;

    pub fn parse(field: &str, s: &str) -> Result<Owner, FieldError> {
        parse_ident(field, s, Self::MAX_LEN).map(Owner)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Owner({})", self.0)
    }
}

/// A merchant identifier as the switch sends it (ISO 8583 field 42).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct MerchantId(String);

impl MerchantId {
    pub const MAX_LEN: usize = 64;

    pub fn parse(field: &str, s: &str) -> Result<MerchantId, FieldError> {
        parse_ident(field, s, Self::MAX_LEN).map(MerchantId)
    }

    /// An optional merchant: the empty string is none.
    pub fn parse_optional(field: &str, s: &str) -> Result<Option<MerchantId>, FieldError> {
        if s.is_empty() {
            return Ok(None);
        }
        Self::parse(field, s).map(Some)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for MerchantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MerchantId({})", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idents_are_bounded_and_printable() {
        assert_eq!(
            Owner::parse("owner", "cust-42").unwrap().as_str(),
            "cust-42"
        );
        assert_eq!(Owner::parse("owner", "").unwrap_err().reason, "is required");
        assert!(Owner::parse("owner", &"x".repeat(129)).is_err());
        assert!(Owner::parse("owner", &"é".repeat(128)).is_ok());
        assert!(Owner::parse("owner", "a\0b").is_err());
        assert!(Owner::parse("owner", "a\nb").is_err());
        assert!(Owner::parse("owner", " a").is_err());
        assert_eq!(MerchantId::parse_optional("merchant_id", "").unwrap(), None);
        assert_eq!(
            MerchantId::parse_optional("merchant_id", "\t")
                .unwrap_err()
                .field,
            "merchant_id"
        );
    }
}
