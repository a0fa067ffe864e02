//! The `vkdecode` command-line tool: list devices, run the conformance cases, replay and dump
//! single case files. Everything lives in the binary-private [`cli`] module; the library does the
//! work.

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
