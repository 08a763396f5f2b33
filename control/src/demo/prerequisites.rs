//! What the RDMA part needs on this machine, and getting it: freeflow-bench builds its measuring
//! program (C) against the verbs headers, so the part needs a C compiler and libibverbs-dev. A
//! fresh Debian machine with a Rust toolchain has the compiler (Rust links with `cc`) but not
//! the headers, so the demo installs what is missing with apt-get, as scripts/test.sh does,
//! unless `--no-install` is given or there is no apt-get; then the part is skipped (or, asked
//! for alone, fails) saying what to install.

use std::ffi::OsStr;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::child::{last_words, run_child, Seen};
use super::error::DemoError;
use super::signals::Interrupt;

/// What to install when the RDMA part cannot run.
const RDMA_INSTALL_HINT: &str = "install build-essential libibverbs-dev";
/// The Debian packages the measuring program is built with: the verbs headers and library, a C
/// compiler and the C library's headers.
const RDMA_PACKAGES: &[&str] = &["libibverbs-dev", "gcc", "libc6-dev"];

/// `Ok` if freeflow-bench can build its RDMA measuring program here: a C compiler (`cc`) and the
/// verbs headers and library (libibverbs-dev). Else why not, with what to install. Compiles and
/// links a two-line program, as freeflow-bench will (a tenth of a second).
pub(super) fn rdma_prerequisites() -> Result<(), String> {
    let output =
        std::env::temp_dir().join(format!("freeflow-demo-verbs-check-{}", std::process::id()));
    let child = Command::new("cc")
        .args(["-x", "c", "-", "-o"])
        .arg(&output)
        .arg("-libverbs")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(format!("no C compiler (cc) found; {RDMA_INSTALL_HINT}"));
        }
        Err(e) => return Err(format!("cannot run cc ({e}); {RDMA_INSTALL_HINT}")),
    };
    if let Some(mut stdin) = child.stdin.take() {
        // A failed write shows as cc's error below.
        let _ = stdin.write_all(
            b"#include <infiniband/verbs.h>\n\
              int main(void) { return ibv_get_device_list(0) != 0; }\n",
        );
    }
    let result = child.wait_with_output();
    let _ = std::fs::remove_file(&output);
    let out = result.map_err(|e| format!("waiting for cc: {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    let said = String::from_utf8_lossy(&out.stderr);
    Err(if said.contains("verbs.h") {
        format!("the verbs headers (infiniband/verbs.h) are not installed; {RDMA_INSTALL_HINT}")
    } else if said.contains("ibverbs") {
        format!("the verbs library (libibverbs.so) is not installed; {RDMA_INSTALL_HINT}")
    } else {
        format!(
            "cc cannot build a verbs program ({}); {RDMA_INSTALL_HINT}",
            last_words(&said)
        )
    })
}

/// [`rdma_prerequisites`], and if they are missing and `install` allows, installs the missing
/// [`RDMA_PACKAGES`] with apt-get and checks again. `Ok(Err(reason))`: the part cannot run
/// (without apt-get, or when nothing is missing that apt-get could add, `reason` is the first
/// check's); `Err`: interrupted, or apt-get could not be started.
pub(super) fn ensure_rdma_prerequisites(
    install: bool,
    stop: &Interrupt,
) -> Result<Result<(), String>, DemoError> {
    let reason = match rdma_prerequisites() {
        Ok(()) => return Ok(Ok(())),
        Err(reason) => reason,
    };
    let Some(apt_get) = install.then(|| find_program("apt-get")).flatten() else {
        return Ok(Err(reason));
    };
    let missing = missing_packages(RDMA_PACKAGES, is_installed);
    if missing.is_empty() {
        return Ok(Err(reason));
    }
    say(format_args!(
        "the RDMA part needs {} ({reason}): installing with apt-get (--no-install skips the \
         part instead)",
        missing.join(" ")
    ));
    if let Err(failed) = apt_install(&apt_get, &missing, stop)? {
        return Ok(Err(format!(
            "{reason}; apt-get install {} failed: {failed}",
            missing.join(" ")
        )));
    }
    Ok(rdma_prerequisites())
}

/// `apt-get install` of `packages`; when that fails (a fresh machine may have no package lists
/// yet), `apt-get update` and once more. `Ok(Err(what apt-get said))` if it still fails.
fn apt_install(
    apt_get: &Path,
    packages: &[&str],
    stop: &Interrupt,
) -> Result<Result<(), String>, DemoError> {
    let install = |stop: &Interrupt| {
        apt_get_run(
            apt_get,
            &["install", "-y", "-qq", "--no-install-recommends"],
            packages,
            stop,
        )
    };
    if install(stop)?.is_ok() {
        return Ok(Ok(()));
    }
    say("apt-get install failed; running apt-get update and trying again");
    if let Err(failed) = apt_get_run(apt_get, &["update", "-qq"], &[], stop)? {
        return Ok(Err(format!("apt-get update: {failed}")));
    }
    install(stop)
}

/// `apt-get ARGS PACKAGES` without questions; its stderr lines are shown as they come.
/// `Ok(Err(its last words))` if it fails.
fn apt_get_run(
    apt_get: &Path,
    args: &[&str],
    packages: &[&str],
    stop: &Interrupt,
) -> Result<Result<(), String>, DemoError> {
    let mut cmd = Command::new(apt_get);
    cmd.env("DEBIAN_FRONTEND", "noninteractive")
        .args(args)
        .args(packages)
        .stdin(Stdio::null());
    let finished = run_child(&mut cmd, stop, &mut |seen| {
        if let Seen::Line(line) = seen {
            say(format_args!("apt-get: {line}"));
        }
    })?;
    if finished.status.success() {
        Ok(Ok(()))
    } else {
        Ok(Err(last_words(&finished.stderr)))
    }
}

/// A progress line before the numbered steps start.
fn say(what: impl std::fmt::Display) {
    let _ = writeln!(io::stderr(), "freeflow demo: {what}");
}

/// Those of `packages` that `installed` says are not installed, in order.
fn missing_packages<'a>(packages: &[&'a str], installed: impl Fn(&str) -> bool) -> Vec<&'a str> {
    packages.iter().copied().filter(|p| !installed(p)).collect()
}

/// Whether dpkg has `package` installed (`dpkg -s` succeeds, as scripts/test.sh asks).
fn is_installed(package: &str) -> bool {
    Command::new("dpkg")
        .args(["-s", package])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `name` in a directory of `PATH`, as the shell would find it.
fn find_program(name: &str) -> Option<PathBuf> {
    find_in(std::env::var_os("PATH")?.as_os_str(), name)
}

fn find_in(path: &OsStr, name: &str) -> Option<PathBuf> {
    std::env::split_paths(path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_packages_not_installed_are_missing() {
        let installed = |p: &str| p == "gcc";
        assert_eq!(
            missing_packages(RDMA_PACKAGES, installed),
            ["libibverbs-dev", "libc6-dev"]
        );
        assert!(missing_packages(RDMA_PACKAGES, |_| true).is_empty());
    }

    #[test]
    fn programs_are_found_in_path_order() {
        let dir = std::env::temp_dir().join(format!("ff-demo-find-{}", std::process::id()));
        let (first, second) = (dir.join("a"), dir.join("b"));
        std::fs::create_dir_all(&first).unwrap();
        std::fs::create_dir_all(&second).unwrap();
        std::fs::write(second.join("apt-get"), b"").unwrap();
        let path = std::env::join_paths([&first, &second]).unwrap();
        assert_eq!(find_in(&path, "apt-get"), Some(second.join("apt-get")));
        assert_eq!(find_in(&path, "dpkg"), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
