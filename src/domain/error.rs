//! The one error a parser returns: which request field is wrong, and why.

use std::fmt;

/// A request field that failed to parse. Its message names the field and the
/// rule, never the value (the value may be a card number).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// The request field's name as the client sent it, e.g. `spend_limit.currency`.
    pub field: String,
    /// What is wrong, as a sentence fragment ("must be 4 digits").
    pub reason: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// The same error reported under a parent field: `amount` + `currency`
    /// gives `amount.currency`.
    pub fn within(mut self, parent: &str) -> Self {
        self.field = if self.field.is_empty() {
            parent.to_string()
        } else {
            format!("{parent}.{}", self.field)
        };
        self
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.reason)
    }
}

impl std::error::Error for FieldError {}
