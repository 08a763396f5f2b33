//! Reading a child's stdout and stderr while waiting for it, so that a child that says a lot
//! cannot stall on a full pipe.

use std::io::Read;
use std::process::Child;
use std::thread::JoinHandle;

/// Threads reading a child's two pipes to their end.
pub struct Pipes {
    stdout: JoinHandle<String>,
    stderr: JoinHandle<String>,
}

impl Pipes {
    /// Takes `child`'s piped stdout and stderr (a pipe not set up reads as empty).
    pub fn take(child: &mut Child) -> Pipes {
        Pipes {
            stdout: read_all(child.stdout.take().map(|p| Box::new(p) as _)),
            stderr: read_all(child.stderr.take().map(|p| Box::new(p) as _)),
        }
    }

    /// What the child wrote: (stdout, stderr). Call it after the child exited.
    pub fn join(self) -> (String, String) {
        (
            self.stdout.join().unwrap_or_default(),
            self.stderr.join().unwrap_or_default(),
        )
    }
}

fn read_all(pipe: Option<Box<dyn Read + Send>>) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut text = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut text);
        }
        String::from_utf8_lossy(&text).into_owned()
    })
}
