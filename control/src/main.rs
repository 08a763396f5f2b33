//! `freeflow`: the control daemon and command line of Freeflow. No unsafe code.
#![deny(unsafe_code)]

fn main() -> std::process::ExitCode {
    freeflow_control::cli::main()
}
