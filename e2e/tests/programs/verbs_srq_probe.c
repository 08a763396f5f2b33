/* Checks of ibv_resize_cq and shared receive queues through Freeflow's libibverbs.so.1, built
 * against the installed headers (e2e/tests/verbs_srq.rs runs it in registered containers).
 * Modes: "resize" (sizes, pending completions, a poller thread, completion channels), "srq"
 * (one SRQ shared by two QPs, its verbs and errors) and "nosyscall" (run under strace). Every wait is bounded in time. */
#include "verbs_probe.h"
#include <arpa/inet.h>
#include <poll.h>
#include <pthread.h>

static struct ibv_context *ctx;
static struct ibv_pd *pd;
static union ibv_gid my_gid;
static struct ibv_device_attr dev;

static void open_ctx(void)
{
    ctx = open_device();
    pd = ibv_alloc_pd(ctx);
    if (!pd || ibv_query_gid(ctx, 1, 0, &my_gid) || ibv_query_device(ctx, &dev)) {
        printf("pd/gid/device: %s\n", strerror(errno));
        exit(1);
    }
}

/* x and y from any state to RTS, connected to each other (this container's own GID). */
static int connect_qps(struct ibv_qp *x, struct ibv_qp *y, int rnr_retry, int min_rnr)
{
    return connect_qp_pair(x, y, my_gid, ALL_ACCESS, rnr_retry, min_rnr);
}

static struct ibv_qp *new_qp(struct ibv_cq *scq, struct ibv_cq *rcq, struct ibv_srq *srq)
{
    struct ibv_qp_init_attr init = { .send_cq = scq, .recv_cq = rcq, .srq = srq,
                                     .qp_type = IBV_QPT_RC,
                                     .cap = { .max_send_wr = 64, .max_recv_wr = 64,
                                              .max_send_sge = 2, .max_recv_sge = 2 } };
    return ibv_create_qp(pd, &init);
}


static unsigned char *buf;
static struct ibv_mr *mr;
#define BUF_LEN (1 << 16)

static void reg_buf(void)
{
    buf = aligned_alloc(4096, BUF_LEN);
    memset(buf, 0, BUF_LEN);
    mr = ibv_reg_mr(pd, buf, BUF_LEN, ALL_ACCESS);
    if (!mr) {
        printf("reg_mr: %s\n", strerror(errno));
        exit(1);
    }
}

/* ---- resize ---------------------------------------------------------------------------- */

/* The QPs of the resize checks: a writes into b; a's send CQ is the one resized. b's receive
 * CQ (cqb) is the witness: a's SQ runs in order, so once an unsignaled SEND posted after the
 * writes has landed in b, the writes' completions are in a's CQ. */
static struct ibv_qp *ra, *rb;
static struct ibv_cq *rcqb;

static void writes(uint64_t first, int n)
{
    for (int i = 0; i < n; i++)
        CHECK(post(ra, IBV_WR_RDMA_WRITE, first + i, buf, 8, mr->lkey, SIG,
                   (uintptr_t)buf + 4096, mr->rkey) == 0, "post write %d", i);
}

static void settle(uint64_t id)
{
    CHECK(post_recv(rb, id, buf + 8192, 8, mr->lkey) == 0, "post_recv witness");
    CHECK(post(ra, IBV_WR_SEND, 999999, buf, 8, mr->lkey, 0, 0, 0) == 0, "post witness send");
    EXPECT(rcqb, id, IBV_WC_SUCCESS, IBV_WC_RECV, "witness");
}

static void expect_ids(struct ibv_cq *cq, uint64_t first, int n, const char *what)
{
    for (int i = 0; i < n; i++)
        EXPECT(cq, first + i, IBV_WC_SUCCESS, IBV_WC_RDMA_WRITE, what);
}

struct poller {
    struct ibv_cq *cq;
    int total;
    int seen;
    int out_of_order;
    int errors;
    uint64_t *ids;
};

static void *poll_thread(void *arg)
{
    struct poller *p = arg;
    double end = now_ms() + 30000;
    struct ibv_wc wc[8];
    while (p->seen < p->total && now_ms() < end) {
        int n = ibv_poll_cq(p->cq, 8, wc);
        if (n < 0) {
            p->errors++;
            break;
        }
        for (int i = 0; i < n; i++) {
            if (wc[i].status != IBV_WC_SUCCESS)
                p->errors++;
            if (p->seen < p->total)
                p->ids[p->seen] = wc[i].wr_id;
            if (wc[i].wr_id != (uint64_t)p->seen)
                p->out_of_order++;
            p->seen++;
        }
    }
    return NULL;
}

static int resize_checks(void)
{
    open_ctx();
    reg_buf();
    struct ibv_cq *cq = ibv_create_cq(ctx, 16, NULL, NULL, 0);
    rcqb = ibv_create_cq(ctx, 16, NULL, NULL, 0);
    CHECK(cq && rcqb && cq->cqe >= 16, "create CQs");
    ra = new_qp(cq, cq, NULL);
    rb = new_qp(rcqb, rcqb, NULL);
    CHECK(ra && rb && connect_qps(ra, rb, 7, 1) == 0, "connect");
    if (failures)
        return 1;

    /* Ten completions, two polled, eight pending. */
    writes(0, 10);
    settle(1);
    expect_ids(cq, 0, 2, "before any resize");
    int before = cq->cqe;
    CHECK(ibv_resize_cq(cq, 7) == EINVAL && cq->cqe == before, "below the 8 pending: EINVAL");
    CHECK(ibv_resize_cq(cq, 0) == EINVAL && ibv_resize_cq(cq, -3) == EINVAL, "size 0 or less");
    CHECK(ibv_resize_cq(cq, dev.max_cqe + 1) == EINVAL && cq->cqe == before, "beyond max_cqe");
    CHECK(ibv_resize_cq(cq, 8) == 0 && cq->cqe >= 8, "down to the pending count (cqe %d)",
          cq->cqe);
    expect_ids(cq, 2, 8, "pending completions kept in order");
    CHECK(quiet(cq, 20), "nothing more");

    /* Up with 12 pending, then down to exactly the 40 pending; new ones after old ones. */
    writes(100, 12);
    settle(2);
    CHECK(ibv_resize_cq(cq, 300) == 0 && cq->cqe >= 300, "up to 300 (cqe %d)", cq->cqe);
    writes(112, 28);
    settle(3);
    CHECK(ibv_resize_cq(cq, 39) == EINVAL, "39 < 40 pending");
    CHECK(ibv_resize_cq(cq, 40) == 0 && cq->cqe >= 40 && cq->cqe < 300,
          "down to 40 (cqe %d)", cq->cqe);
    writes(140, 10);
    settle(4);
    expect_ids(cq, 100, 50, "in order across two resizes");
    CHECK(quiet(cq, 20), "nothing more");
    /* The larger ring really holds more than the original 16 without holding the QP back. */
    CHECK(ibv_resize_cq(cq, 200) == 0, "up to 200");
    writes(200, 60);
    settle(5);
    CHECK(ibv_resize_cq(cq, 59) == EINVAL, "60 pending in a 200-entry CQ");
    expect_ids(cq, 200, 60, "60 completions held at once");

    /* A poller thread takes completions while this thread posts and resizes: each arrives
     * exactly once, in order. */
    struct poller pt = { .cq = cq, .total = 3000 };
    pt.ids = calloc(pt.total, sizeof(uint64_t));
    pthread_t th;
    CHECK(pthread_create(&th, NULL, poll_thread, &pt) == 0, "poller thread");
    int sizes[] = { 16, 64, 33, 128, 20, 1000, 17 };
    int resized = 0, refused = 0, other = 0;
    double end = now_ms() + 30000;
    for (int next = 0, k = 0; next < pt.total && now_ms() < end; k++) {
        int batch = pt.total - next < 32 ? pt.total - next : 32;
        for (int i = 0; i < batch && now_ms() < end;) {
            int r = post(ra, IBV_WR_RDMA_WRITE, next, buf, 8, mr->lkey, SIG,
                         (uintptr_t)buf + 4096, mr->rkey);
            if (r == 0) {
                next++;
                i++;
            } else if (r != ENOMEM) {
                other++;
                break;
            }
        }
        int r = ibv_resize_cq(cq, sizes[k % 7]);
        if (r == 0)
            resized++;
        else if (r == EINVAL)
            refused++;
        else
            other++;
    }
    pthread_join(th, NULL);
    CHECK(pt.seen == pt.total && pt.out_of_order == 0 && pt.errors == 0 && other == 0,
          "poller saw %d of %d, %d out of order, %d errors; %d other failures", pt.seen,
          pt.total, pt.out_of_order, pt.errors, other);
    CHECK(resized > 10, "%d resizes succeeded (%d refused)", resized, refused);
    printf("concurrent poller: %d completions, %d resizes, %d refused (pending > size)\n",
           pt.seen, resized, refused);
    free(pt.ids);
    CHECK(quiet(cq, 20), "nothing more");

    /* A completion channel keeps working: armed before a resize, notified after it. */
    struct ibv_comp_channel *ch = ibv_create_comp_channel(ctx);
    int tag;
    struct ibv_cq *ecq = ch ? ibv_create_cq(ctx, 16, &tag, ch, 0) : NULL;
    struct ibv_qp *ea = ecq ? new_qp(ecq, ecq, NULL) : NULL;
    CHECK(ch && ecq && ea && connect_qps(ea, rb, 7, 1) == 0, "channel, CQ and QP");
    if (!ea)
        return 1;
    ra = ea;
    struct pollfd pfd = { .fd = ch->fd, .events = POLLIN };
    for (int round = 0; round < 3; round++) {
        CHECK(ibv_req_notify_cq(ecq, 0) == 0, "arm");
        CHECK(ibv_resize_cq(ecq, round == 1 ? 16 : 64 + round * 100) == 0, "resize armed CQ");
        CHECK(poll(&pfd, 1, 30) == 0, "no event before a completion");
        writes(5000 + round, 1);
        CHECK(poll(&pfd, 1, 3000) == 1 && (pfd.revents & POLLIN), "event after the resize");
        struct ibv_cq *evcq = NULL;
        void *evctx = NULL;
        CHECK(ibv_get_cq_event(ch, &evcq, &evctx) == 0 && evcq == ecq && evctx == &tag,
              "get_cq_event");
        ibv_ack_cq_events(ecq, 1);
        EXPECT(ecq, 5000 + round, IBV_WC_SUCCESS, IBV_WC_RDMA_WRITE, "the notified completion");
        CHECK(poll(&pfd, 1, 20) == 0, "one event per arming");
    }
    CHECK(ibv_destroy_qp(ea) == 0 && ibv_destroy_cq(ecq) == 0 &&
          ibv_destroy_comp_channel(ch) == 0, "destroy the channel's objects");
    return verdict("checks passed");
}

/* ---- shared receive queues ------------------------------------------------------------- */

static int post_srq(struct ibv_srq *srq, uint64_t id, void *b, uint32_t len, uint32_t lkey)
{
    struct ibv_sge sge = { .addr = (uintptr_t)b, .length = len, .lkey = lkey };
    struct ibv_recv_wr wr = { .wr_id = id, .sg_list = &sge, .num_sge = 1 }, *bad = NULL;
    return ibv_post_srq_recv(srq, &wr, &bad);
}

static int srq_checks(void)
{
    open_ctx();
    reg_buf();
    struct ibv_srq_init_attr bad_init = { .attr = { .max_wr = 0, .max_sge = 1 } };
    errno = 0;
    CHECK(ibv_create_srq(pd, &bad_init) == NULL && errno == EINVAL, "max_wr 0");
    bad_init.attr.max_wr = dev.max_srq_wr + 1;
    errno = 0;
    CHECK(ibv_create_srq(pd, &bad_init) == NULL && errno == EINVAL, "max_wr beyond the device");
    bad_init.attr = (struct ibv_srq_attr){ .max_wr = 4, .max_sge = dev.max_srq_sge + 1 };
    errno = 0;
    CHECK(ibv_create_srq(pd, &bad_init) == NULL && errno == EINVAL, "max_sge beyond the device");

    int tag;
    struct ibv_srq_init_attr init = { .srq_context = &tag, .attr = { .max_wr = 8, .max_sge = 2 } };
    struct ibv_srq *srq = ibv_create_srq(pd, &init);
    CHECK(srq && srq->context == ctx && srq->pd == pd && srq->srq_context == &tag &&
          init.attr.max_wr >= 8 && init.attr.max_sge >= 2, "create_srq: %s", strerror(errno));
    if (!srq)
        return 1;
    struct ibv_srq_attr sa;
    memset(&sa, 0xff, sizeof(sa));
    CHECK(ibv_query_srq(srq, &sa) == 0 && sa.max_wr == init.attr.max_wr &&
          sa.max_sge == init.attr.max_sge && sa.srq_limit == 0, "query_srq");
    sa = (struct ibv_srq_attr){ .srq_limit = 0 };
    CHECK(ibv_modify_srq(srq, &sa, IBV_SRQ_LIMIT) == 0, "limit 0 (disarmed)");
    sa.srq_limit = 4;
    CHECK(ibv_modify_srq(srq, &sa, IBV_SRQ_LIMIT) == 0 && ibv_query_srq(srq, &sa) == 0 &&
          sa.srq_limit == 4, "limit 4 armed (its event: verbs_async_probe.c)");
    sa.srq_limit = (uint32_t)init.attr.max_wr + 1;
    CHECK(ibv_modify_srq(srq, &sa, IBV_SRQ_LIMIT) == EINVAL, "limit beyond max_wr");
    sa = (struct ibv_srq_attr){ .srq_limit = 0 };
    CHECK(ibv_modify_srq(srq, &sa, IBV_SRQ_LIMIT) == 0, "limit 0 (disarmed again)");
    sa = (struct ibv_srq_attr){ .max_wr = 64 };
    CHECK(ibv_modify_srq(srq, &sa, IBV_SRQ_MAX_WR) == EINVAL, "resize: not supported");

    struct ibv_cq *cqr = ibv_create_cq(ctx, 64, NULL, NULL, 0);
    struct ibv_cq *cqa = ibv_create_cq(ctx, 64, NULL, NULL, 0);
    struct ibv_cq *cqb = ibv_create_cq(ctx, 64, NULL, NULL, 0);
    struct ibv_qp *r1 = new_qp(cqr, cqr, srq), *r2 = new_qp(cqr, cqr, srq);
    struct ibv_qp *a = new_qp(cqa, cqa, NULL), *b = new_qp(cqb, cqb, NULL);
    CHECK(cqr && cqa && cqb && r1 && r2 && a && b, "CQs and QPs: %s", strerror(errno));
    if (failures)
        return 1;
    struct ibv_qp_attr qa;
    struct ibv_qp_init_attr qi;
    CHECK(r1->srq == srq && ibv_query_qp(r1, &qa, IBV_QP_CAP, &qi) == 0 && qi.srq == srq,
          "the QP knows its SRQ");
    CHECK(connect_qps(a, r1, 7, 1) == 0 && connect_qps(b, r2, 7, 1) == 0, "connect");
    struct ibv_sge one = { (uintptr_t)buf, 8, mr->lkey };
    struct ibv_recv_wr rw = { .wr_id = 1, .sg_list = &one, .num_sge = 1 }, *bad_r = NULL;
    CHECK(ibv_post_recv(r1, &rw, &bad_r) == EINVAL && bad_r == &rw,
          "post_recv on a QP with an SRQ");

    /* A list of four receives, then SENDs from two peers to the two QPs. */
    struct ibv_sge rs[4];
    struct ibv_recv_wr list[4];
    for (int i = 0; i < 4; i++) {
        rs[i] = (struct ibv_sge){ (uintptr_t)buf + 1000 + i * 100, 100, mr->lkey };
        list[i] = (struct ibv_recv_wr){ .wr_id = 10 + i, .sg_list = &rs[i], .num_sge = 1,
                                        .next = i < 3 ? &list[i + 1] : NULL };
    }
    CHECK(ibv_post_srq_recv(srq, list, &bad_r) == 0, "post_srq_recv a list of 4");
    memcpy(buf + 20000, "from a", 6);
    memcpy(buf + 20100, "from b", 6);
    CHECK(post(a, IBV_WR_SEND, 1, buf + 20000, 6, mr->lkey, SIG, 0, 0) == 0, "send a");
    EXPECT(cqa, 1, IBV_WC_SUCCESS, IBV_WC_SEND, "a's send");
    CHECK(post(b, IBV_WR_SEND, 2, buf + 20100, 6, mr->lkey, SIG, 0, 0) == 0, "send b");
    EXPECT(cqb, 2, IBV_WC_SUCCESS, IBV_WC_SEND, "b's send");
    CHECK(post(a, IBV_WR_SEND, 3, buf + 20000, 6, mr->lkey, SIG, 0, 0) == 0, "send a again");
    EXPECT(cqa, 3, IBV_WC_SUCCESS, IBV_WC_SEND, "a's second send");
    struct ibv_wc w;
    uint32_t want_qp[3] = { r1->qp_num, r2->qp_num, r1->qp_num };
    for (int i = 0; i < 3; i++)
        CHECK(wait_wc(cqr, &w, 3000) && w.wr_id == (uint64_t)(10 + i) &&
              w.status == IBV_WC_SUCCESS && w.opcode == IBV_WC_RECV && w.byte_len == 6 &&
              w.qp_num == want_qp[i], "SRQ receive %d: wr_id %" PRIu64 " qp %u", i, w.wr_id,
              w.qp_num);
    CHECK(memcmp(buf + 1000, "from a", 6) == 0 && memcmp(buf + 1100, "from b", 6) == 0 &&
          memcmp(buf + 1200, "from a", 6) == 0, "data in the SRQ's buffers");
    struct ibv_sge three[3] = { one, one, one };
    struct ibv_recv_wr wide = { .wr_id = 9, .sg_list = three, .num_sge = init.attr.max_sge + 1 };
    CHECK(ibv_post_srq_recv(srq, &wide, &bad_r) == EINVAL && bad_r == &wide,
          "more entries than max_sge");
    CHECK(ibv_destroy_srq(srq) == EBUSY, "destroy an SRQ in use");

    /* RNR: b takes the last receive; a's SEND finds the SRQ empty and waits (rnr_retry 7)
     * until a receive is posted. */
    CHECK(post(b, IBV_WR_SEND, 4, buf + 20100, 6, mr->lkey, SIG, 0, 0) == 0, "send b");
    EXPECT(cqb, 4, IBV_WC_SUCCESS, IBV_WC_SEND, "b's send takes the last receive");
    EXPECT(cqr, 13, IBV_WC_SUCCESS, IBV_WC_RECV, "the last receive");
    CHECK(post(a, IBV_WR_SEND, 5, buf + 20000, 6, mr->lkey, SIG, 0, 0) == 0, "send a");
    CHECK(quiet(cqa, 100) && quiet(cqr, 1), "an empty SRQ: the send waits (RNR)");
    CHECK(state_of(a) == IBV_QPS_RTS, "still in RTS while waiting");
    CHECK(post_srq(srq, 14, buf + 2000, 100, mr->lkey) == 0, "post the receive");
    EXPECT(cqa, 5, IBV_WC_SUCCESS, IBV_WC_SEND, "the waiting send completes");
    CHECK(wait_wc(cqr, &w, 3000) && w.wr_id == 14 && w.qp_num == r1->qp_num &&
          w.status == IBV_WC_SUCCESS, "into the late receive");

    /* A QP going to ERR does not flush the SRQ: the other QP still gets its receives. */
    CHECK(post_srq(srq, 20, buf + 3000, 64, mr->lkey) == 0 &&
          post_srq(srq, 21, buf + 3100, 64, mr->lkey) == 0, "post two");
    CHECK(to_state(r1, IBV_QPS_ERR) == 0 && state_of(r1) == IBV_QPS_ERR, "r1 -> ERR");
    CHECK(quiet(cqr, 50), "nothing of the SRQ flushed");
    CHECK(post(b, IBV_WR_SEND, 6, buf + 20100, 6, mr->lkey, SIG, 0, 0) == 0 &&
          post(b, IBV_WR_SEND, 7, buf + 20100, 6, mr->lkey, SIG, 0, 0) == 0, "send b x2");
    EXPECT(cqb, 6, IBV_WC_SUCCESS, IBV_WC_SEND, "b's send");
    EXPECT(cqb, 7, IBV_WC_SUCCESS, IBV_WC_SEND, "b's send");
    for (int i = 0; i < 2; i++)
        CHECK(wait_wc(cqr, &w, 3000) && w.wr_id == (uint64_t)(20 + i) &&
              w.qp_num == r2->qp_num && w.status == IBV_WC_SUCCESS, "r2 gets receive %d", 20 + i);

    /* Full: max_wr receives fit, one more is ENOMEM. */
    int posted = 0, r = 0;
    while (posted < (int)init.attr.max_wr + 1 &&
           (r = post_srq(srq, 100 + posted, buf, 8, mr->lkey)) == 0)
        posted++;
    CHECK(posted == (int)init.attr.max_wr && r == ENOMEM, "%d posted, then %d", posted, r);

    /* Another context cannot use this SRQ. */
    struct ibv_device **devs = ibv_get_device_list(NULL);
    struct ibv_context *ctx2 = devs ? ibv_open_device(devs[0]) : NULL;
    ibv_free_device_list(devs);
    struct ibv_pd *pd2 = ctx2 ? ibv_alloc_pd(ctx2) : NULL;
    struct ibv_cq *cq2 = ctx2 ? ibv_create_cq(ctx2, 4, NULL, NULL, 0) : NULL;
    CHECK(pd2 && cq2, "a second context");
    struct ibv_qp_init_attr foreign = { .send_cq = cq2, .recv_cq = cq2, .srq = srq,
                                        .qp_type = IBV_QPT_RC,
                                        .cap = { .max_send_wr = 1, .max_send_sge = 1 } };
    errno = 0;
    CHECK(ibv_create_qp(pd2, &foreign) == NULL && errno == EINVAL, "another context's SRQ");

    /* Destroy: busy until its QPs go; then gone. */
    CHECK(ibv_destroy_qp(r1) == 0 && ibv_destroy_srq(srq) == EBUSY, "still used by r2");
    CHECK(ibv_dealloc_pd(pd) == EBUSY, "the SRQ's PD is busy");
    CHECK(ibv_destroy_qp(r2) == 0 && ibv_destroy_srq(srq) == 0, "destroy_srq");
    CHECK(ibv_destroy_srq(srq) == EINVAL, "destroy_srq twice");
    CHECK(ibv_destroy_qp(a) == 0 && ibv_destroy_qp(b) == 0, "destroy QPs");
    return verdict("checks passed");
}

/* Run under strace: between the getppid() markers the program posts 32 receives to an SRQ,
 * one at a time, and polls its empty CQ: no system call may appear. */
static int srq_nosyscall(void)
{
    open_ctx();
    reg_buf();
    struct ibv_srq_init_attr init = { .attr = { .max_wr = 64, .max_sge = 1 } };
    struct ibv_srq *srq = ibv_create_srq(pd, &init);
    struct ibv_cq *cq = ibv_create_cq(ctx, 16, NULL, NULL, 0);
    CHECK(srq && cq, "SRQ and CQ");
    if (!srq || !cq)
        return 1;
    struct ibv_wc wc;
    int posted = 0, polled = 0;
    getppid();
    for (int i = 0; i < 32; i++)
        posted += post_srq(srq, i, buf + i * 64, 64, mr->lkey) == 0;
    for (int i = 0; i < 1000; i++)
        polled += ibv_poll_cq(cq, 1, &wc);
    getppid();
    CHECK(posted == 32 && polled == 0, "%d posted, %d polled", posted, polled);
    return verdict("checks passed");
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc >= 2 && strcmp(argv[1], "resize") == 0)
        return resize_checks();
    if (argc >= 2 && strcmp(argv[1], "srq") == 0)
        return srq_checks();
    if (argc >= 2 && strcmp(argv[1], "nosyscall") == 0)
        return srq_nosyscall();
    printf("usage: srq_probe resize | srq | nosyscall\n");
    return 2;
}
