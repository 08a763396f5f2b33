//! The jail's two eBPF programs, written out instruction by instruction (no compiler at run
//! time). Both read the socket's mark through the context's `sk` pointer (`struct bpf_sock`,
//! which the verifier lets programs of these types read, as a 4-byte load of `mark`), and
//! answer 0 (the kernel's EPERM) for a socket carrying a Freeflow mark, 1 (go on) otherwise.

use super::kernel::Insn;
use super::{CONNECTION_MARK, LISTENER_MARK};

/// `enum bpf_prog_type`: BPF_PROG_TYPE_CGROUP_SOCK_ADDR.
pub const PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
/// `enum bpf_prog_type`: BPF_PROG_TYPE_CGROUP_SOCKOPT.
pub const PROG_TYPE_CGROUP_SOCKOPT: u32 = 25;
/// `enum bpf_attach_type`: BPF_CGROUP_INET4_CONNECT.
pub const ATTACH_INET4_CONNECT: u32 = 10;
/// `enum bpf_attach_type`: BPF_CGROUP_INET6_CONNECT.
pub const ATTACH_INET6_CONNECT: u32 = 11;
/// `enum bpf_attach_type`: BPF_CGROUP_SETSOCKOPT.
pub const ATTACH_SETSOCKOPT: u32 = 22;

/// `offsetof(struct bpf_sock_addr, sk)`: after eleven u32 fields, 8-aligned.
const SOCK_ADDR_SK: i16 = 64;
/// `offsetof(struct bpf_sockopt, sk)`.
const SOCKOPT_SK: i16 = 0;
/// `offsetof(struct bpf_sockopt, level)`: after three 8-byte pointers.
const SOCKOPT_LEVEL: i16 = 24;
/// `offsetof(struct bpf_sockopt, optname)`.
const SOCKOPT_OPTNAME: i16 = 28;
/// `offsetof(struct bpf_sock, mark)`: after bound_dev_if, family, type, protocol.
const SOCK_MARK: i16 = 16;

/// BPF_LDX | BPF_MEM | BPF_DW: dst = *(u64 *)(src + off).
const LDX_DW: u8 = 0x79;
/// BPF_LDX | BPF_MEM | BPF_W: dst = *(u32 *)(src + off).
const LDX_W: u8 = 0x61;
/// BPF_ALU64 | BPF_MOV | BPF_K: dst = imm.
const MOV_IMM: u8 = 0xb7;
/// BPF_JMP | BPF_JEQ | BPF_K: if dst == imm, skip `off` instructions.
const JEQ_IMM: u8 = 0x15;
/// BPF_JMP | BPF_JNE | BPF_K: if dst != imm, skip `off` instructions.
const JNE_IMM: u8 = 0x55;
/// BPF_JMP | BPF_EXIT: return r0.
const EXIT: u8 = 0x95;

/// Registers used: r0 (the answer), r1 (the context, on entry), r2 (scratch).
const R0: u8 = 0;
const R1: u8 = 1;
const R2: u8 = 2;

const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: dst | (src << 4),
        off,
        imm,
    }
}

/// The marks compared as immediates: both below 2^31, so the sign-extended 32-bit immediate
/// equals the zero-extended 32-bit mark in the 64-bit register.
const CONN: i32 = CONNECTION_MARK as i32;
const LISTEN: i32 = LISTENER_MARK as i32;
const _: () = assert!(CONN > 0 && LISTEN > 0);

/// At BPF_CGROUP_INET{4,6}_CONNECT (context `struct bpf_sock_addr`): refuses a connect on a
/// socket with a Freeflow mark. The router's own connect comes before it sets the mark.
pub const CONNECT_GUARD: [Insn; 8] = [
    // 0: r2 = ctx->sk (a `struct bpf_sock *`, never NULL at this hook)
    insn(LDX_DW, R2, R1, SOCK_ADDR_SK, 0),
    // 1: r2 = sk->mark
    insn(LDX_W, R2, R2, SOCK_MARK, 0),
    // 2: r0 = 1 (allow)
    insn(MOV_IMM, R0, 0, 0, 1),
    // 3: if r2 == connection mark goto 6
    insn(JEQ_IMM, R2, 0, 2, CONN),
    // 4: if r2 == listener mark goto 6
    insn(JEQ_IMM, R2, 0, 1, LISTEN),
    // 5: return 1
    insn(EXIT, 0, 0, 0, 0),
    // 6: r0 = 0 (refuse: EPERM)
    insn(MOV_IMM, R0, 0, 0, 0),
    // 7: return 0
    insn(EXIT, 0, 0, 0, 0),
];

/// At BPF_CGROUP_SETSOCKOPT (context `struct bpf_sockopt`): refuses setsockopt(SOL_SOCKET,
/// SO_MARK) on a socket that has a Freeflow mark, so that a process with CAP_NET_RAW in the
/// host's user namespace (a container without a user namespace keeps it by default) cannot
/// clear the mark; every other option goes on to the kernel untouched.
pub const MARK_GUARD: [Insn; 12] = [
    // 0: r0 = 1 (allow)
    insn(MOV_IMM, R0, 0, 0, 1),
    // 1: r2 = ctx->level
    insn(LDX_W, R2, R1, SOCKOPT_LEVEL, 0),
    // 2: if r2 != SOL_SOCKET goto 9
    insn(JNE_IMM, R2, 0, 6, libc::SOL_SOCKET),
    // 3: r2 = ctx->optname
    insn(LDX_W, R2, R1, SOCKOPT_OPTNAME, 0),
    // 4: if r2 != SO_MARK goto 9
    insn(JNE_IMM, R2, 0, 4, libc::SO_MARK),
    // 5: r2 = ctx->sk
    insn(LDX_DW, R2, R1, SOCKOPT_SK, 0),
    // 6: r2 = sk->mark
    insn(LDX_W, R2, R2, SOCK_MARK, 0),
    // 7: if r2 == connection mark goto 10
    insn(JEQ_IMM, R2, 0, 2, CONN),
    // 8: if r2 == listener mark goto 10
    insn(JEQ_IMM, R2, 0, 1, LISTEN),
    // 9: return 1
    insn(EXIT, 0, 0, 0, 0),
    // 10: r0 = 0 (refuse: EPERM)
    insn(MOV_IMM, R0, 0, 0, 0),
    // 11: return 0
    insn(EXIT, 0, 0, 0, 0),
];

#[cfg(test)]
mod tests {
    use super::*;

    /// Every jump lands inside the program, and every path ends in an exit with r0 set.
    fn check_jumps(prog: &[Insn]) {
        for (i, ins) in prog.iter().enumerate() {
            if ins.code == JEQ_IMM || ins.code == JNE_IMM {
                let to = i as i64 + 1 + ins.off as i64;
                assert!(to > i as i64 && (to as usize) < prog.len(), "jump at {i}");
            }
        }
        assert_eq!(prog.last().unwrap().code, EXIT);
    }

    #[test]
    fn jumps_stay_inside() {
        check_jumps(&CONNECT_GUARD);
        check_jumps(&MARK_GUARD);
    }

    #[test]
    fn encoding_matches_struct_bpf_insn() {
        // r2 = *(u64 *)(r1 + 64): opcode 0x79, dst 2 in the low nibble, src 1 in the high.
        let i = CONNECT_GUARD[0];
        assert_eq!((i.code, i.regs, i.off, i.imm), (0x79, 0x12, 64, 0));
        assert_eq!(size_of::<Insn>(), 8);
    }
}
