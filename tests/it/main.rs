//! Integration tests: the real server on an ephemeral port, driven through
//! the generated gRPC clients (and, in `binary`, the real `vcn` binary).
//! One test binary, so the suite links once.

mod access;
mod audit;
mod authorize;
mod backup;
mod bench;
mod binary;
mod concurrency;
mod crash;
mod disk;
mod engine;
mod events;
mod issue;
mod keys;
mod limits;
mod observe;
mod persistence;
mod postgres;
mod props;
mod purge;
mod security;
mod support;
mod throttle;
mod tls;
mod validation;
mod web;
mod webhooks;
