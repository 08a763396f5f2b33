//! Address handles (`ibv_create_ah`, `ibv_destroy_ah`): the destination of UD sends. The router
//! resolves the address vector once, at creation (a container of the caller's tenant, as an RC
//! QP's at RTR); a UD send names the handle (see [`super::work::UdDest`]).

use crate::codec::sequential_body;

/// Body of [`super::op::CREATE_AH`]: the protection domain and `struct ibv_ah_attr`, flattened.
/// Reply [`super::ObjectHandle`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CreateAh {
    pub pd: u32,
    /// `grh.dgid`.
    pub dgid: [u8; 16],
    pub flow_label: u32,
    pub sgid_index: u8,
    pub hop_limit: u8,
    pub traffic_class: u8,
    pub is_global: u8,
    pub dlid: u16,
    pub sl: u8,
    pub src_path_bits: u8,
    pub static_rate: u8,
    pub port_num: u8,
}

sequential_body!(CreateAh {
    pd: u32,
    dgid: [u8; 16],
    flow_label: u32,
    sgid_index: u8,
    hop_limit: u8,
    traffic_class: u8,
    is_global: u8,
    dlid: u16,
    sl: u8,
    src_path_bits: u8,
    static_rate: u8,
    port_num: u8,
});

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::Body;

    #[test]
    fn create_ah_round_trips() {
        let mut dgid = [0u8; 16];
        dgid[10] = 0xff;
        dgid[11] = 0xff;
        dgid[12..].copy_from_slice(&[10, 32, 0, 3]);
        let a = CreateAh {
            pd: 7,
            dgid,
            flow_label: 0x12345,
            sgid_index: 0,
            hop_limit: 64,
            traffic_class: 3,
            is_global: 1,
            dlid: 0,
            sl: 2,
            src_path_bits: 0,
            static_rate: 0,
            port_num: 1,
        };
        let mut buf = [0u8; 64];
        let n = a.encode(&mut buf);
        assert_eq!(CreateAh::decode(&buf[..n]).unwrap(), a);
    }
}
