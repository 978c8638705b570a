//! vcn: single-use virtual card numbers.
//!
//! The rooms, from the inside out:
//! - [`domain`]: the pure core (card numbers, money, policy, the decision);
//! - [`vault`]: keys, envelope encryption and keyed-hash indexes over a small
//!   storage trait, with sled as the embedded engine and PostgreSQL as the
//!   shared one (several instances, one database);
//! - [`api`]: the thin gRPC layer (decode, authenticate, call the vault, map
//!   errors to `tonic::Status` in one place);
//! - [`audit`]: the tamper-evident audit log;
//! - [`server`], [`config`], [`clients`]: running it;
//! - [`cli`]: the `vcn` command line.

pub mod api;
pub mod audit;
pub mod backup;
pub mod bench;
pub mod certs;
pub mod cli;
pub mod clients;
pub mod config;
pub mod deadline;
pub mod domain;
pub mod installation;
pub mod metrics;
pub mod observe;
pub mod server;
pub mod vault;
pub mod web;
pub mod webhooks;
