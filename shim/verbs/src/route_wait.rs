//! Waiting for the router to learn a destination. A container registered on another host a
//! moment ago reaches this host's router through the registry within a few hundred
//! milliseconds (the daemon's watch, then a table push): a program that got the peer's GID and
//! QP number over its own socket in that window would otherwise have `ibv_modify_qp` to RTR
//! (or `ibv_create_ah`) refused as unreachable, where a real device resolves the address and
//! connects. So a verb naming an IPv4-mapped destination the router refuses as unreachable
//! asks again, every [`RETRY_EVERY`], for at most `FREEFLOW_ROUTE_WAIT_MS` (default
//! [`DEFAULT_WAIT`]; 0: refuse at once). The router changes nothing when it refuses, so asking
//! again is safe. An address that never becomes reachable (another tenant's, nobody's) fails
//! after the wait with ENETUNREACH, as before, and the two cases take the same time: the wait
//! tells a container nothing about other tenants.

use crate::error::VerbsError;
use freeflow_proto::verbs::VerbsStatus;
use std::time::{Duration, Instant};

/// How long a verb waits for a destination by default: the registry's propagation to every
/// host took p99 0.3-0.5 s at 32 hosts on a loaded 2-core machine (README, "The cluster").
pub const DEFAULT_WAIT: Duration = Duration::from_secs(2);
/// How often the router is asked again meanwhile.
const RETRY_EVERY: Duration = Duration::from_millis(20);
/// The longest wait the environment may ask for.
const MAX_WAIT: Duration = Duration::from_secs(60);

/// The wait `FREEFLOW_ROUTE_WAIT_MS` asks for (milliseconds, at most [`MAX_WAIT`]); the
/// default when unset or unreadable.
fn configured_wait(value: Option<&str>) -> Duration {
    value
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map_or(DEFAULT_WAIT, |ms| Duration::from_millis(ms).min(MAX_WAIT))
}

/// Whether `gid` is an IPv4-mapped address (`::ffff:a.b.c.d`): the only destinations the
/// router can ever learn (any other GID is refused for good).
fn is_ipv4_mapped(gid: &[u8; 16]) -> bool {
    gid[..10].iter().all(|&b| b == 0) && gid[10] == 0xff && gid[11] == 0xff
}

/// Runs `call` (a request naming destination `gid`), asking again while the router refuses
/// the destination as unreachable, within the configured wait.
pub fn waiting_for_route<T>(
    gid: &[u8; 16],
    what: &str,
    call: impl FnMut() -> Result<T, VerbsError>,
) -> Result<T, VerbsError> {
    let wait = configured_wait(std::env::var("FREEFLOW_ROUTE_WAIT_MS").ok().as_deref());
    retry_unreachable(gid, what, wait, RETRY_EVERY, call)
}

fn retry_unreachable<T>(
    gid: &[u8; 16],
    what: &str,
    wait: Duration,
    every: Duration,
    mut call: impl FnMut() -> Result<T, VerbsError>,
) -> Result<T, VerbsError> {
    let deadline = Instant::now() + wait;
    let mut said = false;
    loop {
        match call() {
            Err(VerbsError::RouterRefused(VerbsStatus::Unreachable))
                if is_ipv4_mapped(gid) && Instant::now() + every <= deadline =>
            {
                if !said {
                    crate::registry::debug(format_args!(
                        "{what}: the router does not know the destination {}.{}.{}.{} yet; \
                         asking again for up to {} ms",
                        gid[12],
                        gid[13],
                        gid[14],
                        gid[15],
                        wait.as_millis()
                    ));
                    said = true;
                }
                std::thread::sleep(every);
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    const MAPPED: [u8; 16] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 32, 0, 2];
    const UNREACHABLE: VerbsError = VerbsError::RouterRefused(VerbsStatus::Unreachable);

    #[test]
    fn the_wait_comes_from_the_environment_within_bounds() {
        assert_eq!(configured_wait(None), DEFAULT_WAIT);
        assert_eq!(configured_wait(Some("250")), Duration::from_millis(250));
        assert_eq!(configured_wait(Some("0")), Duration::ZERO);
        assert_eq!(configured_wait(Some("lots")), DEFAULT_WAIT);
        assert_eq!(configured_wait(Some("99999999")), MAX_WAIT);
    }

    #[test]
    fn an_unreachable_destination_is_asked_again_until_the_router_knows_it() {
        let calls = Cell::new(0);
        let result = retry_unreachable(
            &MAPPED,
            "test",
            Duration::from_secs(10),
            Duration::from_millis(1),
            || {
                calls.set(calls.get() + 1);
                if calls.get() < 4 {
                    Err(UNREACHABLE)
                } else {
                    Ok(7)
                }
            },
        );
        assert_eq!(result.unwrap(), 7);
        assert_eq!(calls.get(), 4);
    }

    #[test]
    fn the_wait_ends_with_the_refusal() {
        let calls = Cell::new(0);
        let result: Result<(), _> = retry_unreachable(
            &MAPPED,
            "test",
            Duration::from_millis(30),
            Duration::from_millis(5),
            || {
                calls.set(calls.get() + 1);
                Err(UNREACHABLE)
            },
        );
        assert!(matches!(
            result,
            Err(VerbsError::RouterRefused(VerbsStatus::Unreachable))
        ));
        assert!(calls.get() >= 2 && calls.get() <= 7, "{}", calls.get());
    }

    #[test]
    fn other_refusals_and_other_gids_are_not_asked_again() {
        let calls = Cell::new(0);
        let invalid: Result<(), _> = retry_unreachable(
            &MAPPED,
            "test",
            Duration::from_secs(10),
            Duration::from_millis(1),
            || {
                calls.set(calls.get() + 1);
                Err(VerbsError::RouterRefused(VerbsStatus::Invalid))
            },
        );
        assert!(invalid.is_err());
        assert_eq!(calls.get(), 1);
        let mut not_mapped = MAPPED;
        not_mapped[10] = 0;
        let unmapped: Result<(), _> = retry_unreachable(
            &not_mapped,
            "test",
            Duration::from_secs(10),
            Duration::from_millis(1),
            || {
                calls.set(calls.get() + 1);
                Err(UNREACHABLE)
            },
        );
        assert!(unmapped.is_err());
        assert_eq!(calls.get(), 2);
        let no_wait: Result<(), _> = retry_unreachable(
            &MAPPED,
            "test",
            Duration::ZERO,
            Duration::from_millis(1),
            || {
                calls.set(calls.get() + 1);
                Err(UNREACHABLE)
            },
        );
        assert!(no_wait.is_err());
        assert_eq!(calls.get(), 3);
    }
}
