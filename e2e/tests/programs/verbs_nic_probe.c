/* The opcodes the hardware backend's device path carries (e2e/tests/verbs_nic.rs runs it as a
 * container of the nested router H): two RC QPs of one process, connected to each other at the
 * container's own GID, each with a CQ of its own:
 *   SEND, SEND_WITH_IMM, RDMA WRITE, RDMA WRITE_WITH_IMM, RDMA READ, an inline SEND, each
 *   checked byte for byte (and the immediate data);
 *   a WRITE with a forged rkey: REM_ACCESS_ERR, nothing written, both QPs in ERR and the
 *   WRITE behind it flushed (WR_FLUSH_ERR);
 *   after RESET and reconnecting: compare-and-swap and fetch-and-add, the old values and the
 *   word checked; after another reconnect a SEND works again.
 * Usage: probe OWN_IP. Prints "checks passed". */
#include "verbs_probe.h"
#include <arpa/inet.h>

#define BUF 65536

static void fill(unsigned char *p, size_t n, unsigned seed)
{
    for (size_t i = 0; i < n; i++)
        p[i] = (unsigned char)(i * 31 + seed);
}

static int post_imm(struct ibv_qp *qp, enum ibv_wr_opcode op, uint64_t id, void *buf,
                    uint32_t len, uint32_t lkey, uint32_t imm, uint64_t raddr, uint32_t rkey)
{
    struct ibv_sge sge = { .addr = (uintptr_t)buf, .length = len, .lkey = lkey };
    struct ibv_send_wr wr = { .wr_id = id, .sg_list = &sge, .num_sge = 1, .opcode = op,
                              .send_flags = SIG }, *bad = NULL;
    wr.imm_data = htonl(imm);
    wr.wr.rdma.remote_addr = raddr;
    wr.wr.rdma.rkey = rkey;
    return ibv_post_send(qp, &wr, &bad);
}

/* The receive completion on cq: wr_id, status, opcode, length and immediate data checked. */
static void expect_recv(struct ibv_cq *cq, uint64_t id, int opcode, uint32_t len, int imm,
                        uint32_t imm_value, const char *what)
{
    struct ibv_wc wc;
    memset(&wc, 0, sizeof(wc));
    CHECK(wait_wc(cq, &wc, 3000), "%s: no receive completion", what);
    CHECK(wc.wr_id == id && wc.status == IBV_WC_SUCCESS && (int)wc.opcode == opcode &&
              wc.byte_len == len,
          "%s: wr_id %" PRIu64 " status %s opcode %d byte_len %u", what, wc.wr_id,
          ibv_wc_status_str(wc.status), wc.opcode, wc.byte_len);
    if (imm)
        CHECK((wc.wc_flags & IBV_WC_WITH_IMM) && ntohl(wc.imm_data) == imm_value,
              "%s: wc_flags %#x imm %#x", what, wc.wc_flags, ntohl(wc.imm_data));
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        printf("usage: probe OWN_IP\n");
        return 2;
    }
    union ibv_gid gid = gid_of(argv[1]);
    struct ibv_context *ctx = open_device();
    struct ibv_pd *pd = ibv_alloc_pd(ctx);
    struct ibv_cq *cqx = ibv_create_cq(ctx, 64, NULL, NULL, 0);
    struct ibv_cq *cqy = ibv_create_cq(ctx, 64, NULL, NULL, 0);
    unsigned char *a = aligned_alloc(4096, BUF), *b = aligned_alloc(4096, BUF);
    memset(a, 0, BUF);
    memset(b, 0, BUF);
    struct ibv_mr *ma = pd ? ibv_reg_mr(pd, a, BUF, ALL_ACCESS) : NULL;
    struct ibv_mr *mb = pd ? ibv_reg_mr(pd, b, BUF, ALL_ACCESS) : NULL;
    if (!pd || !cqx || !cqy || !ma || !mb) {
        printf("setup: %s\n", strerror(errno));
        return 1;
    }
    struct ibv_qp_init_attr init = { .send_cq = cqx, .recv_cq = cqx, .qp_type = IBV_QPT_RC,
                                     .cap = { .max_send_wr = 16, .max_recv_wr = 16,
                                              .max_send_sge = 1, .max_recv_sge = 1,
                                              .max_inline_data = 64 } };
    struct ibv_qp *x = ibv_create_qp(pd, &init);
    init.send_cq = cqy;
    init.recv_cq = cqy;
    struct ibv_qp *y = ibv_create_qp(pd, &init);
    if (!x || !y) {
        printf("create_qp: %s\n", strerror(errno));
        return 1;
    }
    CHECK(connect_qp_pair(x, y, gid, ALL_ACCESS, 7, 12) == 0, "connect");

    /* SEND */
    fill(a, 4096, 1);
    CHECK(post_recv(y, 10, b, 4096, mb->lkey) == 0, "post_recv");
    CHECK(post(x, IBV_WR_SEND, 11, a, 4096, ma->lkey, SIG, 0, 0) == 0, "post SEND");
    EXPECT(cqx, 11, IBV_WC_SUCCESS, IBV_WC_SEND, "SEND");
    expect_recv(cqy, 10, IBV_WC_RECV, 4096, 0, 0, "SEND received");
    CHECK(memcmp(a, b, 4096) == 0, "SEND: bytes differ");

    /* SEND_WITH_IMM */
    fill(a, 1000, 2);
    CHECK(post_recv(y, 20, b, 4096, mb->lkey) == 0, "post_recv");
    CHECK(post_imm(x, IBV_WR_SEND_WITH_IMM, 21, a, 1000, ma->lkey, 0xc0ffee, 0, 0) == 0,
          "post SEND_WITH_IMM");
    EXPECT(cqx, 21, IBV_WC_SUCCESS, IBV_WC_SEND, "SEND_WITH_IMM");
    expect_recv(cqy, 20, IBV_WC_RECV, 1000, 1, 0xc0ffee, "SEND_WITH_IMM received");
    CHECK(memcmp(a, b, 1000) == 0, "SEND_WITH_IMM: bytes differ");

    /* RDMA WRITE, 40000 bytes at an offset */
    fill(a, 40000, 3);
    CHECK(post(x, IBV_WR_RDMA_WRITE, 31, a, 40000, ma->lkey, SIG, (uintptr_t)b + 100,
               mb->rkey) == 0, "post WRITE");
    EXPECT(cqx, 31, IBV_WC_SUCCESS, IBV_WC_RDMA_WRITE, "WRITE");
    CHECK(memcmp(a, b + 100, 40000) == 0, "WRITE: bytes differ");

    /* RDMA WRITE_WITH_IMM (consumes a receive) */
    fill(a, 2000, 4);
    CHECK(post_recv(y, 40, b, 16, mb->lkey) == 0, "post_recv");
    CHECK(post_imm(x, IBV_WR_RDMA_WRITE_WITH_IMM, 41, a, 2000, ma->lkey, 0x4242,
                   (uintptr_t)b + 8192, mb->rkey) == 0, "post WRITE_WITH_IMM");
    EXPECT(cqx, 41, IBV_WC_SUCCESS, IBV_WC_RDMA_WRITE, "WRITE_WITH_IMM");
    expect_recv(cqy, 40, IBV_WC_RECV_RDMA_WITH_IMM, 2000, 1, 0x4242, "WRITE_WITH_IMM received");
    CHECK(memcmp(a, b + 8192, 2000) == 0, "WRITE_WITH_IMM: bytes differ");

    /* RDMA READ */
    fill(b + 20000, 30000, 5);
    memset(a, 0, BUF);
    CHECK(post(x, IBV_WR_RDMA_READ, 51, a, 30000, ma->lkey, SIG, (uintptr_t)b + 20000,
               mb->rkey) == 0, "post READ");
    EXPECT(cqx, 51, IBV_WC_SUCCESS, IBV_WC_RDMA_READ, "READ");
    CHECK(memcmp(a, b + 20000, 30000) == 0, "READ: bytes differ");

    /* An inline SEND from a stack buffer (no key) */
    unsigned char small[48];
    fill(small, sizeof(small), 6);
    CHECK(post_recv(y, 60, b, 4096, mb->lkey) == 0, "post_recv");
    CHECK(post(x, IBV_WR_SEND, 61, small, sizeof(small), 0, SIG | IBV_SEND_INLINE, 0, 0) == 0,
          "post inline SEND");
    memset(small + 1, 0, sizeof(small) - 1);
    EXPECT(cqx, 61, IBV_WC_SUCCESS, IBV_WC_SEND, "inline SEND");
    expect_recv(cqy, 60, IBV_WC_RECV, sizeof(small), 0, 0, "inline SEND received");
    unsigned char want[48];
    fill(want, sizeof(want), 6);
    CHECK(memcmp(want, b, sizeof(want)) == 0, "inline SEND: bytes differ");

    /* A forged rkey: REM_ACCESS_ERR, nothing written, the QP in ERR, the next WRITE flushed. */
    memset(b, 0x11, 4096);
    fill(a, 4096, 7);
    CHECK(post(x, IBV_WR_RDMA_WRITE, 71, a, 4096, ma->lkey, SIG, (uintptr_t)b,
               mb->rkey ^ 0x5a5a00) == 0, "post forged WRITE");
    CHECK(post(x, IBV_WR_RDMA_WRITE, 72, a, 4096, ma->lkey, SIG, (uintptr_t)b, mb->rkey) == 0,
          "post WRITE behind it");
    EXPECT(cqx, 71, IBV_WC_REM_ACCESS_ERR, -1, "forged rkey");
    EXPECT(cqx, 72, IBV_WC_WR_FLUSH_ERR, -1, "WRITE behind the forged one");
    for (int i = 0; i < 4096; i++)
        if (b[i] != 0x11) {
            CHECK(0, "forged rkey: byte %d written", i);
            break;
        }
    CHECK(state_of(x) == IBV_QPS_ERR, "forged rkey: QP state %d", state_of(x));
    /* The responder's QP too (a remote access error is the responder's as well). */
    CHECK(state_of(y) == IBV_QPS_ERR, "forged rkey: responder QP state %d", state_of(y));

    /* Atomics on an aligned word of y's region: compare-and-swap, fetch-and-add, a
     * compare-and-swap whose compare fails; each brings the old value back. */
    CHECK(connect_qp_pair(x, y, gid, ALL_ACCESS, 7, 12) == 0, "reconnect");
    {
        uint64_t *word = (uint64_t *)(b + 4096), *old = (uint64_t *)a;
        *word = 100;
        CHECK(post_atomic(x, IBV_WR_ATOMIC_CMP_AND_SWP, 81, a, ma->lkey, (uintptr_t)word,
                          mb->rkey, 100, 200) == 0, "post CMP_AND_SWP");
        EXPECT(cqx, 81, IBV_WC_SUCCESS, IBV_WC_COMP_SWAP, "CMP_AND_SWP");
        CHECK(*old == 100 && *word == 200, "CMP_AND_SWP: old %" PRIu64 " word %" PRIu64, *old,
              *word);
        CHECK(post_atomic(x, IBV_WR_ATOMIC_FETCH_AND_ADD, 82, a, ma->lkey, (uintptr_t)word,
                          mb->rkey, 5, 0) == 0, "post FETCH_AND_ADD");
        EXPECT(cqx, 82, IBV_WC_SUCCESS, IBV_WC_FETCH_ADD, "FETCH_AND_ADD");
        CHECK(*old == 200 && *word == 205, "FETCH_AND_ADD: old %" PRIu64 " word %" PRIu64, *old,
              *word);
        CHECK(post_atomic(x, IBV_WR_ATOMIC_CMP_AND_SWP, 83, a, ma->lkey, (uintptr_t)word,
                          mb->rkey, 1, 7) == 0, "post CMP_AND_SWP");
        EXPECT(cqx, 83, IBV_WC_SUCCESS, IBV_WC_COMP_SWAP, "CMP_AND_SWP, compare fails");
        CHECK(*old == 205 && *word == 205, "CMP_AND_SWP (no swap): old %" PRIu64 " word %" PRIu64,
              *old, *word);
    }

    /* Reconnected again, a SEND works. */
    CHECK(connect_qp_pair(x, y, gid, ALL_ACCESS, 7, 12) == 0, "reconnect");
    fill(a, 64, 8);
    CHECK(post_recv(y, 90, b, 4096, mb->lkey) == 0, "post_recv");
    CHECK(post(x, IBV_WR_SEND, 91, a, 64, ma->lkey, SIG, 0, 0) == 0, "post SEND");
    EXPECT(cqx, 91, IBV_WC_SUCCESS, IBV_WC_SEND, "SEND after reconnect");
    expect_recv(cqy, 90, IBV_WC_RECV, 64, 0, 0, "SEND after reconnect received");
    CHECK(memcmp(a, b, 64) == 0, "SEND after reconnect: bytes differ");

    /* The peer QP destroyed: the survivor posts nothing to the device QP number that
     * another QP may get next; its SEND exhausts its retries, as on a device. */
    CHECK(ibv_destroy_qp(y) == 0, "destroy the peer QP");
    CHECK(post(x, IBV_WR_SEND, 92, a, 64, ma->lkey, SIG, 0, 0) == 0, "post SEND to a gone peer");
    EXPECT(cqx, 92, IBV_WC_RETRY_EXC_ERR, IBV_WC_SEND, "SEND to a destroyed peer");
    CHECK(state_of(x) == IBV_QPS_ERR, "gone peer: QP state %d", state_of(x));

    ibv_destroy_qp(x);
    ibv_dereg_mr(ma);
    ibv_dereg_mr(mb);
    ibv_destroy_cq(cqx);
    ibv_destroy_cq(cqy);
    ibv_dealloc_pd(pd);
    ibv_close_device(ctx);
    return verdict("checks passed");
}
