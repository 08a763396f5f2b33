/* Asynchronous events of Freeflow's ffv0 (e2e/tests/verbs_async.rs): an SRQ limit armed with
 * ibv_modify_srq raises IBV_EVENT_SRQ_LIMIT_REACHED once, when the SENDs of a connected QP pair
 * take the SRQ's posted receives below it; async_fd works with poll(2) and O_NONBLOCK; the event
 * names the SRQ; the limit is disarmed after it; a QP with the SRQ moved to ERR raises
 * IBV_EVENT_QP_LAST_WQE_REACHED about it (one without an SRQ raises nothing); destroy after the
 * acks works. */
#include "verbs_probe.h"
#include <fcntl.h>
#include <poll.h>

/* Whether async_fd becomes readable within ms milliseconds. */
static int event_waits(struct ibv_context *ctx, int ms)
{
    struct pollfd p = { .fd = ctx->async_fd, .events = POLLIN };
    return poll(&p, 1, ms) == 1 && (p.revents & POLLIN);
}

/* One SEND from qa to qr (receive from the SRQ); both completions within 10 s. */
static void send_one(struct ibv_qp *qa, struct ibv_cq *cq, char *buf, uint32_t lkey, uint64_t id)
{
    CHECK(post(qa, IBV_WR_SEND, id, buf, 8, lkey, SIG, 0, 0) == 0, "post send %" PRIu64, id);
    struct ibv_wc wc;
    for (int i = 0; i < 2; i++)
        CHECK(wait_wc(cq, &wc, 10000) && wc.status == IBV_WC_SUCCESS, "completion of %" PRIu64,
              id);
}

static int srq_limit_checks(void)
{
    struct ibv_context *ctx = open_device();
    struct ibv_pd *pd = ibv_alloc_pd(ctx);
    static char buf[1 << 16];
    struct ibv_mr *mr = ibv_reg_mr(pd, buf, sizeof(buf), ALL_ACCESS);
    struct ibv_cq *cq = ibv_create_cq(ctx, 64, NULL, NULL, 0);
    struct ibv_srq_init_attr si = { .attr = { .max_wr = 16, .max_sge = 1 } };
    struct ibv_srq *srq = ibv_create_srq(pd, &si);
    CHECK(pd && mr && cq && srq, "objects: %s", strerror(errno));
    if (!srq)
        return 1;
    struct ibv_qp_init_attr qa_init = { .send_cq = cq, .recv_cq = cq, .qp_type = IBV_QPT_RC,
        .cap = { .max_send_wr = 16, .max_recv_wr = 16, .max_send_sge = 1, .max_recv_sge = 1 } };
    struct ibv_qp_init_attr qr_init = qa_init;
    qr_init.srq = srq;
    struct ibv_qp *qa = ibv_create_qp(pd, &qa_init), *qr = ibv_create_qp(pd, &qr_init);
    union ibv_gid gid;
    CHECK(qa && qr && ibv_query_gid(ctx, 1, 0, &gid) == 0 &&
          connect_qp_pair(qa, qr, gid, ALL_ACCESS, 7, 1) == 0, "QPs: %s", strerror(errno));
    if (!qa || !qr)
        return 1;

    /* Nothing yet: not readable; non-blocking, ibv_get_async_event says EAGAIN. */
    int flags = fcntl(ctx->async_fd, F_GETFL);
    CHECK(flags >= 0 && fcntl(ctx->async_fd, F_SETFL, flags | O_NONBLOCK) == 0, "O_NONBLOCK");
    struct ibv_async_event ev;
    CHECK(!event_waits(ctx, 0), "no event before any");
    errno = 0;
    CHECK(ibv_get_async_event(ctx, &ev) == -1 && errno == EAGAIN, "EAGAIN when none waits");

    for (int i = 0; i < 4; i++) {
        struct ibv_sge sge = { .addr = (uintptr_t)(buf + 4096 + i * 64), .length = 64,
                               .lkey = mr->lkey };
        struct ibv_recv_wr wr = { .wr_id = 100 + i, .sg_list = &sge, .num_sge = 1 }, *bad;
        CHECK(ibv_post_srq_recv(srq, &wr, &bad) == 0, "post_srq_recv %d", i);
    }
    struct ibv_srq_attr sa = { .srq_limit = 3 };
    CHECK(ibv_modify_srq(srq, &sa, IBV_SRQ_LIMIT) == 0, "arm limit 3: %s", strerror(errno));

    /* 3 left: not below the limit. */
    send_one(qa, cq, buf, mr->lkey, 1);
    CHECK(!event_waits(ctx, 0), "no event at 3 receives left (limit 3)");
    /* 2 left: the event. */
    send_one(qa, cq, buf, mr->lkey, 2);
    CHECK(event_waits(ctx, 10000), "async_fd readable after the limit was crossed");
    memset(&ev, 0, sizeof(ev));
    CHECK(ibv_get_async_event(ctx, &ev) == 0 && ev.event_type == IBV_EVENT_SRQ_LIMIT_REACHED &&
          ev.element.srq == srq, "SRQ_LIMIT_REACHED about the SRQ (type %d)", ev.event_type);
    ibv_ack_async_event(&ev);
    CHECK(ibv_query_srq(srq, &sa) == 0 && sa.srq_limit == 0, "disarmed after the event");
    /* One shot: the next receive taken raises nothing. */
    send_one(qa, cq, buf, mr->lkey, 3);
    CHECK(!event_waits(ctx, 200), "no second event");
    errno = 0;
    CHECK(ibv_get_async_event(ctx, &ev) == -1 && errno == EAGAIN, "EAGAIN again");

    /* A QP with an SRQ entering ERR: IBV_EVENT_QP_LAST_WQE_REACHED about it, once. */
    CHECK(to_state(qr, IBV_QPS_ERR) == 0, "qr to ERR");
    CHECK(event_waits(ctx, 10000), "async_fd readable after the QP entered ERR");
    memset(&ev, 0, sizeof(ev));
    CHECK(ibv_get_async_event(ctx, &ev) == 0 && ev.event_type == IBV_EVENT_QP_LAST_WQE_REACHED &&
          ev.element.qp == qr, "QP_LAST_WQE_REACHED about qr (type %d)", ev.event_type);
    ibv_ack_async_event(&ev);
    CHECK(!event_waits(ctx, 200), "no second LAST_WQE_REACHED");
    /* qa has no SRQ: its ERR raises nothing. */
    CHECK(to_state(qa, IBV_QPS_ERR) == 0 && !event_waits(ctx, 200), "qa to ERR: no event");

    CHECK(ibv_destroy_qp(qa) == 0 && ibv_destroy_qp(qr) == 0 && ibv_destroy_srq(srq) == 0 &&
          ibv_destroy_cq(cq) == 0 && ibv_dereg_mr(mr) == 0 && ibv_dealloc_pd(pd) == 0 &&
          ibv_close_device(ctx) == 0, "destroy");
    return verdict("async checks passed");
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc >= 2 && strcmp(argv[1], "srq_limit") == 0)
        return srq_limit_checks();
    printf("usage: async_probe srq_limit\n");
    return 2;
}
