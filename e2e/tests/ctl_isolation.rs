//! A root process in a registered container must not reach the control plane: the router's
//! control socket answers nobody outside the router's own network namespace (issue 10, finding
//! 1), and what a container sees of the Freeflow directory through the documented read-only
//! mount is the attach socket and the shims, none of them writable, and no control file
//! (finding 2).
//!
//! The attacker is root in a container's network namespace, running `python3` or `sh`; the
//! victim is Debian's unmodified `ibv_devices` loading Freeflow's verbs library. Needs root, a
//! built workspace, python3, util-linux's `unshare` and ibverbs-utils.
//!
//! The Site scaffolding is in common/mod.rs.

mod common;

use common::{describe, Site, SiteSpec};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// Connects to the Unix socket argv[1], sends the line argv[2], and prints what came back:
/// `ANSWER <line>`, `CLOSED` (the peer closed without a word) or `ERROR <reason>`. Every wait
/// is bounded (5 s).
const CONTROL_CLIENT: &str = r#"
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(5)
try:
    s.connect(sys.argv[1])
    s.sendall(sys.argv[2].encode() + b"\n")
    data = b""
    while b"\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    print("ANSWER " + data.decode(errors="replace").strip() if data else "CLOSED")
except Exception as e:
    print("ERROR %s" % e)
"#;

/// One host; `victim` (tenant blue) and `attacker` (tenant red) registered.
fn site(prefix: &str) -> Site {
    common::require_programs(
        &["python3", "unshare", "ibv_devices"],
        "python3, util-linux, ibverbs-utils",
    );
    Site::create_verbs(SiteSpec {
        prefix,
        work_prefix: "ff-ctl",
        hosts: 1,
        containers: &[
            (0, "victim", [10, 32, 0, 2]),
            (0, "attacker", [10, 32, 0, 3]),
        ],
        registered: &[("victim", "blue"), ("attacker", "red")],
        verbs_timeout: 20,
        ..SiteSpec::default()
    })
}

/// `ibv_devices` in `container` lists Freeflow's device, that is, its shim attached.
fn attaches(site: &Site, container: &str) -> Result<(), String> {
    let out = site.run_verbs_app(container, "ibv_devices", &[]);
    if out.status.success() && String::from_utf8_lossy(&out.stdout).contains("ffv0") {
        Ok(())
    } else {
        Err(describe(&out))
    }
}

/// The router's count of registered containers, as the host's `freeflow status` shows it.
fn registered(site: &Site) -> u64 {
    site.router_counter(0, "registered")
}

#[test]
fn root_in_a_container_cannot_use_the_control_socket() {
    let site = site("ci");
    assert_eq!(registered(&site), 2, "{}", site.router_log());
    attaches(&site, "victim").expect("the victim attaches before the attack");

    let socket = site.control_socket(0);
    let attacker = site.cluster().container("attacker").unwrap().netns.clone();
    for request in [
        r#"{"op":"set_containers","containers":[]}"#,
        r#"{"op":"status"}"#,
    ] {
        let out = site
            .cluster()
            .command_in(&attacker, "python3")
            .args(["-c", CONTROL_CLIENT])
            .arg(&socket)
            .arg(request)
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        assert!(
            !said.starts_with("ANSWER"),
            "the router answered {request} from a container: {said}\n{}",
            describe(&out)
        );
    }

    // The table is what the daemon pushed: the victim still attaches, the count is unchanged.
    assert_eq!(registered(&site), 2, "{}", site.router_log());
    if let Err(e) = attaches(&site, "victim") {
        panic!("the victim no longer attaches: {e}\n{}", site.router_log());
    }
    assert!(
        site.router_log().contains("control connection refused"),
        "the router did not log the refusal:\n{}",
        site.router_log()
    );
}

/// What a container may see in DIR: the attach socket and the shims.
const VISIBLE: &[&str] = &["libfsocket.so", "router.sock", "verbs"];
const VISIBLE_IN_VERBS: &[&str] = &[
    "libefa.so.1",
    "libibverbs.so.1",
    "libmlx5.so.1",
    "librdmacm.so.1",
];

#[test]
fn a_container_with_the_documented_mount_cannot_change_the_shims_or_see_control_files() {
    let site = site("cm");
    let dir = site.dirs[0].clone();
    let d = dir.display().to_string();
    // The documented mount, `-v DIR:DIR:ro`, in a mount namespace of the attacker's own.
    let script = format!(
        "mount --bind {d} {d} && mount -o remount,bind,ro {d} || exit 99
         for f in {d}/libfsocket.so {d}/verbs/libibverbs.so.1; do
           if echo hijacked > $f; then echo WROTE $f; fi
           if cp /bin/true $f.new && mv -f $f.new $f; then echo REPLACED $f; fi
         done
         echo DIR $(ls -A {d})
         echo VERBS $(ls -A {d}/verbs)"
    );
    let attacker = site.cluster().container("attacker").unwrap().netns.clone();
    let out = site
        .cluster()
        .command_in(&attacker, "unshare")
        .args(["-m", "sh", "-c", &script])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{}", describe(&out));
    assert!(
        !said.contains("WROTE") && !said.contains("REPLACED"),
        "a container changed a shim: {}",
        describe(&out)
    );
    let listed = |tag: &str| -> Vec<String> {
        let line = said
            .lines()
            .find(|l| l.starts_with(tag))
            .unwrap_or_default();
        line.split_whitespace().skip(1).map(str::to_owned).collect()
    };
    assert_eq!(
        listed("DIR "),
        VISIBLE,
        "a container sees more than it needs in {d}"
    );
    assert_eq!(listed("VERBS "), VISIBLE_IN_VERBS, "in {d}/verbs");

    // And the shims are read-only files, so no process writes them by mistake either.
    for shim in ["libfsocket.so", "verbs/libibverbs.so.1"] {
        let mode = std::fs::metadata(Path::new(&dir).join(shim))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o444, "{shim} has mode {mode:o}");
    }
    attaches(&site, "victim").expect("the victim's shim still loads and attaches");
}
