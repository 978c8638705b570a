//! vcn-widget: a small desktop window that makes a single-use virtual card
//! number in two clicks, over the vcn gRPC API.
//!
//! - [`config`]: the server, the owner-pinned key, the funding cards;
//! - [`form`], [`model`], [`secret`], [`words`]: state and logic, plain
//!   code, unit-tested;
//! - [`backend`]: the gRPC calls, on a thread of their own;
//! - [`view`] and [`app`]: the egui window, kept thin.

pub mod app;
pub mod backend;
pub mod config;
pub mod form;
pub mod model;
pub mod secret;
pub mod view;
pub mod words;

pub use app::{Clock, ManualClock, SystemClock, WidgetApp};

/// The window's size in points.
pub const WINDOW_SIZE: [f32; 2] = [460.0, 720.0];
