//! The pure core: card numbers, money, card policy and the authorisation
//! decision. Plain types and functions, no I/O, no clock, no randomness of
//! their own: everything they need is passed in, so every rule is unit-tested.
//!
//! Parse, don't validate: a [`Pan`], [`Money`], [`Mcc`] or [`Owner`] that
//! exists is valid; the parsers say which field was wrong and why.

pub mod card;
pub mod decision;
pub mod error;
pub mod mcc;
pub mod money;
pub mod number;
pub mod pan;
pub mod text;

pub use card::{Card, CardId, CardPolicy, CardState, Expiry};
pub use decision::{authorize, Attempt, Decision, ResponseCode};
pub use error::FieldError;
pub use mcc::Mcc;
pub use money::{Currency, Money};
pub use pan::{Cvv, Pan, PanError};
pub use text::{MerchantId, Owner};
