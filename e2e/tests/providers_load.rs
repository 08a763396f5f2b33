//! Loadability of the provider stand-ins `libmlx5.so.1` and `libefa.so.1` that `freeflow up`
//! puts in DIR/verbs beside Freeflow's `libibverbs.so.1` (shim/providers).
//!
//! With DIR/verbs on the library path, every Debian library or program linked against rdma-core's
//! providers gets the stand-ins instead, and the loader must find each versioned symbol it
//! imports: libfabric (linked with immediate binding, so `fi_info` and every MPI program died
//! before `main` with "undefined symbol: efadv_create_cq, version EFA_1.2"), UCX's `libuct_ib`,
//! python3-pyverbs' provider modules (rdma-core's own test suite imports them), perftest.
//!
//! 1. Every symbol with an MLX5_* or EFA_* version that those packages' ELF files import is
//!    exported by the built stand-in at the same version (`objdump -T` on both sides).
//! 2. Each of those libraries, and each stand-in, loads with `RTLD_NOW` (Debian's python3
//!    `ctypes`, which dlopens with it) in a registered container with DIR/verbs on the path.
//! 3. Debian's `fi_info` and `ucx_info -d` run there, exiting as they do in the same container
//!    without Freeflow, and no loader error is printed.
//!
//! Needs root, a built workspace and the Debian packages libfabric-bin, ucx-utils,
//! python3-pyverbs and perftest (scripts/test.sh installs them), and binutils' objdump (gcc's
//! dependency).

mod common;

use common::{describe, require_programs, target_dir, Site, SiteSpec};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The Debian packages whose files link rdma-core's providers.
const LINKING_PACKAGES: &[&str] = &["libfabric1", "libucx0", "python3-pyverbs", "perftest"];
/// The file names of the stand-ins in DIR/verbs and the providers they replace.
const STAND_INS: &[&str] = &["libmlx5.so.1", "libefa.so.1"];
/// Debian's python, which has pyverbs (not a python3 earlier on the PATH).
const DEBIAN_PYTHON: &str = "/usr/bin/python3";

fn objdump(args: &[&str], file: &Path) -> String {
    let out = Command::new("objdump")
        .args(args)
        .arg(file)
        .output()
        .unwrap();
    assert!(out.status.success(), "objdump {file:?}: {}", describe(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Every ELF file of [`LINKING_PACKAGES`] that names a provider in its DT_NEEDED entries.
fn files_linking_providers() -> Vec<PathBuf> {
    require_programs(
        &["objdump", "dpkg", "fi_info", "ucx_info", DEBIAN_PYTHON],
        "binutils libfabric-bin ucx-utils python3-pyverbs perftest",
    );
    let out = Command::new("dpkg")
        .arg("-L")
        .args(LINKING_PACKAGES)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "dpkg -L {LINKING_PACKAGES:?} (apt-get install them; scripts/test.sh does): {}",
        describe(&out)
    );
    let mut files: BTreeSet<PathBuf> = BTreeSet::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let path = Path::new(line);
        let Ok(real) = path.canonicalize() else {
            continue;
        };
        let is_elf = std::fs::read(&real).is_ok_and(|bytes| bytes.starts_with(b"\x7fELF"));
        if is_elf && links_a_provider(&real) {
            files.insert(real);
        }
    }
    files.into_iter().collect()
}

fn links_a_provider(file: &Path) -> bool {
    objdump(&["-p"], file).lines().any(|line| {
        let mut words = line.split_whitespace();
        words.next() == Some("NEEDED") && words.next().is_some_and(|lib| STAND_INS.contains(&lib))
    })
}

/// `(version node, name)` of the dynamic symbols of `file` with an MLX5_* or EFA_* version:
/// the undefined ones (`imported`) or the defined ones.
fn provider_symbols(file: &Path, imported: bool) -> BTreeSet<(String, String)> {
    objdump(&["-T"], file)
        .lines()
        .filter(|line| line.contains("*UND*") == imported)
        .filter_map(|line| {
            let mut words = line.split_whitespace().rev();
            let name = words.next()?;
            let node = words.next()?.trim_matches(|c| c == '(' || c == ')');
            (node.starts_with("MLX5_") || node.starts_with("EFA_"))
                .then(|| (node.to_string(), name.to_string()))
        })
        .collect()
}

#[test]
fn every_provider_symbol_debian_imports_is_exported_at_its_version() {
    let files = files_linking_providers();
    let names: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
    for expected in [
        "libfabric.so",
        "libuct_ib.so",
        "ib_send_bw",
        "mlx5dv.cpython",
    ] {
        assert!(
            names.iter().any(|n| n.contains(expected)),
            "no {expected} among the files linking a provider: {names:#?}"
        );
    }
    let stand_in = target_dir().join("libfreeflow_providers.so");
    let exported = provider_symbols(&stand_in, false);
    let mut missing = Vec::new();
    let mut imported_anywhere = BTreeSet::new();
    for file in &files {
        for symbol in provider_symbols(file, true) {
            if !exported.contains(&symbol) {
                missing.push(format!("{}@{} ({})", symbol.1, symbol.0, file.display()));
            }
            imported_anywhere.insert(symbol);
        }
    }
    assert!(
        missing.is_empty(),
        "the stand-in lacks {} imports:\n{}",
        missing.len(),
        missing.join("\n")
    );
    eprintln!(
        "{} files import {} provider symbols; the stand-in exports {}",
        files.len(),
        imported_anywhere.len(),
        exported.len()
    );
}

/// One host with Freeflow up and container `client` (tenant blue) registered.
fn site(prefix: &str) -> Site {
    common::require_built(&["libfreeflow_providers.so"]);
    Site::create_verbs(SiteSpec {
        prefix,
        work_prefix: "ff-providers-load",
        hosts: 1,
        containers: &[(0, "client", [10, 32, 0, 3])],
        registered: &[("client", "blue")],
        verbs_timeout: 60,
        ..SiteSpec::default()
    })
}

#[test]
fn debian_libraries_linking_the_providers_load_with_rtld_now_in_a_container() {
    let files = files_linking_providers();
    let site = site("pvl");
    let verbs = site.dirs[0].join("verbs");
    let stand_ins = STAND_INS.iter().map(|name| verbs.join(name));
    let libraries = files
        .iter()
        .filter(|f| f.to_string_lossy().contains(".so"))
        .cloned();
    let mut failed = Vec::new();
    let mut loaded = 0;
    for library in stand_ins.chain(libraries) {
        let out = site
            .verbs_app("client", DEBIAN_PYTHON, &[])
            .args([
                "-c",
                "import ctypes, os, sys; ctypes.CDLL(sys.argv[1], mode=os.RTLD_NOW)",
            ])
            .arg(&library)
            .output()
            .unwrap();
        if out.status.success() {
            loaded += 1;
        } else {
            failed.push(format!("{}: {}", library.display(), describe(&out)));
        }
    }
    assert!(failed.is_empty(), "not loadable:\n{}", failed.join("\n"));
    assert!(loaded > STAND_INS.len() + 1, "only {loaded} loaded");
    eprintln!("{loaded} libraries loaded with RTLD_NOW");
}

#[test]
fn fi_info_and_ucx_info_run_in_a_container_with_the_verbs_library() {
    require_programs(&["fi_info", "ucx_info"], "libfabric-bin ucx-utils");
    let site = site("pvi");
    for (program, args) in [("fi_info", &[][..]), ("ucx_info", &["-d"][..])] {
        // The same program in the same container with Debian's libibverbs and no device.
        let plain = site
            .shim_env("client", false)
            .args(["timeout", "-s", "KILL", "60", program])
            .args(args)
            .output()
            .unwrap();
        let with_freeflow = site
            .verbs_app("client", program, &[])
            .args(args)
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&with_freeflow.stderr);
        for loader_error in [
            "undefined symbol",
            "symbol lookup error",
            "cannot open shared",
        ] {
            assert!(
                !said.contains(loader_error),
                "{program} with DIR/verbs: {}",
                describe(&with_freeflow)
            );
        }
        assert_eq!(
            with_freeflow.status.code(),
            plain.status.code(),
            "{program}: with DIR/verbs {}\nwithout: {}",
            describe(&with_freeflow),
            describe(&plain)
        );
    }
}

/// Run by `sh -c` in a private mount namespace (`unshare -m`) in a container: /dev becomes a
/// private tmpfs holding what UCX needs (null, zero, urandom, a tmpfs /dev/shm) and
/// /dev/infiniband/ffuverbs0, a symbolic link to /dev/null; then `ucx_info -d`. `$1` is an
/// empty directory to keep the real /dev reachable while the tmpfs is filled. The mounts vanish
/// with the namespace.
const UCX_WITH_A_UVERBS_NODE: &str = "set -e; old=$1; mount --bind /dev $old; \
    mount -t tmpfs freeflow-dev /dev; \
    for f in null zero urandom random; do touch /dev/$f; mount --bind $old/$f /dev/$f; done; \
    mkdir /dev/shm /dev/infiniband; mount -t tmpfs freeflow-shm /dev/shm; \
    ln -s /dev/null /dev/infiniband/ffuverbs0; exec ucx_info -d";

/// What UCX (1.13, libuct_ib's `uct_ib_device_is_accessible`) checks before it lists a verbs
/// device: that "/dev/infiniband/" + the device's `dev_name` (Freeflow's: ffuverbs0) is a
/// character device the user may read and write. Without one, ffv0 is skipped; with one (here
/// /dev/null under that name, as `docker run --device /dev/null:/dev/infiniband/ffuverbs0` would
/// give a container without privileges), UCX opens ffv0 through the stand-in libmlx5 (which
/// declines) and Freeflow's libibverbs, and lists its rc_verbs transport.
#[test]
fn ucx_lists_ffv0_when_its_uverbs_node_is_a_character_device() {
    require_programs(
        &["ucx_info", "unshare", "mount"],
        "ucx-utils util-linux mount",
    );
    let site = site("pvu");
    let without = site
        .verbs_app("client", "ucx_info", &[])
        .arg("-d")
        .output()
        .unwrap();
    assert!(without.status.success(), "{}", describe(&without));
    let listed = String::from_utf8_lossy(&without.stdout);
    assert!(!listed.contains("Memory domain: ffv0"), "{listed}");
    let old_dev = site.work.join("old-dev");
    std::fs::create_dir(&old_dev).unwrap();
    let with = site
        .verbs_app("client", "unshare", &[])
        .args(["-m", "--propagation", "private", "sh", "-c"])
        .arg(UCX_WITH_A_UVERBS_NODE)
        .arg("sh")
        .arg(&old_dev)
        .output()
        .unwrap();
    assert!(with.status.success(), "{}", describe(&with));
    let listed = String::from_utf8_lossy(&with.stdout);
    let ffv0 = listed
        .split("# Memory domain: ")
        .find(|domain| domain.starts_with("ffv0"))
        .unwrap_or_else(|| panic!("UCX did not list ffv0:\n{}", describe(&with)));
    assert!(ffv0.contains("Transport: rc_verbs"), "{ffv0}");
    assert!(ffv0.contains("Device: ffv0:1"), "{ffv0}");
}
