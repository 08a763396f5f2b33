//! Who may use the control socket `router.ctl`: only root in the router's own network namespace
//! ([`freeflow_proto::identity::check_control_peer`]), never a container. Anyone else's connection is closed
//! without an answer, and logged: one line at most every [`LOG_EVERY`], counting the ones in
//! between, so that a container that keeps trying cannot grow the log.

use freeflow_proto::identity::check_control_peer;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Least time between two log lines about refused control connections.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// When the last refusal was logged, and how many were not logged since.
static REFUSALS: Mutex<RefusalLog> = Mutex::new(RefusalLog {
    last_logged: None,
    unlogged: 0,
});

struct RefusalLog {
    last_logged: Option<Instant>,
    unlogged: u64,
}

impl RefusalLog {
    /// Whether to log a refusal now; if so, how many went unlogged before it.
    fn note(&mut self, now: Instant) -> Option<u64> {
        match self.last_logged {
            Some(last) if now.duration_since(last) < LOG_EVERY => {
                self.unlogged += 1;
                None
            }
            _ => {
                self.last_logged = Some(now);
                Some(std::mem::take(&mut self.unlogged))
            }
        }
    }
}

/// Whether the caller at the other end of `stream` may use the control socket; if not, the
/// refusal is logged (rate-limited) and the caller must be dropped without an answer.
pub fn admit(stream: &UnixStream) -> bool {
    let Err(e) = check_control_peer(stream.as_fd()) else {
        return true;
    };
    let unlogged = match REFUSALS.lock() {
        Ok(mut refusals) => refusals.note(Instant::now()),
        Err(_) => Some(0),
    };
    if let Some(unlogged) = unlogged {
        let more = if unlogged > 0 {
            format!(" ({unlogged} more refused since the last such line)")
        } else {
            String::new()
        };
        log::warn!("control connection refused: {e}{more}");
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_logged_once_per_interval_with_a_count_of_the_rest() {
        let mut log = RefusalLog {
            last_logged: None,
            unlogged: 0,
        };
        let t0 = Instant::now();
        assert_eq!(log.note(t0), Some(0));
        assert_eq!(log.note(t0 + Duration::from_secs(1)), None);
        assert_eq!(log.note(t0 + Duration::from_secs(9)), None);
        assert_eq!(log.note(t0 + LOG_EVERY), Some(2));
        assert_eq!(log.note(t0 + LOG_EVERY * 3), Some(0));
    }

    #[test]
    fn root_in_this_network_namespace_is_admitted() {
        let (a, _b) = UnixStream::pair().unwrap();
        assert_eq!(admit(&a), freeflow_os::process::effective_uid() == 0);
    }
}
