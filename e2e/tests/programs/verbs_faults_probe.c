/* The router goes away under a program with work outstanding (verbs_faults.rs kills it).
 *
 * Two QPs of one container, connected: A sends to B, which has no receive, so A's first send
 * waits in RNR (for ever: rnr_retry 7) with two more behind it (one unsignaled), and A has four
 * receives nobody sends to. A's receive CQ is armed on a completion channel. The probe says
 * READY and waits for a line on stdin: by then the router is dead. Then, as on a device after a
 * fatal error: the channel wakes with A's receive CQ; every outstanding request completes with
 * IBV_WC_WR_FLUSH_ERR (right wr_ids, in order per queue, nothing else); new posts fail with EIO
 * (bad_wr at the first request); verbs that need the router fail; every destroy succeeds; and,
 * once the daemon has restarted the router, a new context works. Prints "checks passed". */
#include "verbs_probe.h"
#include <arpa/inet.h>
#include <poll.h>

static union ibv_gid my_gid;

static int connect_to(struct ibv_qp *qp, uint32_t dest)
{
    struct ibv_qp_attr a = { .qp_state = IBV_QPS_RTR, .path_mtu = IBV_MTU_1024,
                             .dest_qp_num = dest, .rq_psn = 0, .max_dest_rd_atomic = 1,
                             .min_rnr_timer = 1 };
    a.ah_attr.is_global = 1;
    a.ah_attr.port_num = 1;
    a.ah_attr.grh.dgid = my_gid;
    a.ah_attr.grh.hop_limit = 1;
    int r = ibv_modify_qp(qp, &a, IBV_QP_STATE | IBV_QP_AV | IBV_QP_PATH_MTU | IBV_QP_DEST_QPN |
                                      IBV_QP_RQ_PSN | IBV_QP_MAX_DEST_RD_ATOMIC |
                                      IBV_QP_MIN_RNR_TIMER);
    struct ibv_qp_attr s = { .qp_state = IBV_QPS_RTS, .timeout = 14, .retry_cnt = 7,
                             .rnr_retry = 7, .sq_psn = 0, .max_rd_atomic = 1 };
    return r | ibv_modify_qp(qp, &s, IBV_QP_STATE | IBV_QP_TIMEOUT | IBV_QP_RETRY_CNT |
                                         IBV_QP_RNR_RETRY | IBV_QP_SQ_PSN |
                                         IBV_QP_MAX_QP_RD_ATOMIC);
}

static struct ibv_qp *new_qp(struct ibv_pd *pd, struct ibv_cq *scq, struct ibv_cq *rcq)
{
    struct ibv_qp_init_attr init = { .send_cq = scq, .recv_cq = rcq, .qp_type = IBV_QPT_RC,
                                     .cap = { .max_send_wr = 16, .max_recv_wr = 16,
                                              .max_send_sge = 1, .max_recv_sge = 1 } };
    return ibv_create_qp(pd, &init);
}

/* After the router is gone: a context opened anew works (the daemon restarts the router;
 * 20 s at most). */
static void reopen(void)
{
    double end = now_ms() + 20000;
    while (now_ms() < end) {
        int n = 0;
        struct ibv_device **list = ibv_get_device_list(&n);
        struct ibv_context *ctx = (list && n == 1) ? ibv_open_device(list[0]) : NULL;
        if (list)
            ibv_free_device_list(list);
        if (!ctx) {
            usleep(100 * 1000);
            continue;
        }
        struct ibv_pd *pd = ibv_alloc_pd(ctx);
        struct ibv_cq *cq = ibv_create_cq(ctx, 16, NULL, NULL, 0);
        struct ibv_qp *qp = (pd && cq) ? new_qp(pd, cq, cq) : NULL;
        CHECK(pd && cq && qp, "new objects on the restarted router");
        CHECK(qp && to_init(qp, 0) == 0, "modify on the restarted router");
        CHECK(!qp || ibv_destroy_qp(qp) == 0, "destroy the new QP");
        CHECK(!cq || ibv_destroy_cq(cq) == 0, "destroy the new CQ");
        CHECK(!pd || ibv_dealloc_pd(pd) == 0, "dealloc the new PD");
        CHECK(ibv_close_device(ctx) == 0, "close the new context");
        printf("reopened after the router's restart\n");
        return;
    }
    CHECK(0, "no device within 20 s of the router's death");
}

/* One flush completion of `qp` on `cq`. */
#define FLUSHED(cq, id, op, qp) do { struct ibv_wc wc_; memset(&wc_, 0xee, sizeof(wc_)); \
    CHECK(wait_wc(cq, &wc_, 5000) && wc_.wr_id == (id) && wc_.status == IBV_WC_WR_FLUSH_ERR && \
          wc_.opcode == (op) && wc_.qp_num == (qp)->qp_num, \
          "flush of %d: wr_id %" PRIu64 " status %d opcode %d", (int)(id), wc_.wr_id, \
          wc_.status, wc_.opcode); } while (0)

int main(void)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    struct ibv_context *ctx = open_device();
    struct ibv_pd *pd = ibv_alloc_pd(ctx);
    static char buf[65536];
    struct ibv_mr *mr = pd ? ibv_reg_mr(pd, buf, sizeof(buf), ALL_ACCESS) : NULL;
    struct ibv_comp_channel *ch = ibv_create_comp_channel(ctx);
    struct ibv_cq *scq = ibv_create_cq(ctx, 64, NULL, NULL, 0);
    struct ibv_cq *rcq = ch ? ibv_create_cq(ctx, 64, NULL, ch, 0) : NULL;
    struct ibv_cq *bcq = ibv_create_cq(ctx, 64, NULL, NULL, 0);
    if (!mr || !scq || !rcq || !bcq || ibv_query_gid(ctx, 1, 0, &my_gid)) {
        printf("setup: %s\n", strerror(errno));
        return 1;
    }
    struct ibv_qp *a = new_qp(pd, scq, rcq), *b = new_qp(pd, bcq, bcq);
    if (!a || !b || to_init(a, ALL_ACCESS) || to_init(b, ALL_ACCESS) ||
        connect_to(a, b->qp_num) || connect_to(b, a->qp_num)) {
        printf("QPs: %s\n", strerror(errno));
        return 1;
    }
    uint32_t k = mr->lkey;
    /* What completes before the router goes is not flushed: a signaled send, then an
     * unsignaled one retired by the signaled one after it. */
    CHECK(post_recv(b, 900, buf, 64, k) == 0 && post_recv(b, 901, buf, 64, k) == 0 &&
          post_recv(b, 902, buf, 64, k) == 0, "B's receives");
    CHECK(post(a, IBV_WR_SEND, 1, buf, 8, k, SIG, 0, 0) == 0, "send 1");
    EXPECT(scq, 1, IBV_WC_SUCCESS, IBV_WC_SEND, "send 1");
    CHECK(post(a, IBV_WR_SEND, 2, buf, 8, k, 0, 0, 0) == 0, "send 2, unsignaled");
    CHECK(post(a, IBV_WR_SEND, 3, buf, 8, k, SIG, 0, 0) == 0, "send 3");
    EXPECT(scq, 3, IBV_WC_SUCCESS, IBV_WC_SEND, "send 3");
    for (uint64_t id = 900; id <= 902; id++)
        EXPECT(bcq, id, IBV_WC_SUCCESS, IBV_WC_RECV, "B's receive");
    /* Outstanding when the router goes: three sends (the first in RNR), four receives. */
    CHECK(post(a, IBV_WR_SEND, 10, buf, 8, k, SIG, 0, 0) == 0, "send 10");
    CHECK(post(a, IBV_WR_RDMA_WRITE, 11, buf, 8, k, 0, (uintptr_t)buf + 4096, mr->rkey) == 0,
          "write 11, unsignaled");
    CHECK(post(a, IBV_WR_SEND, 12, buf, 8, k, SIG, 0, 0) == 0, "send 12");
    for (uint64_t id = 20; id < 24; id++)
        CHECK(post_recv(a, id, buf + 1024, 64, k) == 0, "A's receive %d", (int)id);
    CHECK(ibv_req_notify_cq(rcq, 0) == 0, "arm A's receive CQ");
    CHECK(quiet(scq, 300) && quiet(rcq, 1) && quiet(bcq, 1), "nothing completes yet");
    printf("READY\n");
    char line[64];
    if (!fgets(line, sizeof(line), stdin)) {
        printf("no go\n");
        return 1;
    }

    /* The channel wakes, with the armed CQ. */
    struct pollfd pfd = { .fd = ch->fd, .events = POLLIN };
    CHECK(poll(&pfd, 1, 10000) == 1, "the channel's fd is readable");
    struct ibv_cq *ev_cq = NULL;
    void *ev_ctx = NULL;
    CHECK(ibv_get_cq_event(ch, &ev_cq, &ev_ctx) == 0 && ev_cq == rcq, "event of A's receive CQ");
    if (ev_cq)
        ibv_ack_cq_events(ev_cq, 1);
    /* Every outstanding request, in order per queue, flushed; nothing else. */
    FLUSHED(scq, 10, IBV_WC_SEND, a);
    FLUSHED(scq, 11, IBV_WC_RDMA_WRITE, a);
    FLUSHED(scq, 12, IBV_WC_SEND, a);
    for (uint64_t id = 20; id < 24; id++)
        FLUSHED(rcq, id, IBV_WC_RECV, a);
    CHECK(quiet(scq, 200) && quiet(rcq, 1) && quiet(bcq, 1), "no more completions");
    /* A CQ with nothing left does not fire: the channel reports the dead device. */
    CHECK(ibv_req_notify_cq(rcq, 0) == 0, "re-arm");
    errno = 0;
    CHECK(ibv_get_cq_event(ch, &ev_cq, &ev_ctx) == -1 && errno == EIO,
          "no more events: EIO");
    /* New posts fail with EIO, at the first request. */
    struct ibv_sge sge = { .addr = (uintptr_t)buf, .length = 8, .lkey = k };
    struct ibv_send_wr swr = { .wr_id = 30, .sg_list = &sge, .num_sge = 1,
                               .opcode = IBV_WR_SEND, .send_flags = SIG }, *sbad = NULL;
    CHECK(ibv_post_send(a, &swr, &sbad) == EIO && sbad == &swr, "post_send: EIO");
    struct ibv_recv_wr rwr = { .wr_id = 31, .sg_list = &sge, .num_sge = 1 }, *rbad = NULL;
    CHECK(ibv_post_recv(a, &rwr, &rbad) == EIO && rbad == &rwr, "post_recv: EIO");
    CHECK(post_recv(b, 32, buf, 64, k) == EIO, "post_recv on B: EIO");
    CHECK(quiet(scq, 100) && quiet(rcq, 1) && quiet(bcq, 1), "refused posts complete nothing");
    /* Verbs that need the router fail instead of waiting. */
    double t0 = now_ms();
    CHECK(to_state(a, IBV_QPS_ERR) != 0, "modify_qp fails");
    CHECK(ibv_create_cq(ctx, 16, NULL, NULL, 0) == NULL, "create_cq fails");
    CHECK(ibv_alloc_pd(ctx) == NULL, "alloc_pd fails");
    printf("three verbs failed in %.0f ms\n", now_ms() - t0);
    /* Destroying frees what the program holds. */
    CHECK(ibv_destroy_qp(a) == 0 && ibv_destroy_qp(b) == 0, "destroy QPs");
    CHECK(ibv_destroy_cq(scq) == 0 && ibv_destroy_cq(rcq) == 0 && ibv_destroy_cq(bcq) == 0,
          "destroy CQs");
    CHECK(ibv_destroy_comp_channel(ch) == 0, "destroy the channel");
    CHECK(ibv_dereg_mr(mr) == 0 && ibv_dealloc_pd(pd) == 0, "dereg MR, dealloc PD");
    CHECK(ibv_close_device(ctx) == 0, "close the context");
    reopen();
    if (failures) {
        printf("%d checks failed\n", failures);
        return 1;
    }
    printf("checks passed\n");
    return 0;
}
