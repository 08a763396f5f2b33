//! `freeflow-cni`: the chained CNI plugin that registers containers with Freeflow (see
//! `freeflow_control::cni`). No unsafe code.
#![deny(unsafe_code)]

fn main() -> std::process::ExitCode {
    freeflow_control::cni::main()
}
