//! The `vcn` binary: see `vcn --help`.

fn main() -> std::process::ExitCode {
    vcn::cli::main()
}
