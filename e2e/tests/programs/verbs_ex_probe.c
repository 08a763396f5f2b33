/* The extended verbs API through Freeflow's libibverbs.so.1, built against the installed headers
 * (e2e/tests/verbs_ex.rs runs it in a registered container): ibv_query_device_ex's timestamp
 * capability and ibv_query_rt_values_ex, ibv_create_cq_ex and the poll API (ibv_start_poll /
 * ibv_next_poll / ibv_end_poll, ibv_wc_read_*), completion timestamps checked against this process's own CLOCK_MONOTONIC,
 * ibv_create_qp_ex, ibv_qp_to_qp_ex and the ibv_wr_* post API for every operation (SEND,
 * SEND with immediate, inline data and inline lists, RDMA WRITE (with immediate), RDMA READ,
 * compare-and-swap, fetch-and-add, scatter/gather lists, UD addresses), batches, ibv_wr_abort,
 * and the refusals (XRC, memory windows, wall-clock timestamps, undeclared operations). */
#include "verbs_probe.h"
#include <arpa/inet.h>
#include <fcntl.h>

#define QKEY 0x11111111u
#define GRH 40
#define LEN 4096

static struct ibv_context *ctx;
static struct ibv_pd *pd;
static union ibv_gid my_gid;
static unsigned char *lbuf, *rbuf;
static struct ibv_mr *lmr, *rmr;

static uint64_t mono_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000ull + (uint64_t)t.tv_nsec;
}

/* The next completion of cq within 3 s through the poll API, its fields in *wc and its
 * timestamp in *ts; 0 on timeout or error. Takes one completion per start/end pair. */
static int poll_ex(struct ibv_cq_ex *cq, struct ibv_wc *wc, uint64_t *ts, int with_ts)
{
    struct ibv_poll_cq_attr attr = { .comp_mask = 0 };
    double end = now_ms() + 3000;
    int r;
    do {
        r = ibv_start_poll(cq, &attr);
        if (r == 0)
            break;
        if (r != ENOENT) {
            printf("start_poll: %d\n", r);
            return 0;
        }
    } while (now_ms() < end);
    if (r != 0)
        return 0;
    memset(wc, 0, sizeof(*wc));
    wc->wr_id = cq->wr_id;
    wc->status = cq->status;
    wc->opcode = ibv_wc_read_opcode(cq);
    wc->byte_len = ibv_wc_read_byte_len(cq);
    wc->imm_data = ibv_wc_read_imm_data(cq);
    wc->qp_num = ibv_wc_read_qp_num(cq);
    wc->src_qp = ibv_wc_read_src_qp(cq);
    wc->wc_flags = ibv_wc_read_wc_flags(cq);
    wc->sl = ibv_wc_read_sl(cq);
    wc->vendor_err = ibv_wc_read_vendor_err(cq);
    if (with_ts)
        *ts = ibv_wc_read_completion_ts(cq);
    ibv_end_poll(cq);
    return 1;
}

/* One completion of cq with this wr_id, status and opcode (a failed check otherwise). */
static void expect_ex(struct ibv_cq_ex *cq, uint64_t id, enum ibv_wc_opcode op, struct ibv_wc *wc,
                      const char *what, int line)
{
    uint64_t ts = 0;
    if (!poll_ex(cq, wc, &ts, 0)) {
        failures++;
        printf("FAIL line %d: %s: no completion\n", line, what);
        return;
    }
    if (wc->wr_id != id || wc->status != IBV_WC_SUCCESS || wc->opcode != op) {
        failures++;
        printf("FAIL line %d: %s: wr_id %" PRIu64 " status %s opcode %d; expected %" PRIu64
               " opcode %d\n", line, what, wc->wr_id, ibv_wc_status_str(wc->status), wc->opcode,
               id, op);
    }
}
#define EXPECT_EX(cq, id, op, wc, what) expect_ex(cq, id, op, wc, what, __LINE__)

static struct ibv_cq_ex *new_cq_ex(uint64_t wc_flags)
{
    struct ibv_cq_init_attr_ex a = { .cqe = 256, .wc_flags = wc_flags };
    return ibv_create_cq_ex(ctx, &a);
}

static struct ibv_qp *new_qp_ex(struct ibv_cq_ex *cq, enum ibv_qp_type type, uint64_t ops)
{
    struct ibv_qp_init_attr_ex a = {
        .send_cq = ibv_cq_ex_to_cq(cq), .recv_cq = ibv_cq_ex_to_cq(cq), .qp_type = type,
        .cap = { .max_send_wr = 64, .max_recv_wr = 64, .max_send_sge = 2, .max_recv_sge = 2,
                 .max_inline_data = 64 },
        .comp_mask = IBV_QP_INIT_ATTR_PD | IBV_QP_INIT_ATTR_SEND_OPS_FLAGS,
        .pd = pd, .send_ops_flags = ops };
    return ibv_create_qp_ex(ctx, &a);
}

#define RC_OPS (IBV_QP_EX_WITH_SEND | IBV_QP_EX_WITH_SEND_WITH_IMM | IBV_QP_EX_WITH_RDMA_WRITE | \
                IBV_QP_EX_WITH_RDMA_WRITE_WITH_IMM | IBV_QP_EX_WITH_RDMA_READ | \
                IBV_QP_EX_WITH_ATOMIC_CMP_AND_SWP | IBV_QP_EX_WITH_ATOMIC_FETCH_AND_ADD)

static void refusals(void)
{
    struct ibv_cq_ex *cq;
    errno = 0;
    cq = new_cq_ex(IBV_WC_EX_WITH_COMPLETION_TIMESTAMP_WALLCLOCK);
    CHECK(!cq && errno == EOPNOTSUPP, "wall-clock timestamps refused with EOPNOTSUPP");
    errno = 0;
    cq = new_cq_ex(IBV_WC_EX_WITH_CVLAN);
    CHECK(!cq && errno == EOPNOTSUPP, "CVLAN refused with EOPNOTSUPP");
    struct ibv_cq_init_attr_ex pdattr = { .cqe = 4, .comp_mask = IBV_CQ_INIT_ATTR_MASK_PD,
                                          .parent_domain = pd };
    errno = 0;
    CHECK(!ibv_create_cq_ex(ctx, &pdattr) && errno == EOPNOTSUPP, "parent domain refused");

    cq = new_cq_ex(IBV_WC_STANDARD_FLAGS);
    CHECK(cq != NULL, "create_cq_ex with the standard flags");
    if (!cq)
        return;
    struct ibv_qp_init_attr_ex xrc = { .send_cq = ibv_cq_ex_to_cq(cq),
                                       .recv_cq = ibv_cq_ex_to_cq(cq), .qp_type = IBV_QPT_XRC_SEND,
                                       .cap = { .max_send_wr = 4, .max_send_sge = 1 },
                                       .comp_mask = IBV_QP_INIT_ATTR_PD, .pd = pd };
    /* comp_mask == PD alone goes through ibv_create_qp: unsupported type, EOPNOTSUPP. */
    errno = 0;
    CHECK(!ibv_create_qp_ex(ctx, &xrc) && errno == EOPNOTSUPP, "XRC_SEND refused (plain path)");
    xrc.comp_mask = IBV_QP_INIT_ATTR_PD | IBV_QP_INIT_ATTR_SEND_OPS_FLAGS;
    xrc.send_ops_flags = IBV_QP_EX_WITH_SEND;
    errno = 0;
    CHECK(!ibv_create_qp_ex(ctx, &xrc) && errno == EOPNOTSUPP, "XRC_SEND refused (ex path)");
    xrc.qp_type = IBV_QPT_XRC_RECV;
    errno = 0;
    CHECK(!ibv_create_qp_ex(ctx, &xrc) && errno == EOPNOTSUPP, "XRC_RECV refused");
    struct ibv_xrcd_init_attr xa = { .comp_mask = IBV_XRCD_INIT_ATTR_FD |
                                                  IBV_XRCD_INIT_ATTR_OFLAGS,
                                     .fd = -1, .oflags = O_CREAT };
    errno = 0;
    CHECK(!ibv_open_xrcd(ctx, &xa) && errno == EOPNOTSUPP, "ibv_open_xrcd refused");
    errno = 0;
    CHECK(!new_qp_ex(cq, IBV_QPT_RC, IBV_QP_EX_WITH_BIND_MW) && errno == EOPNOTSUPP,
          "memory windows refused");
    errno = 0;
    CHECK(!new_qp_ex(cq, IBV_QPT_UD, IBV_QP_EX_WITH_RDMA_WRITE) && errno == EOPNOTSUPP,
          "UD RDMA WRITE refused");
    errno = 0;
    CHECK(!new_qp_ex(cq, IBV_QPT_UC, IBV_QP_EX_WITH_RDMA_READ) && errno == EOPNOTSUPP,
          "UC RDMA READ refused");

    /* A QP of ibv_create_qp has no ibv_qp_ex; one of the new API declared only SEND. */
    struct ibv_qp_init_attr plain = { .send_cq = ibv_cq_ex_to_cq(cq),
                                      .recv_cq = ibv_cq_ex_to_cq(cq), .qp_type = IBV_QPT_RC,
                                      .cap = { .max_send_wr = 4, .max_recv_wr = 4,
                                               .max_send_sge = 1, .max_recv_sge = 1 } };
    struct ibv_qp *p = ibv_create_qp(pd, &plain);
    CHECK(p && ibv_qp_to_qp_ex(p) == NULL, "no ibv_qp_ex for a plain QP");
    struct ibv_qp *s = new_qp_ex(cq, IBV_QPT_RC, IBV_QP_EX_WITH_SEND);
    struct ibv_qp_ex *sx = s ? ibv_qp_to_qp_ex(s) : NULL;
    CHECK(sx != NULL && (void *)sx == (void *)s, "ibv_qp_to_qp_ex of a new-API QP");
    if (sx) {
        CHECK(ibv_wr_complete(sx) == EINVAL, "complete without start: EINVAL");
        ibv_wr_start(sx);
        ibv_wr_rdma_write(sx, 1, 0);
        CHECK(ibv_wr_complete(sx) == EINVAL, "an undeclared operation: EINVAL");
        ibv_wr_start(sx);
        ibv_wr_set_sge(sx, lmr->lkey, (uintptr_t)lbuf, 8);
        CHECK(ibv_wr_complete(sx) == EINVAL, "a setter without an operation: EINVAL");
        ibv_wr_start(sx);
        ibv_wr_send_inv(sx, 5);
        CHECK(ibv_wr_complete(sx) == EOPNOTSUPP, "send with invalidate: EOPNOTSUPP");
        ibv_wr_start(sx);
        ibv_wr_send(sx);
        ibv_wr_set_inline_data(sx, lbuf, 1000);
        CHECK(ibv_wr_complete(sx) == EINVAL, "inline data beyond max_inline_data: EINVAL");
        /* A QP in RESET refuses posts, as ibv_post_send does. */
        ibv_wr_start(sx);
        ibv_wr_send(sx);
        ibv_wr_set_sge(sx, lmr->lkey, (uintptr_t)lbuf, 8);
        CHECK(ibv_wr_complete(sx) == EINVAL, "a post to a QP in RESET: EINVAL");
        ibv_wr_start(sx);
        CHECK(ibv_wr_complete(sx) == 0, "an empty batch");
    }
    if (s)
        ibv_destroy_qp(s);
    if (p)
        ibv_destroy_qp(p);
    CHECK(ibv_destroy_cq(ibv_cq_ex_to_cq(cq)) == 0, "destroy a cq_ex");
}

static void rc_operations(void)
{
    struct ibv_cq_ex *cq = new_cq_ex(IBV_WC_STANDARD_FLAGS | IBV_WC_EX_WITH_COMPLETION_TIMESTAMP);
    CHECK(cq != NULL, "create_cq_ex with timestamps");
    if (!cq)
        return;
    struct ibv_qp *x = new_qp_ex(cq, IBV_QPT_RC, RC_OPS), *y = new_qp_ex(cq, IBV_QPT_RC, RC_OPS);
    CHECK(x && y, "two RC QPs of create_qp_ex");
    if (!x || !y)
        return;
    CHECK(connect_qp_pair(x, y, my_gid, ALL_ACCESS, 7, 1) == 0, "connect");
    struct ibv_qp_ex *qx = ibv_qp_to_qp_ex(x);
    struct ibv_wc wc;
    uint64_t rbase = (uintptr_t)rbuf;

    /* SEND with a scatter/gather element; timestamps inside [before post, after poll]. */
    memset(lbuf, 'a', 64);
    CHECK(post_recv(y, 100, rbuf, 256, rmr->lkey) == 0, "post recv");
    uint64_t before = mono_ns(), ts_send = 0, ts_recv = 0;
    ibv_wr_start(qx);
    qx->wr_id = 1;
    qx->wr_flags = IBV_SEND_SIGNALED;
    ibv_wr_send(qx);
    ibv_wr_set_sge(qx, lmr->lkey, (uintptr_t)lbuf, 64);
    CHECK(ibv_wr_complete(qx) == 0, "post SEND");
    /* The two QPs share the CQ: the sender's and the receiver's completions come in either
     * order. */
    int send_ok = 0, recv_ok = 0;
    for (int i = 0; i < 2; i++) {
        uint64_t ts = 0;
        if (!poll_ex(cq, &wc, &ts, 1))
            break;
        if (wc.wr_id == 1 && wc.status == IBV_WC_SUCCESS && wc.opcode == IBV_WC_SEND &&
            wc.qp_num == x->qp_num) {
            send_ok = 1;
            ts_send = ts;
        } else if (wc.wr_id == 100 && wc.status == IBV_WC_SUCCESS && wc.opcode == IBV_WC_RECV &&
                   wc.byte_len == 64 && wc.qp_num == y->qp_num && wc.src_qp == x->qp_num &&
                   !(wc.wc_flags & IBV_WC_WITH_IMM)) {
            recv_ok = 1;
            ts_recv = ts;
        } else {
            printf("unexpected completion: wr_id %" PRIu64 " status %d opcode %d byte_len %u "
                   "qp %u src %u flags %#x\n", wc.wr_id, wc.status, wc.opcode, wc.byte_len,
                   wc.qp_num, wc.src_qp, wc.wc_flags);
        }
    }
    CHECK(send_ok && recv_ok, "SEND and RECV completions through the poll API");
    uint64_t after = mono_ns();
    CHECK(ts_send >= before && ts_send <= after && ts_recv >= before && ts_recv <= after,
          "timestamps %" PRIu64 " and %" PRIu64 " within [%" PRIu64 ", %" PRIu64 "]", ts_send,
          ts_recv, before, after);
    CHECK(memcmp(rbuf, lbuf, 64) == 0, "SEND data");

    /* SEND with immediate data, unsignaled then signaled (the unsignaled one completes no
     * entry of its own). */
    CHECK(post_recv(y, 101, rbuf, 256, rmr->lkey) == 0, "post recv");
    CHECK(post_recv(y, 102, rbuf, 256, rmr->lkey) == 0, "post recv");
    ibv_wr_start(qx);
    qx->wr_id = 2;
    qx->wr_flags = 0;
    ibv_wr_send_imm(qx, htonl(0x1234));
    ibv_wr_set_sge(qx, lmr->lkey, (uintptr_t)lbuf, 8);
    qx->wr_id = 3;
    qx->wr_flags = IBV_SEND_SIGNALED;
    ibv_wr_send_imm(qx, htonl(0x5678));
    ibv_wr_set_sge(qx, lmr->lkey, (uintptr_t)lbuf, 16);
    CHECK(ibv_wr_complete(qx) == 0, "post two SEND_WITH_IMM in one batch");
    /* Three completions (the unsignaled SEND has none), receives in order; the sender's in
     * any place between them (the QPs share the CQ). */
    int seen_send = 0, seen_recv = 0, recv_order_ok = 1;
    for (int i = 0; i < 3; i++) {
        uint64_t ts;
        if (!poll_ex(cq, &wc, &ts, 0))
            break;
        if (wc.wr_id == 3 && wc.opcode == IBV_WC_SEND && wc.status == IBV_WC_SUCCESS)
            seen_send = 1;
        else if (wc.wr_id == 101 && seen_recv == 0 && (wc.wc_flags & IBV_WC_WITH_IMM) &&
                 wc.imm_data == htonl(0x1234) && wc.byte_len == 8)
            seen_recv = 1;
        else if (wc.wr_id == 102 && seen_recv == 1 && (wc.wc_flags & IBV_WC_WITH_IMM) &&
                 wc.imm_data == htonl(0x5678) && wc.byte_len == 16)
            seen_recv = 2;
        else
            recv_order_ok = 0;
    }
    CHECK(seen_send && seen_recv == 2 && recv_order_ok,
          "SEND_WITH_IMM: the signaled send's completion and both receives with their immediates");

    /* Inline data, one buffer and a list: copied at the call (the buffer changes after). */
    unsigned char inl[32], inl2[16];
    memset(inl, 'i', sizeof(inl));
    memset(inl2, 'j', sizeof(inl2));
    CHECK(post_recv(y, 103, rbuf, 256, rmr->lkey) == 0, "post recv");
    CHECK(post_recv(y, 104, rbuf + 256, 256, rmr->lkey) == 0, "post recv");
    ibv_wr_start(qx);
    qx->wr_id = 4;
    qx->wr_flags = IBV_SEND_SIGNALED | IBV_SEND_INLINE;
    ibv_wr_send(qx);
    ibv_wr_set_inline_data(qx, inl, sizeof(inl));
    memset(inl, 'X', sizeof(inl));
    qx->wr_id = 5;
    ibv_wr_send(qx);
    struct ibv_data_buf list[2] = { { inl2, sizeof(inl2) }, { "tail", 4 } };
    ibv_wr_set_inline_data_list(qx, 2, list);
    CHECK(ibv_wr_complete(qx) == 0, "post inline SENDs");
    int inline_ok = 0;
    for (int i = 0; i < 4; i++) {
        uint64_t ts;
        if (!poll_ex(cq, &wc, &ts, 0))
            break;
        if (wc.wr_id == 103 && wc.byte_len == 32)
            inline_ok++;
        if (wc.wr_id == 104 && wc.byte_len == 20)
            inline_ok++;
        if ((wc.wr_id == 4 || wc.wr_id == 5) && wc.status == IBV_WC_SUCCESS)
            inline_ok++;
    }
    CHECK(inline_ok == 4, "inline completions (%d of 4)", inline_ok);
    CHECK(rbuf[0] == 'i' && rbuf[31] == 'i', "inline data copied at the call");
    CHECK(memcmp(rbuf + 256, inl2, 16) == 0 && memcmp(rbuf + 272, "tail", 4) == 0,
          "inline list data");

    /* RDMA WRITE with a scatter/gather list of two elements. */
    memset(lbuf, 'w', 100);
    memset(lbuf + 1000, 'v', 50);
    struct ibv_sge sges[2] = { { (uintptr_t)lbuf, 100, lmr->lkey },
                               { (uintptr_t)lbuf + 1000, 50, lmr->lkey } };
    ibv_wr_start(qx);
    qx->wr_id = 6;
    qx->wr_flags = IBV_SEND_SIGNALED;
    ibv_wr_rdma_write(qx, rmr->rkey, rbase + 1024);
    ibv_wr_set_sge_list(qx, 2, sges);
    CHECK(ibv_wr_complete(qx) == 0, "post RDMA WRITE");
    EXPECT_EX(cq, 6, IBV_WC_RDMA_WRITE, &wc, "RDMA WRITE");
    CHECK(rbuf[1024] == 'w' && rbuf[1123] == 'w' && rbuf[1124] == 'v' && rbuf[1173] == 'v',
          "RDMA WRITE data");

    /* RDMA WRITE with immediate: consumes a receive, carries the immediate. */
    CHECK(post_recv(y, 105, rbuf, 256, rmr->lkey) == 0, "post recv");
    ibv_wr_start(qx);
    qx->wr_id = 7;
    ibv_wr_rdma_write_imm(qx, rmr->rkey, rbase + 2048, htonl(0xabcd));
    ibv_wr_set_sge(qx, lmr->lkey, (uintptr_t)lbuf, 10);
    CHECK(ibv_wr_complete(qx) == 0, "post RDMA WRITE_WITH_IMM");
    int wimm = 0;
    for (int i = 0; i < 2; i++) {
        uint64_t ts;
        if (!poll_ex(cq, &wc, &ts, 0))
            break;
        if (wc.wr_id == 7 && wc.opcode == IBV_WC_RDMA_WRITE)
            wimm++;
        if (wc.wr_id == 105 && wc.opcode == IBV_WC_RECV_RDMA_WITH_IMM &&
            wc.imm_data == htonl(0xabcd))
            wimm++;
    }
    CHECK(wimm == 2, "WRITE_WITH_IMM completions (%d of 2)", wimm);
    CHECK(rbuf[2048] == 'w' && rbuf[2057] == 'w', "WRITE_WITH_IMM data");

    /* RDMA READ. */
    memset(rbuf + 3000, 'r', 40);
    memset(lbuf + 2000, 0, 40);
    ibv_wr_start(qx);
    qx->wr_id = 8;
    ibv_wr_rdma_read(qx, rmr->rkey, rbase + 3000);
    ibv_wr_set_sge(qx, lmr->lkey, (uintptr_t)lbuf + 2000, 40);
    CHECK(ibv_wr_complete(qx) == 0, "post RDMA READ");
    EXPECT_EX(cq, 8, IBV_WC_RDMA_READ, &wc, "RDMA READ");
    CHECK(wc.byte_len == 40 && lbuf[2000] == 'r' && lbuf[2039] == 'r', "RDMA READ data");

    /* Atomics on an 8-byte word: compare-and-swap, then fetch-and-add. */
    uint64_t *word = (uint64_t *)(rbuf + 3584), *old = (uint64_t *)(lbuf + 3584);
    *word = 7;
    *old = 0;
    ibv_wr_start(qx);
    qx->wr_id = 9;
    ibv_wr_atomic_cmp_swp(qx, rmr->rkey, rbase + 3584, 7, 42);
    ibv_wr_set_sge(qx, lmr->lkey, (uintptr_t)old, 8);
    CHECK(ibv_wr_complete(qx) == 0, "post compare-and-swap");
    EXPECT_EX(cq, 9, IBV_WC_COMP_SWAP, &wc, "compare-and-swap");
    CHECK(*old == 7 && *word == 42, "CAS: old %" PRIu64 " now %" PRIu64, *old, *word);
    ibv_wr_start(qx);
    qx->wr_id = 10;
    ibv_wr_atomic_fetch_add(qx, rmr->rkey, rbase + 3584, 5);
    ibv_wr_set_sge(qx, lmr->lkey, (uintptr_t)old, 8);
    CHECK(ibv_wr_complete(qx) == 0, "post fetch-and-add");
    EXPECT_EX(cq, 10, IBV_WC_FETCH_ADD, &wc, "fetch-and-add");
    CHECK(*old == 42 && *word == 47, "FAA: old %" PRIu64 " now %" PRIu64, *old, *word);

    /* A batch of three WRITEs completes in order; an aborted batch posts nothing. */
    ibv_wr_start(qx);
    for (uint64_t i = 0; i < 3; i++) {
        qx->wr_id = 20 + i;
        ibv_wr_rdma_write(qx, rmr->rkey, rbase + 100 * i);
        ibv_wr_set_sge(qx, lmr->lkey, (uintptr_t)lbuf, 8);
    }
    CHECK(ibv_wr_complete(qx) == 0, "post a batch of three");
    for (uint64_t i = 0; i < 3; i++)
        EXPECT_EX(cq, 20 + i, IBV_WC_RDMA_WRITE, &wc, "batch, in order");
    rbuf[3900] = 0;
    ibv_wr_start(qx);
    qx->wr_id = 30;
    ibv_wr_rdma_write(qx, rmr->rkey, rbase + 3900);
    ibv_wr_set_sge(qx, lmr->lkey, (uintptr_t)lbuf, 1);
    ibv_wr_abort(qx);
    /* Then a READ after it: its completion is the next one, and the aborted WRITE never
     * happened. */
    ibv_wr_start(qx);
    qx->wr_id = 31;
    ibv_wr_rdma_read(qx, rmr->rkey, rbase + 3900);
    ibv_wr_set_sge(qx, lmr->lkey, (uintptr_t)lbuf + 3900, 1);
    CHECK(ibv_wr_complete(qx) == 0, "post after an abort");
    EXPECT_EX(cq, 31, IBV_WC_RDMA_READ, &wc, "the READ after an abort comes next");
    CHECK(rbuf[3900] == 0, "the aborted WRITE did not happen");

    /* All or nothing: a batch whose second request ibv_post_send would refuse (inline data
     * on a READ), and a batch larger than the queue, post nothing. */
    rbuf[3950] = 0;
    ibv_wr_start(qx);
    qx->wr_id = 32;
    qx->wr_flags = 0;
    ibv_wr_rdma_write(qx, rmr->rkey, rbase + 3950);
    ibv_wr_set_sge(qx, lmr->lkey, (uintptr_t)lbuf, 1);
    qx->wr_id = 33;
    ibv_wr_rdma_read(qx, rmr->rkey, rbase + 3950);
    ibv_wr_set_inline_data(qx, lbuf, 1);
    CHECK(ibv_wr_complete(qx) == EINVAL, "a batch with a READ of inline data: EINVAL");
    ibv_wr_start(qx);
    for (uint64_t i = 0; i < 5000; i++) {
        qx->wr_id = 1000 + i;
        ibv_wr_rdma_write(qx, rmr->rkey, rbase + 3950);
        ibv_wr_set_sge(qx, lmr->lkey, (uintptr_t)lbuf, 1);
    }
    CHECK(ibv_wr_complete(qx) == ENOMEM, "a batch larger than the queue: ENOMEM");
    ibv_wr_start(qx);
    qx->wr_id = 34;
    qx->wr_flags = IBV_SEND_SIGNALED;
    ibv_wr_rdma_read(qx, rmr->rkey, rbase + 3950);
    ibv_wr_set_sge(qx, lmr->lkey, (uintptr_t)lbuf + 3950, 1);
    CHECK(ibv_wr_complete(qx) == 0, "post after refused batches");
    EXPECT_EX(cq, 34, IBV_WC_RDMA_READ, &wc, "the READ after refused batches comes next");
    CHECK(rbuf[3950] == 0, "no WRITE of the refused batches happened");

    /* An error completion through the poll API: a bad rkey. */
    ibv_wr_start(qx);
    qx->wr_id = 40;
    ibv_wr_rdma_write(qx, rmr->rkey ^ 0x5a5a, rbase);
    ibv_wr_set_sge(qx, lmr->lkey, (uintptr_t)lbuf, 8);
    CHECK(ibv_wr_complete(qx) == 0, "post a WRITE with a bad rkey");
    uint64_t ts;
    CHECK(poll_ex(cq, &wc, &ts, 0) && wc.wr_id == 40 && wc.status == IBV_WC_REM_ACCESS_ERR,
          "bad rkey: REM_ACCESS_ERR (status %d)", wc.status);

    /* ibv_poll_cq works on a cq_ex too. */
    CHECK(ibv_poll_cq(ibv_cq_ex_to_cq(cq), 1, &wc) >= 0, "ibv_poll_cq on a cq_ex");
    ibv_destroy_qp(x);
    ibv_destroy_qp(y);
    CHECK(ibv_destroy_cq(ibv_cq_ex_to_cq(cq)) == 0, "destroy");
}

static void ud_operations(void)
{
    struct ibv_cq_ex *cq = new_cq_ex(IBV_WC_STANDARD_FLAGS);
    struct ibv_qp *a = cq ? new_qp_ex(cq, IBV_QPT_UD, IBV_QP_EX_WITH_SEND |
                                                       IBV_QP_EX_WITH_SEND_WITH_IMM) : NULL;
    struct ibv_qp *b = cq ? new_qp_ex(cq, IBV_QPT_UD, IBV_QP_EX_WITH_SEND) : NULL;
    CHECK(a && b, "two UD QPs of create_qp_ex");
    if (!a || !b)
        return;
    int r = 0;
    for (int i = 0; i < 2; i++) {
        struct ibv_qp *q = i ? b : a;
        struct ibv_qp_attr init = { .qp_state = IBV_QPS_INIT, .port_num = 1, .qkey = QKEY };
        r |= ibv_modify_qp(q, &init, IBV_QP_STATE | IBV_QP_PKEY_INDEX | IBV_QP_PORT |
                                     IBV_QP_QKEY);
        struct ibv_qp_attr rtr = { .qp_state = IBV_QPS_RTR };
        r |= ibv_modify_qp(q, &rtr, IBV_QP_STATE);
        struct ibv_qp_attr rts = { .qp_state = IBV_QPS_RTS };
        r |= ibv_modify_qp(q, &rts, IBV_QP_STATE | IBV_QP_SQ_PSN);
    }
    CHECK(r == 0, "UD QPs to RTS");
    struct ibv_ah_attr aa = { .is_global = 1, .port_num = 1 };
    aa.grh.dgid = my_gid;
    aa.grh.hop_limit = 1;
    struct ibv_ah *ah = ibv_create_ah(pd, &aa);
    CHECK(ah != NULL, "address handle");
    if (!ah)
        return;
    struct ibv_qp_ex *ax = ibv_qp_to_qp_ex(a);
    memset(lbuf, 'u', 100);
    CHECK(post_recv(b, 200, rbuf, GRH + 100, rmr->lkey) == 0, "post UD recv");
    ibv_wr_start(ax);
    ax->wr_id = 50;
    ax->wr_flags = IBV_SEND_SIGNALED;
    ibv_wr_send_imm(ax, htonl(77));
    ibv_wr_set_ud_addr(ax, ah, b->qp_num, QKEY);
    ibv_wr_set_sge(ax, lmr->lkey, (uintptr_t)lbuf, 100);
    CHECK(ibv_wr_complete(ax) == 0, "post UD SEND_WITH_IMM");
    int ud = 0;
    struct ibv_wc wc;
    for (int i = 0; i < 2; i++) {
        uint64_t ts;
        if (!poll_ex(cq, &wc, &ts, 0))
            break;
        if (wc.wr_id == 50 && wc.status == IBV_WC_SUCCESS && wc.opcode == IBV_WC_SEND)
            ud++;
        if (wc.wr_id == 200 && wc.status == IBV_WC_SUCCESS && wc.byte_len == GRH + 100 &&
            wc.src_qp == a->qp_num && (wc.wc_flags & IBV_WC_GRH) &&
            (wc.wc_flags & IBV_WC_WITH_IMM) && wc.imm_data == htonl(77))
            ud++;
    }
    CHECK(ud == 2, "UD completions (%d of 2)", ud);
    CHECK(rbuf[GRH] == 'u' && rbuf[GRH + 99] == 'u', "UD data behind the GRH");
    /* A UD send without an address is refused at posting. */
    ibv_wr_start(ax);
    ax->wr_id = 51;
    ibv_wr_send(ax);
    ibv_wr_set_sge(ax, lmr->lkey, (uintptr_t)lbuf, 8);
    CHECK(ibv_wr_complete(ax) == EINVAL, "UD send without ibv_wr_set_ud_addr: EINVAL");
    /* An operation b did not declare. */
    struct ibv_qp_ex *bx = ibv_qp_to_qp_ex(b);
    ibv_wr_start(bx);
    ibv_wr_send_imm(bx, 1);
    CHECK(ibv_wr_complete(bx) == EINVAL, "undeclared SEND_WITH_IMM: EINVAL");
    ibv_destroy_ah(ah);
    ibv_destroy_qp(a);
    ibv_destroy_qp(b);
    ibv_destroy_cq(ibv_cq_ex_to_cq(cq));
}

int main(void)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    ctx = open_device();
    pd = ibv_alloc_pd(ctx);
    lbuf = calloc(1, LEN);
    rbuf = calloc(1, LEN);
    lmr = pd ? ibv_reg_mr(pd, lbuf, LEN, ALL_ACCESS) : NULL;
    rmr = pd ? ibv_reg_mr(pd, rbuf, LEN, ALL_ACCESS) : NULL;
    if (!lmr || !rmr || ibv_query_gid(ctx, 1, 0, &my_gid)) {
        printf("pd/mr/gid: %s\n", strerror(errno));
        return 1;
    }
    struct ibv_device_attr_ex dx;
    memset(&dx, 0, sizeof(dx));
    CHECK(ibv_query_device_ex(ctx, NULL, &dx) == 0, "query_device_ex");
    CHECK(dx.completion_timestamp_mask == UINT64_MAX && dx.hca_core_clock == 1000000,
          "timestamp capability: mask %#" PRIx64 " clock %" PRIu64 " kHz",
          dx.completion_timestamp_mask, dx.hca_core_clock);
    /* The device's clock is the timestamps' clock: CLOCK_MONOTONIC in nanoseconds. */
    struct ibv_values_ex values = { .comp_mask = IBV_VALUES_MASK_RAW_CLOCK };
    uint64_t t0 = mono_ns();
    CHECK(ibv_query_rt_values_ex(ctx, &values) == 0, "query_rt_values_ex");
    uint64_t t1 = mono_ns(), raw = (uint64_t)values.raw_clock.tv_nsec;
    CHECK(values.raw_clock.tv_sec == 0 && raw >= t0 && raw <= t1,
          "raw clock %" PRIu64 " within [%" PRIu64 ", %" PRIu64 "]", raw, t0, t1);
    refusals();
    rc_operations();
    ud_operations();
    return verdict("checks passed");
}
