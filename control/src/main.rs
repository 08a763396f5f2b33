//! `freeflow`: the control daemon and command line of Freeflow.

fn main() -> std::process::ExitCode {
    freeflow_control::cli::main()
}
