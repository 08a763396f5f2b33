//! The descriptions and conversions libibverbs exports for its enums: `ibv_*_str` and the
//! rate conversions. Pure functions of the values in `verbs.h`.

use std::ffi::CStr;

/// `ibv_node_type_str`.
pub fn node_type(value: i32) -> &'static CStr {
    match value {
        1 => c"InfiniBand channel adapter",
        2 => c"InfiniBand switch",
        3 => c"InfiniBand router",
        4 => c"iWARP NIC",
        5 => c"usNIC",
        6 => c"usNIC UDP",
        7 => c"unspecified",
        _ => c"unknown",
    }
}

/// `ibv_port_state_str`.
pub fn port_state(value: u32) -> &'static CStr {
    match value {
        0 => c"no state change (NOP)",
        1 => c"down",
        2 => c"init",
        3 => c"armed",
        4 => c"active",
        5 => c"active defer",
        _ => c"unknown",
    }
}

/// `ibv_event_type_str`.
pub fn event_type(value: u32) -> &'static CStr {
    const NAMES: [&CStr; 20] = [
        c"CQ error",
        c"local work queue catastrophic error",
        c"invalid request local work queue error",
        c"local access violation work queue error",
        c"communication established",
        c"send queue drained",
        c"path migrated",
        c"path migration request error",
        c"local catastrophic error",
        c"port active",
        c"port error",
        c"LID change",
        c"P_Key change",
        c"SM change",
        c"SRQ catastrophic error",
        c"SRQ limit reached",
        c"last WQE reached",
        c"client reregistration",
        c"GID table change",
        c"WQ fatal",
    ];
    NAMES.get(value as usize).copied().unwrap_or(c"unknown")
}

/// `ibv_wc_status_str`.
pub fn wc_status(value: u32) -> &'static CStr {
    const NAMES: [&CStr; 24] = [
        c"success",
        c"local length error",
        c"local QP operation error",
        c"local EE context operation error",
        c"local protection error",
        c"Work Request Flushed Error",
        c"memory window bind error",
        c"bad response error",
        c"local access error",
        c"remote invalid request error",
        c"remote access error",
        c"remote operation error",
        c"transport retry counter exceeded",
        c"RNR retry counter exceeded",
        c"local RDD violation error",
        c"remote invalid RD request",
        c"aborted error",
        c"invalid EE context number",
        c"invalid EE context state",
        c"fatal error",
        c"response timeout error",
        c"general error",
        c"TM error",
        c"TM software rendezvous",
    ];
    NAMES.get(value as usize).copied().unwrap_or(c"unknown")
}

/// `enum ibv_rate` values with their nominal speed in Mbit/s. The conversions below use the
/// nominal figures (FDR's 14 Gbit/s rather than its 14.0625 signalling rate, and so on).
const RATES: [(i32, i32); 23] = [
    (2, 2_500),
    (5, 5_000),
    (3, 10_000),
    (6, 20_000),
    (4, 30_000),
    (7, 40_000),
    (8, 60_000),
    (9, 80_000),
    (10, 120_000),
    (11, 14_000),
    (12, 56_000),
    (13, 112_000),
    (14, 168_000),
    (15, 25_000),
    (16, 100_000),
    (17, 200_000),
    (18, 300_000),
    (19, 28_000),
    (20, 50_000),
    (21, 400_000),
    (22, 600_000),
    (23, 800_000),
    (24, 1_200_000),
];

/// `IBV_RATE_MAX`: "the fastest the path allows", also the answer for an unknown speed.
const RATE_MAX: i32 = 0;

/// `ibv_rate_to_mbps`: Mbit/s, or -1 for `IBV_RATE_MAX` and unknown values.
pub fn rate_to_mbps(rate: i32) -> i32 {
    RATES
        .iter()
        .find(|(r, _)| *r == rate)
        .map_or(-1, |(_, mbps)| *mbps)
}

/// `mbps_to_ibv_rate`: the rate of exactly that nominal speed, else `IBV_RATE_MAX`.
pub fn mbps_to_rate(mbps: i32) -> i32 {
    RATES
        .iter()
        .find(|(_, m)| *m == mbps)
        .map_or(RATE_MAX, |(r, _)| *r)
}

/// `ibv_rate_to_mult`: the speed as a multiple of 2.5 Gbit/s, or -1 if it is not one.
pub fn rate_to_mult(rate: i32) -> i32 {
    match rate_to_mbps(rate) {
        mbps if mbps > 0 && mbps % 2_500 == 0 => mbps / 2_500,
        _ => -1,
    }
}

/// `mult_to_ibv_rate`: the rate of that multiple of 2.5 Gbit/s, else `IBV_RATE_MAX`.
pub fn mult_to_rate(mult: i32) -> i32 {
    match mult.checked_mul(2_500) {
        Some(mbps) if mult > 0 => mbps_to_rate(mbps),
        _ => RATE_MAX,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings() {
        assert_eq!(port_state(4), c"active");
        assert_eq!(node_type(1), c"InfiniBand channel adapter");
        assert_eq!(node_type(-1), c"unknown");
        assert_eq!(wc_status(0), c"success");
        assert_eq!(wc_status(5), c"Work Request Flushed Error");
        assert_eq!(wc_status(99), c"unknown");
        assert_eq!(event_type(9), c"port active");
    }

    #[test]
    fn rates() {
        assert_eq!(rate_to_mbps(2), 2_500);
        assert_eq!(rate_to_mbps(16), 100_000);
        assert_eq!(rate_to_mbps(0), -1);
        assert_eq!(rate_to_mult(3), 4);
        assert_eq!(rate_to_mult(11), -1);
        assert_eq!(mult_to_rate(4), 3);
        assert_eq!(mult_to_rate(40), 16);
        assert_eq!(mult_to_rate(7), 0);
        assert_eq!(mult_to_rate(i32::MAX), 0);
        assert_eq!(mbps_to_rate(25_000), 15);
        assert_eq!(mbps_to_rate(1), 0);
        for (rate, _) in RATES {
            assert_eq!(mbps_to_rate(rate_to_mbps(rate)), rate);
        }
    }
}
