/* Reliable connections through Freeflow's libibverbs.so.1, built against the installed headers
 * (e2e/tests/verbs_rc.rs runs it in registered containers): CQs, completion channels, the QP
 * state machine, every opcode and the errors. */
#include "verbs_probe.h"
#include <arpa/inet.h>
#include <poll.h>

static struct ibv_context *ctx;
static struct ibv_pd *pd;
static union ibv_gid my_gid;

static void open_ctx(void)
{
    ctx = open_device();
    pd = ibv_alloc_pd(ctx);
    if (!pd || ibv_query_gid(ctx, 1, 0, &my_gid)) {
        printf("pd/gid: %s\n", strerror(errno));
        exit(1);
    }
}

struct pair {
    struct ibv_cq *cqa, *cqb;
    struct ibv_qp *a, *b;
};

static struct ibv_qp *new_qp(struct ibv_cq *cq, int sig_all, uint32_t inline_data)
{
    struct ibv_qp_init_attr init = { .send_cq = cq, .recv_cq = cq, .qp_type = IBV_QPT_RC,
                                     .sq_sig_all = sig_all,
                                     .cap = { .max_send_wr = 64, .max_recv_wr = 64,
                                              .max_send_sge = 4, .max_recv_sge = 4,
                                              .max_inline_data = inline_data } };
    return ibv_create_qp(pd, &init);
}

/* Both QPs of p from any state to RTS, connected to each other. */
static int connect_pair(struct pair *p, int access, int rnr_retry, int min_rnr)
{
    return connect_qp_pair(p->a, p->b, my_gid, access, rnr_retry, min_rnr);
}

static void new_pair(struct pair *p)
{
    p->cqa = ibv_create_cq(ctx, 256, NULL, NULL, 0);
    p->cqb = ibv_create_cq(ctx, 256, NULL, NULL, 0);
    p->a = new_qp(p->cqa, 0, 64);
    p->b = new_qp(p->cqb, 0, 64);
    if (!p->cqa || !p->cqb || !p->a || !p->b) {
        printf("pair: %s\n", strerror(errno));
        exit(1);
    }
}


static int checks(const char *other_tenant_ip)
{
    open_ctx();
    struct ibv_device_attr dev;
    CHECK(ibv_query_device(ctx, &dev) == 0, "query_device");

    /* CQs. */
    errno = 0;
    CHECK(ibv_create_cq(ctx, 0, NULL, NULL, 0) == NULL && errno == EINVAL, "cqe 0");
    errno = 0;
    CHECK(ibv_create_cq(ctx, dev.max_cqe + 1, NULL, NULL, 0) == NULL && errno == EINVAL,
          "cqe beyond max_cqe");
    errno = 0;
    CHECK(ibv_create_cq(ctx, 4, NULL, NULL, 1) == NULL && errno == EINVAL, "comp_vector 1");
    int tag;
    struct ibv_cq *cq = ibv_create_cq(ctx, 100, &tag, NULL, 0);
    CHECK(cq && cq->cqe >= 100 && cq->cq_context == &tag && cq->context == ctx, "create_cq");
    struct ibv_wc wc[4];
    CHECK(ibv_poll_cq(cq, 4, wc) == 0, "empty CQ polls 0");
    CHECK(ibv_req_notify_cq(cq, 0) == 0, "req_notify_cq");

    /* QP creation. */
    struct ibv_qp_init_attr init = { .send_cq = cq, .recv_cq = cq, .qp_type = IBV_QPT_RC,
                                     .cap = { .max_send_wr = 10, .max_recv_wr = 20,
                                              .max_send_sge = 2, .max_recv_sge = 3,
                                              .max_inline_data = 100 } };
    struct ibv_qp *qp = ibv_create_qp(pd, &init);
    CHECK(qp != NULL, "create_qp: %s", strerror(errno));
    if (!qp)
        return 1;
    CHECK(qp->state == IBV_QPS_RESET && qp->qp_num > 1 && qp->qp_num < (1 << 24) &&
          qp->send_cq == cq && qp->pd == pd && qp->qp_type == IBV_QPT_RC, "qp fields");
    CHECK(init.cap.max_send_wr >= 10 && init.cap.max_recv_wr >= 20 && init.cap.max_send_sge >= 2 &&
          init.cap.max_recv_sge >= 3 && init.cap.max_inline_data >= 100, "caps written back");
    struct ibv_qp_init_attr raw = init;
    raw.qp_type = IBV_QPT_RAW_PACKET;
    errno = 0;
    CHECK(ibv_create_qp(pd, &raw) == NULL && errno == EOPNOTSUPP, "raw packet QP");
    struct ibv_qp_init_attr big = init;
    big.cap.max_send_wr = dev.max_qp_wr + 1;
    errno = 0;
    CHECK(ibv_create_qp(pd, &big) == NULL && errno == EINVAL, "max_send_wr beyond the device");
    big = init;
    big.cap.max_send_sge = dev.max_sge + 1;
    errno = 0;
    CHECK(ibv_create_qp(pd, &big) == NULL && errno == EINVAL, "max_send_sge beyond the device");
    CHECK(ibv_destroy_cq(cq) == EBUSY, "CQ in use by a QP destroyed");
    CHECK(ibv_dealloc_pd(pd) == EBUSY, "PD in use by a QP deallocated");

    /* The state machine and its attribute masks. */
    struct ibv_recv_wr rwr = { .wr_id = 1 }, *bad_r = NULL;
    CHECK(ibv_post_recv(qp, &rwr, &bad_r) == EINVAL && bad_r == &rwr, "post_recv in RESET");
    struct ibv_qp_attr a = { .qp_state = IBV_QPS_RTR };
    CHECK(ibv_modify_qp(qp, &a, IBV_QP_STATE) == EINVAL, "RESET -> RTR");
    a = (struct ibv_qp_attr){ .qp_state = IBV_QPS_INIT, .port_num = 1 };
    CHECK(ibv_modify_qp(qp, &a, IBV_QP_STATE | IBV_QP_PORT | IBV_QP_PKEY_INDEX) == EINVAL,
          "INIT without ACCESS_FLAGS");
    CHECK(ibv_modify_qp(qp, &a, IBV_QP_STATE | IBV_QP_PORT | IBV_QP_PKEY_INDEX |
                                IBV_QP_ACCESS_FLAGS | IBV_QP_QKEY) == EINVAL, "INIT with QKEY");
    a.port_num = 2;
    CHECK(ibv_modify_qp(qp, &a, IBV_QP_STATE | IBV_QP_PORT | IBV_QP_PKEY_INDEX |
                                IBV_QP_ACCESS_FLAGS) == EINVAL, "port 2");
    CHECK(state_of(qp) == IBV_QPS_RESET, "refused modifies left the QP in RESET");
    CHECK(to_init(qp, IBV_ACCESS_REMOTE_WRITE) == 0 && qp->state == IBV_QPS_INIT, "-> INIT");
    CHECK(ibv_post_recv(qp, &rwr, &bad_r) == 0, "post_recv in INIT");
    struct ibv_send_wr swr = { .wr_id = 2, .opcode = IBV_WR_SEND }, *bad_s = NULL;
    CHECK(ibv_post_send(qp, &swr, &bad_s) == EINVAL && bad_s == &swr, "post_send in INIT");
    struct ibv_qp_attr r = rtr_attr(qp->qp_num, my_gid, 12);
    CHECK(ibv_modify_qp(qp, &r, RTR_MASK & ~IBV_QP_DEST_QPN) == EINVAL, "RTR without DEST_QPN");
    r.ah_attr.is_global = 0;
    CHECK(ibv_modify_qp(qp, &r, RTR_MASK) == EINVAL, "RTR without the GRH");
    r = rtr_attr(qp->qp_num, gid_of(other_tenant_ip), 12);
    CHECK(ibv_modify_qp(qp, &r, RTR_MASK) == ENETUNREACH, "another tenant's container");
    r = rtr_attr(qp->qp_num, gid_of("10.32.9.9"), 12);
    CHECK(ibv_modify_qp(qp, &r, RTR_MASK) == ENETUNREACH, "an address nobody has");
    r = rtr_attr(qp->qp_num, my_gid, 12);
    r.ah_attr.grh.dgid.raw[10] = 0;
    CHECK(ibv_modify_qp(qp, &r, RTR_MASK) == ENETUNREACH, "a GID that is not IPv4-mapped");
    r = rtr_attr(qp->qp_num, my_gid, 12);
    r.path_mtu = 7;
    CHECK(ibv_modify_qp(qp, &r, RTR_MASK) == EINVAL, "path MTU 7");
    CHECK(to_rtr(qp, qp->qp_num, my_gid, 12) == 0 && qp->state == IBV_QPS_RTR, "-> RTR");
    a = (struct ibv_qp_attr){ .qp_state = IBV_QPS_RTS, .timeout = 14, .retry_cnt = 7,
                              .rnr_retry = 7 };
    CHECK(ibv_modify_qp(qp, &a, IBV_QP_STATE | IBV_QP_TIMEOUT | IBV_QP_RETRY_CNT |
                                IBV_QP_RNR_RETRY | IBV_QP_MAX_QP_RD_ATOMIC) == EINVAL,
          "RTS without SQ_PSN");
    a.retry_cnt = 8;
    CHECK(ibv_modify_qp(qp, &a, IBV_QP_STATE | IBV_QP_TIMEOUT | IBV_QP_RETRY_CNT |
                                IBV_QP_RNR_RETRY | IBV_QP_MAX_QP_RD_ATOMIC | IBV_QP_SQ_PSN) ==
          EINVAL, "retry_cnt 8");
    CHECK(to_rts(qp, 14, 7, 7) == 0 && qp->state == IBV_QPS_RTS, "-> RTS");
    struct ibv_qp_init_attr qi;
    memset(&a, 0, sizeof(a));
    CHECK(ibv_query_qp(qp, &a, IBV_QP_STATE | IBV_QP_CAP | IBV_QP_DEST_QPN, &qi) == 0 &&
          a.qp_state == IBV_QPS_RTS && a.dest_qp_num == qp->qp_num && a.path_mtu == IBV_MTU_1024 &&
          a.min_rnr_timer == 12 && a.rnr_retry == 7 && a.qp_access_flags == IBV_ACCESS_REMOTE_WRITE &&
          memcmp(a.ah_attr.grh.dgid.raw, my_gid.raw, 16) == 0 && a.cap.max_inline_data >= 100 &&
          qi.send_cq == cq && qi.cap.max_recv_sge >= 3 && qi.qp_type == IBV_QPT_RC, "query_qp");
    /* To ERR, and what was posted is flushed. */
    CHECK(to_state(qp, IBV_QPS_ERR) == 0 && qp->state == IBV_QPS_ERR, "-> ERR");
    EXPECT(cq, 1, IBV_WC_WR_FLUSH_ERR, IBV_WC_RECV, "receive flushed on ERR");
    CHECK(ibv_post_send(qp, &swr, &bad_s) == 0, "post_send in ERR");
    EXPECT(cq, 2, IBV_WC_WR_FLUSH_ERR, -1, "send posted in ERR flushed");
    CHECK(to_state(qp, IBV_QPS_RTS) == EINVAL, "ERR -> RTS");
    CHECK(to_state(qp, IBV_QPS_RESET) == 0 && state_of(qp) == IBV_QPS_RESET, "ERR -> RESET");
    CHECK(ibv_destroy_qp(qp) == 0, "destroy_qp");
    CHECK(ibv_destroy_qp(qp) == EINVAL, "destroy_qp twice");
    CHECK(ibv_destroy_cq(cq) == 0, "destroy_cq");

    /* Two QPs connected to each other (this container's own GID). */
    struct pair p;
    new_pair(&p);
    CHECK(connect_pair(&p, ALL_ACCESS, 7, 1) == 0, "connect the pair");
    size_t len = 3 * 4096;
    unsigned char *abuf = aligned_alloc(4096, len), *bbuf = aligned_alloc(4096, len);
    memset(abuf, 0, len);
    memset(bbuf, 0, len);
    struct ibv_mr *amr = ibv_reg_mr(pd, abuf, len, ALL_ACCESS);
    struct ibv_mr *bmr = ibv_reg_mr(pd, bbuf, len, ALL_ACCESS);
    CHECK(amr && bmr, "reg_mr");

    /* SEND with a gather list of 3 into a scatter list of 2. */
    for (int i = 0; i < 300; i++)
        abuf[i] = (unsigned char)(i * 3 + 1);
    struct ibv_sge rs[2] = { { (uintptr_t)bbuf + 1000, 100, bmr->lkey },
                             { (uintptr_t)bbuf + 5000, 400, bmr->lkey } };
    struct ibv_recv_wr rw = { .wr_id = 77, .sg_list = rs, .num_sge = 2 };
    CHECK(ibv_post_recv(p.b, &rw, &bad_r) == 0, "post_recv");
    struct ibv_sge ss[3] = { { (uintptr_t)abuf, 50, amr->lkey },
                             { (uintptr_t)abuf + 50, 100, amr->lkey },
                             { (uintptr_t)abuf + 150, 150, amr->lkey } };
    struct ibv_send_wr sw = { .wr_id = 66, .sg_list = ss, .num_sge = 3, .opcode = IBV_WR_SEND,
                              .send_flags = SIG };
    CHECK(ibv_post_send(p.a, &sw, &bad_s) == 0, "post_send");
    EXPECT(p.cqa, 66, IBV_WC_SUCCESS, IBV_WC_SEND, "send completion");
    struct ibv_wc w;
    CHECK(wait_wc(p.cqb, &w, 3000) && w.wr_id == 77 && w.status == IBV_WC_SUCCESS &&
          w.opcode == IBV_WC_RECV && w.byte_len == 300 && w.qp_num == p.b->qp_num &&
          !(w.wc_flags & IBV_WC_WITH_IMM), "receive completion");
    CHECK(memcmp(bbuf + 1000, abuf, 100) == 0 && memcmp(bbuf + 5000, abuf + 100, 200) == 0 &&
          bbuf[5200] == 0, "scattered data");

    /* SEND_WITH_IMM and an inline SEND (the buffer changes right after the post). */
    CHECK(post_recv(p.b, 78, bbuf, 64, bmr->lkey) == 0 && post_recv(p.b, 79, bbuf + 64, 64,
          bmr->lkey) == 0, "post_recv x2");
    struct ibv_send_wr imm = { .wr_id = 67, .sg_list = ss, .num_sge = 1,
                               .opcode = IBV_WR_SEND_WITH_IMM, .send_flags = SIG,
                               .imm_data = htonl(0xabcdef12) };
    CHECK(ibv_post_send(p.a, &imm, &bad_s) == 0, "post SEND_WITH_IMM");
    char text[32] = "inline, copied at post time";
    CHECK(post(p.a, IBV_WR_SEND, 68, text, 28, 0, SIG | IBV_SEND_INLINE, 0, 0) == 0,
          "post inline send (no lkey needed)");
    memset(text, 'x', sizeof(text));
    EXPECT(p.cqa, 67, IBV_WC_SUCCESS, IBV_WC_SEND, "SEND_WITH_IMM completion");
    EXPECT(p.cqa, 68, IBV_WC_SUCCESS, IBV_WC_SEND, "inline send completion");
    CHECK(wait_wc(p.cqb, &w, 3000) && w.wr_id == 78 && (w.wc_flags & IBV_WC_WITH_IMM) &&
          w.imm_data == htonl(0xabcdef12) && w.byte_len == 50, "receive with immediate");
    CHECK(wait_wc(p.cqb, &w, 3000) && w.wr_id == 79 && w.byte_len == 28 &&
          memcmp(bbuf + 64, "inline, copied at post time", 28) == 0, "inline data");
    char huge[1024];
    struct ibv_sge hs = { (uintptr_t)huge, sizeof(huge), 0 };
    struct ibv_send_wr hw = { .wr_id = 1, .sg_list = &hs, .num_sge = 1, .opcode = IBV_WR_SEND,
                              .send_flags = IBV_SEND_INLINE };
    CHECK(ibv_post_send(p.a, &hw, &bad_s) == EINVAL && bad_s == &hw, "inline beyond the cap");
    struct ibv_qp_attr qa;
    CHECK(ibv_query_qp(p.a, &qa, IBV_QP_CAP, &qi) == 0 && qa.cap.max_send_sge >= 4, "caps");
    hw.num_sge = qa.cap.max_send_sge + 1;
    hw.send_flags = 0;
    CHECK(ibv_post_send(p.a, &hw, &bad_s) == EINVAL, "more SGEs than max_send_sge");
    hw.num_sge = 1;
    hw.opcode = 42;
    CHECK(ibv_post_send(p.a, &hw, &bad_s) == EINVAL, "unknown opcode");

    /* Unsignaled sends complete silently; a list of work requests posts in order. */
    for (int i = 0; i < 4; i++)
        CHECK(post_recv(p.b, 100 + i, bbuf + i * 8, 8, bmr->lkey) == 0, "post_recv");
    struct ibv_sge one = { (uintptr_t)abuf, 8, amr->lkey };
    struct ibv_send_wr list[4];
    for (int i = 0; i < 4; i++)
        list[i] = (struct ibv_send_wr){ .wr_id = 200 + i, .sg_list = &one, .num_sge = 1,
                                        .opcode = IBV_WR_SEND, .send_flags = i == 3 ? SIG : 0,
                                        .next = i < 3 ? &list[i + 1] : NULL };
    CHECK(ibv_post_send(p.a, &list[0], &bad_s) == 0, "post a list");
    EXPECT(p.cqa, 203, IBV_WC_SUCCESS, IBV_WC_SEND, "only the signaled send completes");
    CHECK(quiet(p.cqa, 50), "unsignaled sends completed");
    for (int i = 0; i < 4; i++)
        EXPECT(p.cqb, 100 + i, IBV_WC_SUCCESS, IBV_WC_RECV, "receives in order");

    /* RDMA WRITE, WRITE_WITH_IMM, READ. */
    memset(bbuf, 0, len);
    for (int i = 0; i < 8192; i++)
        abuf[i] = (unsigned char)(i * 7);
    CHECK(post(p.a, IBV_WR_RDMA_WRITE, 300, abuf, 8192, amr->lkey, SIG,
               (uintptr_t)bbuf + 100, bmr->rkey) == 0, "post RDMA_WRITE");
    EXPECT(p.cqa, 300, IBV_WC_SUCCESS, IBV_WC_RDMA_WRITE, "RDMA_WRITE completion");
    CHECK(memcmp(bbuf + 100, abuf, 8192) == 0 && bbuf[99] == 0 && bbuf[8292] == 0, "written data");
    CHECK(quiet(p.cqb, 20), "a plain RDMA_WRITE completes nothing at the responder");
    CHECK(post_recv(p.b, 301, NULL, 0, 0) == 0, "post_recv for the immediate");
    struct ibv_sge ws = { (uintptr_t)abuf, 16, amr->lkey };
    struct ibv_send_wr wi = { .wr_id = 302, .sg_list = &ws, .num_sge = 1,
                              .opcode = IBV_WR_RDMA_WRITE_WITH_IMM, .send_flags = SIG,
                              .imm_data = htonl(7) };
    wi.wr.rdma.remote_addr = (uintptr_t)bbuf + 9000;
    wi.wr.rdma.rkey = bmr->rkey;
    CHECK(ibv_post_send(p.a, &wi, &bad_s) == 0, "post RDMA_WRITE_WITH_IMM");
    EXPECT(p.cqa, 302, IBV_WC_SUCCESS, IBV_WC_RDMA_WRITE, "WRITE_WITH_IMM completion");
    CHECK(wait_wc(p.cqb, &w, 3000) && w.wr_id == 301 && w.opcode == IBV_WC_RECV_RDMA_WITH_IMM &&
          w.imm_data == htonl(7) && w.byte_len == 16 && memcmp(bbuf + 9000, abuf, 16) == 0,
          "receive of WRITE_WITH_IMM");
    memset(abuf, 0, len);
    memcpy(bbuf + 4000, "read me back", 12);
    CHECK(post(p.a, IBV_WR_RDMA_READ, 303, abuf + 10, 12, amr->lkey, SIG,
               (uintptr_t)bbuf + 4000, bmr->rkey) == 0, "post RDMA_READ");
    EXPECT(p.cqa, 303, IBV_WC_SUCCESS, IBV_WC_RDMA_READ, "RDMA_READ completion");
    CHECK(memcmp(abuf + 10, "read me back", 12) == 0, "read data");
    CHECK(post(p.a, IBV_WR_RDMA_WRITE, 304, abuf, 0, amr->lkey, SIG, 0, 0xdead) == 0,
          "zero-length write with a bogus rkey");
    EXPECT(p.cqa, 304, IBV_WC_SUCCESS, IBV_WC_RDMA_WRITE, "zero-length write (rkey unchecked)");

    /* Atomics on an 8-byte word of B, results into A. */
    uint64_t *word = (uint64_t *)(bbuf + 8192), *result = (uint64_t *)abuf;
    *word = 5;
    struct ibv_sge as = { (uintptr_t)result, 8, amr->lkey };
    struct ibv_send_wr at = { .wr_id = 400, .sg_list = &as, .num_sge = 1,
                              .opcode = IBV_WR_ATOMIC_FETCH_AND_ADD, .send_flags = SIG };
    at.wr.atomic.remote_addr = (uintptr_t)word;
    at.wr.atomic.rkey = bmr->rkey;
    at.wr.atomic.compare_add = 10;
    CHECK(ibv_post_send(p.a, &at, &bad_s) == 0, "post FETCH_AND_ADD");
    EXPECT(p.cqa, 400, IBV_WC_SUCCESS, IBV_WC_FETCH_ADD, "FETCH_AND_ADD completion");
    CHECK(*result == 5 && *word == 15, "fetch-and-add: old %" PRIu64 " new %" PRIu64, *result, *word);
    at.wr_id = 401;
    at.opcode = IBV_WR_ATOMIC_CMP_AND_SWP;
    at.wr.atomic.compare_add = 15;
    at.wr.atomic.swap = 99;
    CHECK(ibv_post_send(p.a, &at, &bad_s) == 0, "post CMP_AND_SWP");
    EXPECT(p.cqa, 401, IBV_WC_SUCCESS, IBV_WC_COMP_SWAP, "CMP_AND_SWP completion");
    CHECK(*result == 15 && *word == 99, "compare-and-swap that matches");
    at.wr_id = 402;
    at.wr.atomic.compare_add = 1;
    at.wr.atomic.swap = 7;
    CHECK(ibv_post_send(p.a, &at, &bad_s) == 0, "post CMP_AND_SWP");
    EXPECT(p.cqa, 402, IBV_WC_SUCCESS, IBV_WC_COMP_SWAP, "CMP_AND_SWP completion");
    CHECK(*result == 99 && *word == 99, "compare-and-swap that does not match");

    /* Errors. A local key that does not resolve: LOC_PROT_ERR, the QP goes to ERR and what
     * follows is flushed. */
    CHECK(post_recv(p.a, 500, abuf, 8, amr->lkey) == 0, "post_recv on A");
    CHECK(post(p.a, IBV_WR_SEND, 501, abuf, 8, amr->lkey ^ 0x5a5a, SIG, 0, 0) == 0 &&
          post(p.a, IBV_WR_SEND, 502, abuf, 8, amr->lkey, 0, 0, 0) == 0, "post bad lkey");
    EXPECT(p.cqa, 501, IBV_WC_LOC_PROT_ERR, -1, "bad lkey");
    /* The send and receive queues flush independently: no order between the two. */
    struct ibv_wc f1, f2;
    CHECK(wait_wc(p.cqa, &f1, 3000) && wait_wc(p.cqa, &f2, 3000) &&
          f1.status == IBV_WC_WR_FLUSH_ERR && f2.status == IBV_WC_WR_FLUSH_ERR &&
          f1.wr_id + f2.wr_id == 1002 && (f1.wr_id == 500) == (f1.opcode == IBV_WC_RECV) &&
          (f2.wr_id == 500) == (f2.opcode == IBV_WC_RECV),
          "unsignaled send after the error and the receive flushed");
    CHECK(state_of(p.a) == IBV_QPS_ERR && state_of(p.b) == IBV_QPS_RTS, "states after LOC_PROT_ERR");
    CHECK(post(p.a, IBV_WR_SEND, 503, abuf, 8, amr->lkey, SIG, 0, 0) == 0, "post in ERR");
    EXPECT(p.cqa, 503, IBV_WC_WR_FLUSH_ERR, -1, "posted in ERR");
    CHECK(to_state(p.a, IBV_QPS_RESET) == 0 && to_init(p.a, 0) == 0 &&
          post_recv(p.a, 504, abuf, 8, amr->lkey) == 0 && to_state(p.a, IBV_QPS_RESET) == 0,
          "receive posted in INIT, then reset");
    CHECK(quiet(p.cqa, 20), "a reset QP forgets its queue without completions");
    CHECK(connect_pair(&p, ALL_ACCESS, 7, 1) == 0, "reconnect");
    CHECK(post(p.a, IBV_WR_SEND, 505, abuf + len - 4, 8, amr->lkey, SIG, 0, 0) == 0, "post");
    EXPECT(p.cqa, 505, IBV_WC_LOC_PROT_ERR, -1, "range beyond the region");

    /* Remote access errors: a wrong rkey, a range beyond the region, a region without remote
     * write, a QP without remote write. Both QPs go to ERR (class C responder error). */
    struct ibv_mr *ro = ibv_reg_mr(pd, bbuf + 4096, 4096, IBV_ACCESS_REMOTE_READ);
    CHECK(ro != NULL, "reg read-only");
    struct { uint32_t rkey; uint64_t addr; const char *what; int access; } rem[] = {
        { bmr->rkey ^ 0x77, (uintptr_t)bbuf, "guessed rkey", ALL_ACCESS },
        { bmr->rkey, (uintptr_t)bbuf + len - 4, "beyond the region", ALL_ACCESS },
        { bmr->lkey == bmr->rkey ? 0 : bmr->lkey, (uintptr_t)bbuf, "lkey as rkey", ALL_ACCESS },
        { ro->rkey, (uintptr_t)bbuf + 4096, "region without remote write", ALL_ACCESS },
        { bmr->rkey, (uintptr_t)bbuf, "QP without remote write",
          IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_READ },
    };
    for (unsigned i = 0; i < sizeof(rem) / sizeof(rem[0]); i++) {
        CHECK(connect_pair(&p, rem[i].access, 7, 1) == 0, "reconnect");
        CHECK(post_recv(p.b, 600 + i, bbuf, 8, bmr->lkey) == 0, "post_recv on B");
        CHECK(post(p.a, IBV_WR_RDMA_WRITE, 610 + i, abuf, 8, amr->lkey, SIG, rem[i].addr,
                   rem[i].rkey) == 0, "post write");
        EXPECT(p.cqa, 610 + i, IBV_WC_REM_ACCESS_ERR, -1, rem[i].what);
        EXPECT(p.cqb, 600 + i, IBV_WC_WR_FLUSH_ERR, IBV_WC_RECV, "responder flushed");
        CHECK(state_of(p.a) == IBV_QPS_ERR && state_of(p.b) == IBV_QPS_ERR, "both in ERR");
    }
    CHECK(connect_pair(&p, ALL_ACCESS, 7, 1) == 0, "reconnect");
    CHECK(post(p.a, IBV_WR_RDMA_READ, 620, abuf, 8, amr->lkey, SIG, (uintptr_t)bbuf + 4096,
               ro->rkey) == 0, "post read of read-only region");
    EXPECT(p.cqa, 620, IBV_WC_SUCCESS, IBV_WC_RDMA_READ, "read of a read-only region");
    at.wr_id = 621;
    at.wr.atomic.remote_addr = (uintptr_t)word + 4;
    CHECK(ibv_post_send(p.a, &at, &bad_s) == 0, "post misaligned atomic");
    EXPECT(p.cqa, 621, IBV_WC_REM_INV_REQ_ERR, -1, "misaligned atomic");

    /* A receive too short: LOC_LEN_ERR at the responder, REM_INV_REQ_ERR at the requester. */
    CHECK(connect_pair(&p, ALL_ACCESS, 7, 1) == 0, "reconnect");
    CHECK(post_recv(p.b, 700, bbuf, 10, bmr->lkey) == 0, "short receive");
    CHECK(post(p.a, IBV_WR_SEND, 701, abuf, 100, amr->lkey, SIG, 0, 0) == 0, "post send");
    EXPECT(p.cqa, 701, IBV_WC_REM_INV_REQ_ERR, -1, "requester of a too long message");
    EXPECT(p.cqb, 700, IBV_WC_LOC_LEN_ERR, IBV_WC_RECV, "responder of a too long message");
    /* A receive with a bad key: LOC_PROT_ERR there, REM_OP_ERR here. */
    CHECK(connect_pair(&p, ALL_ACCESS, 7, 1) == 0, "reconnect");
    CHECK(post_recv(p.b, 702, bbuf, 100, bmr->lkey + 1) == 0, "bad receive key");
    CHECK(post(p.a, IBV_WR_SEND, 703, abuf, 10, amr->lkey, SIG, 0, 0) == 0, "post send");
    EXPECT(p.cqa, 703, IBV_WC_REM_OP_ERR, -1, "requester of a bad receive");
    EXPECT(p.cqb, 702, IBV_WC_LOC_PROT_ERR, IBV_WC_RECV, "responder of a bad receive");

    /* RNR: no receive posted. rnr_retry 0 fails at once; 3 retries of the shortest timer fail
     * soon; 7 waits for ever, until a receive comes. */
    CHECK(connect_pair(&p, ALL_ACCESS, 0, 1) == 0, "reconnect, rnr_retry 0");
    CHECK(post(p.a, IBV_WR_SEND, 800, abuf, 8, amr->lkey, SIG, 0, 0) == 0, "post send");
    EXPECT(p.cqa, 800, IBV_WC_RNR_RETRY_EXC_ERR, -1, "rnr_retry 0");
    CHECK(connect_pair(&p, ALL_ACCESS, 3, 1) == 0, "reconnect, rnr_retry 3");
    double t0 = now_ms();
    CHECK(post(p.a, IBV_WR_SEND, 801, abuf, 8, amr->lkey, SIG, 0, 0) == 0, "post send");
    EXPECT(p.cqa, 801, IBV_WC_RNR_RETRY_EXC_ERR, -1, "rnr_retry 3");
    CHECK(connect_pair(&p, ALL_ACCESS, 3, 18) == 0, "reconnect, rnr_retry 3 of 5.12 ms");
    t0 = now_ms();
    CHECK(post(p.a, IBV_WR_SEND, 802, abuf, 8, amr->lkey, SIG, 0, 0) == 0, "post send");
    EXPECT(p.cqa, 802, IBV_WC_RNR_RETRY_EXC_ERR, -1, "rnr_retry 3 of 5.12 ms");
    double took = now_ms() - t0;
    CHECK(took >= 15 && took < 2000, "3 RNR retries of 5.12 ms took %.1f ms", took);
    /* rnr_retry 7 waits for ever; with min_rnr_timer 0 (655 ms) the late receive is still
     * taken at once: posting it wakes the router. */
    CHECK(connect_pair(&p, ALL_ACCESS, 7, 0) == 0, "reconnect, rnr_retry 7, timer 655 ms");
    CHECK(post(p.a, IBV_WR_SEND, 803, abuf, 8, amr->lkey, SIG, 0, 0) == 0, "post send");
    CHECK(quiet(p.cqa, 100), "rnr_retry 7 waits");
    t0 = now_ms();
    CHECK(post_recv(p.b, 804, bbuf, 8, bmr->lkey) == 0, "the receive comes");
    EXPECT(p.cqa, 803, IBV_WC_SUCCESS, IBV_WC_SEND, "the waiting send completes");
    took = now_ms() - t0;
    CHECK(took < 300, "the late receive was taken after %.1f ms", took);
    EXPECT(p.cqb, 804, IBV_WC_SUCCESS, IBV_WC_RECV, "into the late receive");

    /* A destination QP that does not exist: transport retries, then RETRY_EXC_ERR. */
    CHECK(to_state(p.a, IBV_QPS_RESET) == 0 && to_init(p.a, 0) == 0 &&
          to_rtr(p.a, 0xfffff0, my_gid, 1) == 0 && to_rts(p.a, 1, 2, 7) == 0,
          "connect to a QP number nobody has");
    CHECK(post(p.a, IBV_WR_SEND, 900, abuf, 8, amr->lkey, SIG, 0, 0) == 0, "post send");
    EXPECT(p.cqa, 900, IBV_WC_RETRY_EXC_ERR, -1, "no such destination QP");

    /* A completion channel: poll(2) on its fd, then the event names the CQ. */
    struct ibv_comp_channel *ch = ibv_create_comp_channel(ctx);
    CHECK(ch && ch->fd >= 0 && ch->context == ctx, "comp channel");
    int cqtag;
    struct ibv_cq *ecq = ibv_create_cq(ctx, 16, &cqtag, ch, 0);
    CHECK(ecq && ecq->channel == ch, "cq with channel");
    CHECK(ibv_destroy_comp_channel(ch) == EBUSY, "channel in use destroyed");
    struct ibv_qp *ea = new_qp(ecq, 1, 0);
    CHECK(ea != NULL, "qp on the channel's CQ");
    struct pair e = { .cqa = ecq, .cqb = p.cqb, .a = ea, .b = p.b };
    CHECK(connect_pair(&e, ALL_ACCESS, 7, 1) == 0, "connect");
    CHECK(ibv_req_notify_cq(ecq, 0) == 0, "arm");
    struct pollfd pfd = { .fd = ch->fd, .events = POLLIN };
    CHECK(poll(&pfd, 1, 50) == 0, "channel readable before any completion");
    CHECK(post_recv(e.b, 1000, bbuf, 8, bmr->lkey) == 0, "post_recv");
    CHECK(post(ea, IBV_WR_SEND, 1001, abuf, 8, amr->lkey, 0, 0, 0) == 0, "post (sq_sig_all)");
    CHECK(poll(&pfd, 1, 3000) == 1 && (pfd.revents & POLLIN), "channel readable after a completion");
    struct ibv_cq *evcq = NULL;
    void *evctx = NULL;
    CHECK(ibv_get_cq_event(ch, &evcq, &evctx) == 0 && evcq == ecq && evctx == &cqtag,
          "get_cq_event");
    EXPECT(ecq, 1001, IBV_WC_SUCCESS, IBV_WC_SEND, "the notified completion");
    EXPECT(e.cqb, 1000, IBV_WC_SUCCESS, IBV_WC_RECV, "its receive");
    CHECK(poll(&pfd, 1, 50) == 0, "one event per arming");
    ibv_ack_cq_events(ecq, 1);
    CHECK(ecq->comp_events_completed == 1, "acknowledged");
    CHECK(ibv_destroy_qp(ea) == 0 && ibv_destroy_cq(ecq) == 0 && ibv_destroy_comp_channel(ch) == 0,
          "destroy the channel's objects");

    /* Clean up. */
    CHECK(ibv_destroy_qp(p.a) == 0 && ibv_destroy_qp(p.b) == 0, "destroy QPs");
    CHECK(ibv_destroy_cq(p.cqa) == 0 && ibv_destroy_cq(p.cqb) == 0, "destroy CQs");
    CHECK(ibv_dereg_mr(amr) == 0 && ibv_dereg_mr(bmr) == 0 && ibv_dereg_mr(ro) == 0, "dereg");
    CHECK(ibv_dealloc_pd(pd) == 0, "dealloc_pd");
    CHECK(ibv_close_device(ctx) == 0, "close");
    return verdict("checks passed");
}

/* A pair connected to itself with a registered buffer, for the modes below. */
static struct pair setup_pair(unsigned char **buf, struct ibv_mr **mr, size_t len)
{
    open_ctx();
    struct pair p;
    new_pair(&p);
    if (connect_pair(&p, ALL_ACCESS, 7, 1)) {
        printf("connect: %s\n", strerror(errno));
        exit(1);
    }
    *buf = aligned_alloc(4096, len);
    memset(*buf, 0x3c, len);
    *mr = ibv_reg_mr(pd, *buf, len, ALL_ACCESS);
    if (!*mr) {
        printf("reg_mr: %s\n", strerror(errno));
        exit(1);
    }
    return p;
}

/* Run under strace: between the getppid() markers the program polls empty CQs and posts
 * receives (no system call may appear); between the getpgrp() markers it posts a list of 32
 * sends (at most one: the doorbell, if the router's shard was parked). */
static int nosyscall(int polls_only)
{
    unsigned char *buf;
    struct ibv_mr *mr;
    struct pair p = setup_pair(&buf, &mr, 1 << 16);
    struct ibv_wc wc;
    CHECK(post_recv(p.b, 1, buf, 64, mr->lkey) == 0 &&
          post(p.a, IBV_WR_SEND, 2, buf + 64, 64, mr->lkey, SIG, 0, 0) == 0, "warm-up");
    EXPECT(p.cqa, 2, IBV_WC_SUCCESS, IBV_WC_SEND, "warm-up send");
    EXPECT(p.cqb, 1, IBV_WC_SUCCESS, IBV_WC_RECV, "warm-up receive");
    getppid();
    int polled = 0;
    for (int i = 0; i < 100000; i++)
        polled += ibv_poll_cq(p.cqa, 1, &wc);
    for (int i = 0; i < 32; i++)
        CHECK(post_recv(p.b, 100 + i, buf + i * 64, 64, mr->lkey) == 0, "post_recv");
    getppid();
    CHECK(polled == 0, "empty polls found %d completions", polled);
    if (polls_only)
        return verdict("checks passed");
    struct ibv_sge sge = { (uintptr_t)buf + 4096, 64, mr->lkey };
    struct ibv_send_wr list[32], *bad;
    for (int i = 0; i < 32; i++)
        list[i] = (struct ibv_send_wr){ .wr_id = 200 + i, .sg_list = &sge, .num_sge = 1,
                                        .opcode = IBV_WR_SEND, .send_flags = SIG,
                                        .next = i < 31 ? &list[i + 1] : NULL };
    getpgrp();
    CHECK(ibv_post_send(p.a, list, &bad) == 0, "post 32 sends");
    getpgrp();
    for (int i = 0; i < 32; i++) {
        EXPECT(p.cqa, 200 + i, IBV_WC_SUCCESS, IBV_WC_SEND, "send");
        EXPECT(p.cqb, 100 + i, IBV_WC_SUCCESS, IBV_WC_RECV, "receive");
    }
    return verdict("checks passed");
}

/* Holds a QP connected to itself and a region; prints "QPN RKEY ADDR LKEY", waits for stdin to
 * close, then checks that nobody touched the region and that the QP still works. */
static int hold(void)
{
    unsigned char *buf;
    struct ibv_mr *mr;
    struct pair p = setup_pair(&buf, &mr, 4096);
    printf("%u %u %" PRIu64 " %u\n", p.a->qp_num, mr->rkey, (uint64_t)(uintptr_t)buf, mr->lkey);
    char line[16];
    while (fgets(line, sizeof(line), stdin))
        ;
    for (int i = 0; i < 4096; i++)
        if (buf[i] != 0x3c) {
            CHECK(0, "byte %d of the region changed", i);
            break;
        }
    CHECK(post_recv(p.b, 1, buf, 64, mr->lkey) == 0 &&
          post(p.a, IBV_WR_SEND, 2, buf + 64, 64, mr->lkey, SIG, 0, 0) == 0, "post");
    EXPECT(p.cqa, 2, IBV_WC_SUCCESS, IBV_WC_SEND, "the held QP still sends");
    EXPECT(p.cqb, 1, IBV_WC_SUCCESS, IBV_WC_RECV, "and receives");
    return verdict("checks passed");
}

/* Another container's QP number, rkey and lkey, guessed right: none of them gets anywhere. */
static int guess(const char *ip, uint32_t qpn, uint32_t rkey, uint64_t addr, uint32_t lkey)
{
    unsigned char *buf;
    struct ibv_mr *mr;
    struct pair p = setup_pair(&buf, &mr, 4096);
    /* Its QP is connected to itself, not to us: the responder drops what we send. */
    CHECK(to_state(p.a, IBV_QPS_RESET) == 0 && to_init(p.a, ALL_ACCESS) == 0 &&
          to_rtr(p.a, qpn, gid_of(ip), 1) == 0 && to_rts(p.a, 1, 1, 7) == 0,
          "connect to the other container's QP");
    CHECK(post(p.a, IBV_WR_RDMA_WRITE, 1, buf, 64, mr->lkey, SIG, addr, rkey) == 0,
          "post write");
    EXPECT(p.cqa, 1, IBV_WC_RETRY_EXC_ERR, -1, "a QP not connected to us");
    /* Its lkey names nothing in our context. */
    CHECK(connect_pair(&p, ALL_ACCESS, 7, 1) == 0, "reconnect our own pair");
    CHECK(post(p.a, IBV_WR_RDMA_WRITE, 2, (void *)(uintptr_t)addr, 64, lkey, SIG,
               (uintptr_t)buf, mr->rkey) == 0, "post with the other's lkey");
    EXPECT(p.cqa, 2, IBV_WC_LOC_PROT_ERR, -1, "another context's lkey");
    return verdict("checks passed");
}

/* Writes garbage into the tail index of its own QP's send ring: the router must detach this
 * process (and nobody else). */
static int hostile(void)
{
    unsigned char *buf;
    struct ibv_mr *mr;
    struct pair p = setup_pair(&buf, &mr, 4096);
    FILE *f = fopen("/proc/self/maps", "r");
    char line[512];
    unsigned long lo = 0, hi;
    while (f && fgets(line, sizeof(line), f))
        if (strstr(line, "freeflow-qp") && sscanf(line, "%lx-%lx", &lo, &hi) == 2)
            break;
    if (f)
        fclose(f);
    CHECK(lo != 0, "the QP's region is mapped");
    if (!lo)
        return 1;
    /* Region header (256 bytes), then the send ring's control lines: tail first. */
    volatile uint32_t *tail = (volatile uint32_t *)(lo + 256);
    *tail += 1000000;
    struct ibv_qp_attr a;
    struct ibv_qp_init_attr i;
    int r = 0;
    for (int k = 0; k < 200 && r == 0; k++) {
        usleep(10000);
        r = ibv_query_qp(p.a, &a, IBV_QP_STATE, &i);
    }
    CHECK(r == ENODEV, "after garbage in its ring the process is detached (query_qp %d)", r);
    return verdict("checks passed");
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc >= 3 && strcmp(argv[1], "checks") == 0)
        return checks(argv[2]);
    if (argc >= 2 && strcmp(argv[1], "nosyscall") == 0)
        return nosyscall(0);
    /* The empty polls of nosyscall alone (no waits after them). */
    if (argc >= 2 && strcmp(argv[1], "emptypolls") == 0)
        return nosyscall(1);
    if (argc >= 2 && strcmp(argv[1], "hold") == 0)
        return hold();
    if (argc >= 7 && strcmp(argv[1], "guess") == 0)
        return guess(argv[2], strtoul(argv[3], NULL, 0), strtoul(argv[4], NULL, 0),
                     strtoull(argv[5], NULL, 0), strtoul(argv[6], NULL, 0));
    if (argc >= 2 && strcmp(argv[1], "hostile") == 0)
        return hostile();
    printf("usage: qp_probe checks OTHER_TENANT_IP | nosyscall | emptypolls | hold | "
           "guess IP QPN RKEY ADDR LKEY | hostile\n");
    return 2;
}
