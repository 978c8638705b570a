//! The gRPC layer, kept thin: decode and parse the request, authenticate,
//! call the vault, and map errors to `tonic::Status` in one place
//! ([`status`]).

pub mod admin;
pub mod auth;
pub mod cards;
pub mod convert;
mod debug;
pub mod limiter;
pub mod status;
pub mod switch;

/// Code generated from proto/vcn/v1/vcn.proto at build time (protox, no
/// protoc needed).
pub mod pb {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("vcn.v1");
}

/// The encoded descriptors of vcn.v1 and its imports, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/vcn_descriptor.bin"));
