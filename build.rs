//! Compiles proto/ into Rust with protox (a pure-Rust protobuf compiler), so
//! building needs no `protoc` on the machine. Also writes the encoded file
//! descriptor set that server reflection serves.

use std::{env, fs, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/vcn/v1/vcn.proto";
    println!("cargo:rerun-if-changed={proto}");

    let mut compiler = protox::Compiler::new(["proto"])?;
    compiler.include_imports(true).include_source_info(true);
    compiler.open_file(proto)?;

    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(
        out_dir.join("vcn_descriptor.bin"),
        compiler.encode_file_descriptor_set(),
    )?;

    // Messages that carry a full card number or a CVV get a hand-written,
    // masking Debug (src/api/debug.rs) instead of the derived one.
    let secret_messages = [
        ".vcn.v1.IssueCardRequest",
        ".vcn.v1.IssueCardResponse",
        ".vcn.v1.AuthorizeRequest",
        ".vcn.v1.AuthorizeResponse",
        ".vcn.v1.DetokenizeRequest",
        ".vcn.v1.DetokenizeResponse",
    ];
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .skip_debug(secret_messages)
        .compile_fds(compiler.file_descriptor_set())?;
    Ok(())
}
