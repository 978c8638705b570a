//! Integration tests: the real server on an ephemeral port, driven through
//! the generated gRPC clients (and, in `binary`, the real `vcn` binary).
//! One test binary, so the suite links once.

mod access;
mod authorize;
mod bench;
mod binary;
mod concurrency;
mod issue;
mod persistence;
mod security;
mod support;
mod validation;
