//! The `vcn` binary: see `vcn --help`.

/// mimalloc instead of glibc's malloc: sled and the gRPC stack allocate and
/// free many small buffers per call (BENCHMARKS.md has the before/after).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    vcn::cli::main()
}
