//! The shim loads into an unmodified program and leaves its networking alone.

use std::path::PathBuf;
use std::process::Command;

fn shim_path() -> PathBuf {
    // target/<profile>/deps/<test> -> target/<profile>/libfsocket.so
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(|d| d.parent()).unwrap();
    let path = profile_dir.join("libfsocket.so");
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace` first",
        path.display()
    );
    path
}

#[test]
fn preloaded_into_a_program_that_uses_tcp_changes_nothing() {
    let shim = shim_path();
    // A real program that listens and connects over TCP on loopback, with the shim preloaded.
    let script = r#"
import socket
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(1)
cli = socket.create_connection(srv.getsockname(), timeout=5)
conn, _ = srv.accept()
cli.sendall(b"freeflow"); print(conn.recv(8).decode())
"#;
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .env("LD_PRELOAD", &shim)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "freeflow");
    // The loader really mapped the shim (LD_DEBUG would be noisier; /proc maps is exact).
    let maps = Command::new("sh")
        .arg("-c")
        .arg("cat /proc/self/maps")
        .env("LD_PRELOAD", &shim)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&maps.stdout).contains("libfsocket.so"));
}
