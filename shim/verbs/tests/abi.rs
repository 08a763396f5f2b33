//! The built library as the dynamic loader sees it: its SONAME, version nodes and versioned
//! symbols, compared with rdma-core's own `libibverbs.so.1` and with what Debian's ibverbs-utils
//! binaries import; and those binaries loading it outside any container (no router: no device).
//! Needs the built library (`cargo build --workspace`), binutils, and the Debian packages
//! ibverbs-utils (scripts/test.sh installs them).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// rdma-core's library, the reference.
const REAL_LIBRARY: &str = "/usr/lib/x86_64-linux-gnu/libibverbs.so.1";

/// Symbols of rdma-core's library that this one leaves out on purpose: the interface between
/// libibverbs and its kernel-driver providers (IBVERBS_PRIVATE_34, apart from
/// `ibv_query_gid_type`, which `ibv_devinfo` imports) and the pre-1.1 compatibility entry
/// points. (The kernel-structure converters `ibv_copy_*` are in: rdma-core's librdmacm, which
/// perftest links, binds them at load time.)
fn left_out(name: &str) -> bool {
    name.starts_with("ibv_cmd_")
        || name.starts_with("verbs_")
        || name.starts_with("_verbs_")
        || name.starts_with("__")
        || matches!(
            name,
            "execute_ioctl" | "ibv_read_ibdev_sysfs_file" | "ibv_register_driver"
        )
}

fn library() -> PathBuf {
    // target/<profile>/deps/<test> -> target/<profile>/libibverbs.so
    let exe = std::env::current_exe().unwrap();
    let path = exe
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("libibverbs.so");
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace` first",
        path.display()
    );
    path
}

fn run(program: &str, args: &[&str], file: &Path) -> String {
    let out = Command::new(program)
        .args(args)
        .arg(file)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e} (binutils installed?)"));
    assert!(out.status.success(), "{program} {}", file.display());
    String::from_utf8(out.stdout).unwrap()
}

/// Dynamic symbols as (name, version) for definitions (`objdump -T`); the version is
/// `@@NODE` for a default version, `@NODE` for a hidden (compatibility) one.
fn defined(file: &Path) -> BTreeSet<(String, String)> {
    symbols(file, true)
}

/// Imported symbols as (name, node).
fn imported(file: &Path) -> BTreeSet<(String, String)> {
    symbols(file, false)
}

fn symbols(file: &Path, definitions: bool) -> BTreeSet<(String, String)> {
    run("objdump", &["-T"], file)
        .lines()
        .filter(|l| l.starts_with(|c: char| c.is_ascii_hexdigit()))
        .filter(|l| l.contains("*UND*") != definitions)
        .filter_map(|l| {
            let mut fields = l.split_whitespace().rev();
            let name = fields.next()?.to_string();
            let version = fields.next()?;
            let version = match version.strip_prefix('(') {
                Some(hidden) if definitions => format!("@{}", hidden.trim_end_matches(')')),
                Some(needed) => needed.trim_end_matches(')').to_string(),
                None => format!("@@{version}"),
            };
            Some((name, version))
        })
        .collect()
}

/// Version definitions (`readelf -V`), without the base (the file name).
fn version_nodes(file: &Path) -> BTreeSet<String> {
    run("readelf", &["-V", "-W"], file)
        .lines()
        .skip_while(|l| !l.starts_with("Version definition"))
        .take_while(|l| !l.starts_with("Version needs"))
        .filter(|l| l.contains("Flags: none"))
        .filter_map(|l| l.split("Name: ").nth(1).map(|n| n.trim().to_string()))
        .collect()
}

#[test]
fn soname_and_version_nodes_are_rdma_cores() {
    let ours = library();
    let dynamic = run("readelf", &["-d", "-W"], &ours);
    assert!(
        dynamic.contains("Library soname: [libibverbs.so.1]"),
        "SONAME:\n{dynamic}"
    );
    assert!(
        !dynamic.contains("libibverbs.so.1.") && !dynamic.contains("[libibverbs.so]"),
        "must not depend on another libibverbs:\n{dynamic}"
    );
    let nodes = version_nodes(&ours);
    assert_eq!(nodes, version_nodes(Path::new(REAL_LIBRARY)));
    assert!(nodes.contains("IBVERBS_1.0") && nodes.contains("IBVERBS_1.14"));
}

#[test]
fn every_public_verb_has_rdma_cores_default_version() {
    let ours = defined(&library());
    let ours_by_name: BTreeMap<&str, &str> = ours
        .iter()
        .filter(|(_, v)| v.starts_with("@@"))
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect();
    let mut missing = Vec::new();
    for (name, version) in defined(Path::new(REAL_LIBRARY)) {
        // The real library also defines each node's name as an absolute symbol.
        if !version.starts_with("@@") || name.starts_with("IBVERBS_") || left_out(&name) {
            continue;
        }
        if ours_by_name.get(name.as_str()) != Some(&version.as_str()) {
            missing.push(format!(
                "{name}{version} (ours: {:?})",
                ours_by_name.get(name.as_str())
            ));
        }
    }
    assert!(
        missing.is_empty(),
        "not defined as rdma-core does:\n{}",
        missing.join("\n")
    );
    // Nothing of the verbs API is left unversioned (Base), where binaries would not find it.
    let unversioned: Vec<&String> = ours
        .iter()
        .filter(|(n, v)| {
            (n.starts_with("ibv_") || n.starts_with("_ibv_")) && !v.contains("IBVERBS")
        })
        .map(|(n, _)| n)
        .collect();
    assert!(unversioned.is_empty(), "unversioned: {unversioned:?}");
}

fn ibverbs_utils() -> Vec<PathBuf> {
    let programs: Vec<PathBuf> = std::fs::read_dir("/usr/bin")
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("ibv_"))
        })
        .collect();
    assert!(
        programs.iter().any(|p| p.ends_with("ibv_devinfo")),
        "ibv_devinfo missing: apt-get install ibverbs-utils (scripts/test.sh does)"
    );
    programs
}

#[test]
fn every_verb_ibverbs_utils_import_is_defined_with_its_version() {
    let ours = defined(&library());
    let mut missing = Vec::new();
    for program in ibverbs_utils() {
        for (name, node) in imported(&program) {
            if !node.starts_with("IBVERBS") {
                continue;
            }
            let default = (name.clone(), format!("@@{node}"));
            let hidden = (name.clone(), format!("@{node}"));
            if !ours.contains(&default) && !ours.contains(&hidden) {
                missing.push(format!("{}: {name}@{node}", program.display()));
            }
        }
    }
    assert!(missing.is_empty(), "missing:\n{}", missing.join("\n"));
}

/// A directory holding the library under its SONAME, as `freeflow up` installs it.
struct Installed {
    dir: PathBuf,
}

impl Installed {
    fn new(tag: &str) -> Installed {
        let dir = std::env::temp_dir().join(format!("ff-verbs-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("verbs")).unwrap();
        std::fs::copy(library(), dir.join("verbs/libibverbs.so.1")).unwrap();
        Installed { dir }
    }

    /// `program` with the library, `FREEFLOW_DIR` at a directory with no router, every symbol
    /// bound at load (a missing one fails at once).
    fn run(&self, program: &Path, args: &[&str], debug: bool) -> Output {
        Command::new("timeout")
            .args(["-s", "KILL", "30"])
            .arg(program)
            .args(args)
            .env("LD_LIBRARY_PATH", self.dir.join("verbs"))
            .env("FREEFLOW_DIR", &self.dir)
            .env("LD_BIND_NOW", "1")
            .env("FREEFLOW_DEBUG", if debug { "1" } else { "0" })
            .output()
            .unwrap()
    }
}

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn text(out: &Output) -> String {
    format!(
        "status {:?}\n--- stdout\n{}--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn without_a_router_the_programs_load_and_find_no_device() {
    let installed = Installed::new("norouter");
    let devinfo = Path::new("/usr/bin/ibv_devinfo");
    let out = installed.run(devinfo, &[], false);
    assert_eq!(out.status.code(), Some(255), "{}", text(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "No IB devices found",
        "{}",
        text(&out)
    );
    let out = installed.run(devinfo, &["-l"], true);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("0 HCAs found"),
        "{}",
        text(&out)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no Freeflow router"),
        "FREEFLOW_DEBUG=1 says why:\n{}",
        text(&out)
    );
    // Every ibverbs-utils program loads (all symbols bound) and reports no device; none crashes.
    for program in ibverbs_utils() {
        let out = installed.run(&program, &[], false);
        let all = text(&out);
        assert!(
            !all.contains("symbol lookup error") && !all.contains("version `IBVERBS"),
            "{}: {all}",
            program.display()
        );
        // 0 (ibv_devices), 1 or 255 (-1): the programs' own "no device" exits. A crash or the
        // timeout's KILL would be a signal or 128 + signal.
        assert!(
            matches!(out.status.code(), Some(0 | 1 | 255)),
            "{} crashed or hung: {all}",
            program.display()
        );
    }
}
