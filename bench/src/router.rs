//! Starting and stopping a private freeflow-router for an experiment.

use freeflow_proto::control::{
    self, ContainerEntry, ControlRequest, ControlResponse, RouterStatus,
};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct PrivateRouter {
    pub dir: PathBuf,
    pub child: Child,
}

/// The router binary: `$FREEFLOW_ROUTER`, else next to this executable.
pub fn router_binary() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("FREEFLOW_ROUTER") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let candidate = exe.with_file_name("freeflow-router");
    if candidate.exists() {
        Ok(candidate)
    } else {
        Err(format!(
            "freeflow-router not found at {} (build the workspace, or set FREEFLOW_ROUTER)",
            candidate.display()
        ))
    }
}

impl PrivateRouter {
    /// Starts a router on `cores` in a fresh directory and waits until its control socket answers.
    pub fn start(tag: &str, cores: &str) -> Result<PrivateRouter, String> {
        let dir = std::env::temp_dir().join(format!("freeflow-bench-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let log = std::fs::File::create(dir.join("router.log")).map_err(|e| e.to_string())?;
        let child = Command::new(router_binary()?)
            .arg("--dir")
            .arg(&dir)
            .arg("--cores")
            .arg(cores)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("starting freeflow-router: {e}"))?;
        let mut router = PrivateRouter { dir, child };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if router.status().is_ok() {
                return Ok(router);
            }
            if let Ok(Some(status)) = router.child.try_wait() {
                return Err(format!(
                    "router exited during start ({status}); see {}",
                    router.dir.join("router.log").display()
                ));
            }
            if Instant::now() > deadline {
                return Err("router did not become ready within 10 s".into());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The router's control socket, in the state directory it derived from its `--dir`.
    pub fn control_path(&self) -> PathBuf {
        freeflow_proto::paths::state_dir(&self.dir).join(freeflow_proto::CONTROL_SOCKET)
    }

    pub fn set_containers(&self, containers: Vec<ContainerEntry>) -> Result<(), String> {
        match control::call(
            &self.control_path(),
            &ControlRequest::SetContainers {
                containers,
                network: None,
                generation: None,
            },
            Duration::from_secs(5),
        ) {
            Ok(ControlResponse::Ok) => Ok(()),
            Ok(other) => Err(format!("router answered {other:?}")),
            Err(e) => Err(e.to_string()),
        }
    }

    pub fn status(&self) -> Result<RouterStatus, String> {
        match control::call(
            &self.control_path(),
            &ControlRequest::Status,
            Duration::from_secs(5),
        ) {
            Ok(ControlResponse::Status(s)) => Ok(s),
            Ok(other) => Err(format!("router answered {other:?}")),
            Err(e) => Err(e.to_string()),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for PrivateRouter {
    fn drop(&mut self) {
        let _ = control::call(
            &self.control_path(),
            &ControlRequest::Shutdown,
            Duration::from_secs(2),
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        // The default one only: never a directory the user chose with FREEFLOW_STATE_DIR.
        let _ = std::fs::remove_dir_all(freeflow_proto::paths::default_state_dir(&self.dir));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// CPU time (user + system) of process `pid` so far, from /proc.
pub fn cpu_time(pid: u32) -> Result<Duration, String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).map_err(|e| e.to_string())?;
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').ok_or("bad /proc stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields
        .get(11)
        .and_then(|v| v.parse().ok())
        .ok_or("bad utime")?;
    let stime: u64 = fields
        .get(12)
        .and_then(|v| v.parse().ok())
        .ok_or("bad stime")?;
    let ticks = freeflow_os::process::clock_ticks_per_second();
    Ok(Duration::from_nanos(
        (utime + stime) * 1_000_000_000 / ticks,
    ))
}
