//! `freeflow-cni`: a chained CNI plugin (specification 1.0 and 1.1) that registers containers
//! with the local Freeflow daemon.
//!
//! It runs after the plugin that gives the container its interface and address (the reference
//! bridge + host-local, flannel, calico): ADD takes the container's network namespace from
//! CNI_NETNS and its IPv4 address from `prevResult`, registers the container exactly as
//! `freeflow container add` does (the registry write the daemon watches, then a bounded wait for
//! the daemon to serve it: `cli::container::register`), and prints `prevResult`
//! unchanged as its result. DEL unregisters (success when there is nothing to remove or the
//! namespace is gone), CHECK compares the registration with what the chain says, VERSION lists
//! [`spec::SUPPORTED_VERSIONS`], STATUS says whether ADD can succeed, GC does nothing (see
//! `ops.rs` for why).
//!
//! The registry name of a container is derived from CNI_CONTAINERID and CNI_IFNAME
//! ([`spec::container_name`]); its tenant comes from the configuration's `tenant` or from
//! CNI_ARGS (`K8S_POD_NAMESPACE` by default), whichever `tenantPrecedence` says wins.
//!
//! Errors are the specification's error object on stdout and exit code 1; a line on stderr too,
//! for runtimes that log it.

mod ops;
pub mod spec;

use std::collections::HashMap;
use std::env;
use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use serde_json::{json, Value};

use spec::{code, CniError, Command, NetConf};

/// What the runtime passed in the environment, for one attachment.
#[derive(Debug, Clone)]
pub(crate) struct Attachment {
    /// CNI_CONTAINERID.
    pub container_id: String,
    /// CNI_IFNAME.
    pub ifname: String,
    /// CNI_NETNS (optional for DEL).
    pub netns: Option<PathBuf>,
    /// CNI_ARGS, parsed.
    pub args: HashMap<String, String>,
}

/// Entry point of the `freeflow-cni` binary.
pub fn main() -> ExitCode {
    let mut stdin = Vec::new();
    let read = io::stdin().read_to_end(&mut stdin);
    let outcome = match read {
        Ok(_) => run(&stdin),
        Err(e) => Err(CniError::new(
            code::IO_FAILURE,
            "cannot read the network configuration",
            format!("reading stdin: {e}"),
        )),
    };
    let mut stdout = io::stdout().lock();
    match outcome {
        Ok(Some(result)) => {
            let _ = writeln!(stdout, "{result}");
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(e) => {
            let _ = writeln!(stdout, "{}", e.to_json(&answer_version(&stdin)));
            let _ = writeln!(io::stderr(), "freeflow-cni: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the command the environment names on configuration `stdin`; `Some` is the JSON to
/// print on success.
fn run(stdin: &[u8]) -> Result<Option<Value>, CniError> {
    let command = env_var("CNI_COMMAND")?;
    let command = Command::parse(&command).ok_or_else(|| {
        CniError::new(
            code::INVALID_ENVIRONMENT,
            "unknown CNI_COMMAND",
            format!("CNI_COMMAND is {command:?}; expected ADD, DEL, CHECK, VERSION, GC or STATUS"),
        )
    })?;
    if command == Command::Version {
        return Ok(Some(json!({
            "cniVersion": answer_version(stdin),
            "supportedVersions": spec::SUPPORTED_VERSIONS,
        })));
    }
    let conf = NetConf::parse(stdin)?;
    match command {
        Command::Add => ops::add(&conf, &attachment(true)?).map(Some),
        Command::Del => ops::del(&conf, &attachment(false)?).map(|()| None),
        Command::Check => ops::check(&conf, &attachment(true)?).map(|()| None),
        Command::Status => ops::status(&conf).map(|()| None),
        Command::Gc => ops::gc(&conf).map(|()| None),
        Command::Version => unreachable!("answered above"),
    }
}

/// The attachment the environment describes; `need_netns`: CNI_NETNS must be set.
fn attachment(need_netns: bool) -> Result<Attachment, CniError> {
    let netns = env::var_os("CNI_NETNS")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from);
    if need_netns && netns.is_none() {
        return Err(missing("CNI_NETNS"));
    }
    Ok(Attachment {
        container_id: env_var("CNI_CONTAINERID")?,
        ifname: env_var("CNI_IFNAME")?,
        netns,
        args: spec::parse_cni_args(&env::var("CNI_ARGS").unwrap_or_default()),
    })
}

/// The value of a variable the specification requires.
fn env_var(name: &str) -> Result<String, CniError> {
    env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .ok_or_else(|| missing(name))
}

fn missing(name: &str) -> CniError {
    CniError::new(
        code::INVALID_ENVIRONMENT,
        format!("{name} is not set"),
        format!("the container runtime must set {name} (CNI specification, section 2)"),
    )
}

/// The version to answer in: the configuration's `cniVersion` when it is one this plugin
/// speaks, else the newest.
fn answer_version(stdin: &[u8]) -> String {
    serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|v| v.get("cniVersion")?.as_str().map(str::to_owned))
        .filter(|v| spec::SUPPORTED_VERSIONS.contains(&v.as_str()))
        .unwrap_or_else(|| spec::NEWEST_VERSION.to_owned())
}
