/* freeflow-bench rdma: the program that runs the RDMA measurements inside a registered
 * container, built by freeflow-bench against the installed verbs headers and run with
 * LD_LIBRARY_PATH pointing at Freeflow's libibverbs.so.1.
 *
 * Two QPs, each on its own device context (so each has its own attachment to the router, as two
 * containers would), connected to each other through the router. One application thread drives
 * both ends, pinned to one core, so that on a two-core machine the other core is the router's
 * alone. Each phase prints one JSON line: ops, seconds, and the router's CPU time over the phase
 * (read from /proc/ROUTER_PID/stat). The last phase is the rdma_cm connection-setup rate
 * (rdma_bench_cm.c): CM_CONNECTIONS connections from the container's address IP to itself.
 *
 * usage: rdma_bench ROUTER_PID APP_CORE MESSAGES SAMPLES BW_OPS CM_CONNECTIONS IP
 */
#define _GNU_SOURCE
#include <infiniband/verbs.h>
#include <errno.h>
#include <inttypes.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define DEPTH 1024      /* send and receive queue depth */
#define BATCH 32        /* work requests per post call, one signaled */
#define MSG 64          /* message size of the rate and latency phases */
#define BW_SIZE 65536   /* message size of the bandwidth phase */
#define BW_SLOTS 16     /* 64 KiB slots the bandwidth phase cycles through (1 MiB) */
#define BW_DEPTH 16     /* bandwidth phase: writes in flight */

static pid_t router_pid;

static void die(const char *what)
{
    fprintf(stderr, "rdma_bench: %s: %s\n", what, strerror(errno));
    exit(1);
}

static double now_s(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static uint64_t now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000ull + t.tv_nsec;
}

/* The router's user + system CPU time in seconds. */
static double router_cpu(void)
{
    char path[64], buf[1024];
    snprintf(path, sizeof(path), "/proc/%d/stat", (int)router_pid);
    FILE *f = fopen(path, "r");
    if (!f)
        die("router stat");
    size_t n = fread(buf, 1, sizeof(buf) - 1, f);
    fclose(f);
    buf[n] = 0;
    char *p = strrchr(buf, ')');
    unsigned long utime = 0, stime = 0;
    /* Fields after the command: state(3) ... utime(14) stime(15). */
    if (!p || sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lu %lu", &utime,
                     &stime) != 2)
        die("parse router stat");
    return (double)(utime + stime) / sysconf(_SC_CLK_TCK);
}

struct side {
    struct ibv_context *ctx;
    struct ibv_pd *pd;
    struct ibv_cq *cq;
    struct ibv_qp *qp;
    struct ibv_mr *mr;
    unsigned char *buf;
    union ibv_gid gid;
};

#define BUF_LEN (BW_SIZE * BW_SLOTS)

static void setup(struct side *s)
{
    int n = 0;
    struct ibv_device **list = ibv_get_device_list(&n);
    if (!list || n < 1)
        die("no RDMA device (is this a registered container?)");
    s->ctx = ibv_open_device(list[0]);
    ibv_free_device_list(list);
    if (!s->ctx)
        die("open device");
    if (ibv_query_gid(s->ctx, 1, 0, &s->gid))
        die("query gid");
    s->pd = ibv_alloc_pd(s->ctx);
    s->cq = ibv_create_cq(s->ctx, 4 * DEPTH, NULL, NULL, 0);
    if (!s->pd || !s->cq)
        die("pd/cq");
    struct ibv_qp_init_attr init = { .send_cq = s->cq, .recv_cq = s->cq, .qp_type = IBV_QPT_RC,
                                     .cap = { .max_send_wr = DEPTH, .max_recv_wr = DEPTH,
                                              .max_send_sge = 1, .max_recv_sge = 1,
                                              .max_inline_data = MSG } };
    s->qp = ibv_create_qp(s->pd, &init);
    if (!s->qp)
        die("create qp");
    s->buf = aligned_alloc(4096, BUF_LEN);
    memset(s->buf, 1, BUF_LEN);
    s->mr = ibv_reg_mr(s->pd, s->buf, BUF_LEN,
                       IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE | IBV_ACCESS_REMOTE_READ);
    if (!s->mr)
        die("reg mr");
}

static void connect_to(struct side *s, struct side *peer)
{
    struct ibv_qp_attr a = { .qp_state = IBV_QPS_INIT, .port_num = 1,
                             .qp_access_flags = IBV_ACCESS_REMOTE_WRITE | IBV_ACCESS_REMOTE_READ };
    if (ibv_modify_qp(s->qp, &a, IBV_QP_STATE | IBV_QP_PKEY_INDEX | IBV_QP_PORT |
                                     IBV_QP_ACCESS_FLAGS))
        die("INIT");
    memset(&a, 0, sizeof(a));
    a.qp_state = IBV_QPS_RTR;
    a.path_mtu = IBV_MTU_1024;
    a.dest_qp_num = peer->qp->qp_num;
    a.max_dest_rd_atomic = 1;
    a.min_rnr_timer = 1;
    a.ah_attr.is_global = 1;
    a.ah_attr.port_num = 1;
    a.ah_attr.grh.dgid = peer->gid;
    a.ah_attr.grh.hop_limit = 1;
    if (ibv_modify_qp(s->qp, &a, IBV_QP_STATE | IBV_QP_AV | IBV_QP_PATH_MTU | IBV_QP_DEST_QPN |
                                     IBV_QP_RQ_PSN | IBV_QP_MAX_DEST_RD_ATOMIC |
                                     IBV_QP_MIN_RNR_TIMER))
        die("RTR");
    memset(&a, 0, sizeof(a));
    a.qp_state = IBV_QPS_RTS;
    a.timeout = 14;
    a.retry_cnt = 7;
    a.rnr_retry = 7;
    a.max_rd_atomic = 1;
    if (ibv_modify_qp(s->qp, &a, IBV_QP_STATE | IBV_QP_TIMEOUT | IBV_QP_RETRY_CNT |
                                     IBV_QP_RNR_RETRY | IBV_QP_SQ_PSN | IBV_QP_MAX_QP_RD_ATOMIC))
        die("RTS");
}

/* Posts `count` receives of MSG bytes on s, in lists of up to BATCH. */
static void post_receives(struct side *s, int count)
{
    struct ibv_sge sge[BATCH];
    struct ibv_recv_wr wr[BATCH], *bad;
    while (count > 0) {
        int n = count < BATCH ? count : BATCH;
        for (int i = 0; i < n; i++) {
            sge[i] = (struct ibv_sge){ (uintptr_t)s->buf + (i * MSG) % BUF_LEN, MSG, s->mr->lkey };
            wr[i] = (struct ibv_recv_wr){ .wr_id = 1, .sg_list = &sge[i], .num_sge = 1,
                                          .next = i + 1 < n ? &wr[i + 1] : NULL };
        }
        if (ibv_post_recv(s->qp, wr, &bad))
            die("post_recv");
        count -= n;
    }
}

/* Posts a list of `n` sends (or RDMA writes to the buffer at remote_buf, key rkey) of MSG
 * bytes, inline, the last one signaled. */
static void post_list(struct side *s, enum ibv_wr_opcode op, int n, uintptr_t remote_buf,
                      uint32_t rkey)
{
    struct ibv_sge sge = { (uintptr_t)s->buf, MSG, s->mr->lkey };
    struct ibv_send_wr wr[BATCH], *bad;
    for (int i = 0; i < n; i++) {
        wr[i] = (struct ibv_send_wr){ .wr_id = 2, .sg_list = &sge, .num_sge = 1, .opcode = op,
                                      .send_flags = IBV_SEND_INLINE |
                                                    (i == n - 1 ? IBV_SEND_SIGNALED : 0),
                                      .next = i + 1 < n ? &wr[i + 1] : NULL };
        wr[i].wr.rdma.remote_addr = remote_buf + (i * MSG) % BUF_LEN;
        wr[i].wr.rdma.rkey = rkey;
    }
    if (ibv_post_send(s->qp, wr, &bad))
        die("post_send");
}

/* post_list to the peer's buffer, both QPs in this process. */
static void post_batch(struct side *s, struct side *peer, enum ibv_wr_opcode op, int n)
{
    post_list(s, op, n, (uintptr_t)peer->buf, peer->mr->rkey);
}

static void check(struct ibv_wc *wc)
{
    if (wc->status != IBV_WC_SUCCESS) {
        fprintf(stderr, "rdma_bench: completion %s\n", ibv_wc_status_str(wc->status));
        exit(1);
    }
}

static void report(const char *phase, long ops, double seconds, double cpu, long bytes)
{
    printf("{\"phase\":\"%s\",\"ops\":%ld,\"seconds\":%.9f,\"router_cpu_s\":%.6f,\"bytes\":%ld}\n",
           phase, ops, seconds, cpu, bytes);
    fflush(stdout);
}

/* Message rate of 64-byte SENDs (with receives kept posted) or RDMA WRITEs, A to B. */
static void rate(struct side *a, struct side *b, enum ibv_wr_opcode op, long messages,
                 const char *phase)
{
    long sent = 0, done = 0, received = 0, need_recv = op == IBV_WR_SEND ? messages : 0;
    int posted_recv = 0;
    struct ibv_wc wc[64];
    if (need_recv) {
        post_receives(b, DEPTH);
        posted_recv = DEPTH;
    }
    double cpu0 = router_cpu(), t0 = now_s();
    while (done < messages || received < need_recv) {
        while (sent < messages && sent - done <= DEPTH - 2 * BATCH) {
            post_batch(a, b, op, BATCH);
            sent += BATCH;
        }
        int n = ibv_poll_cq(a->cq, 64, wc);
        for (int i = 0; i < n; i++) {
            check(&wc[i]);
            done += BATCH;
        }
        if (need_recv) {
            n = ibv_poll_cq(b->cq, 64, wc);
            for (int i = 0; i < n; i++)
                check(&wc[i]);
            received += n;
            posted_recv -= n;
            if (posted_recv <= DEPTH - BATCH && received + posted_recv < need_recv) {
                post_receives(b, BATCH);
                posted_recv += BATCH;
            }
        }
    }
    double t1 = now_s(), cpu1 = router_cpu();
    report(phase, messages, t1 - t0, cpu1 - cpu0, messages * MSG);
    /* Leave no receive behind for the next phase. */
    if (posted_recv > 0) {
        struct ibv_qp_attr reset = { .qp_state = IBV_QPS_RESET };
        ibv_modify_qp(b->qp, &reset, IBV_QP_STATE);
        ibv_modify_qp(a->qp, &reset, IBV_QP_STATE);
        connect_to(a, b);
        connect_to(b, a);
    }
}

/* Polls s's CQ until one of its receives completes (wr_id 1, as post_receives posts them);
 * the send completions met on the way are checked and dropped. */
static void wait_receive(struct side *s)
{
    struct ibv_wc wc[4];
    for (int got = 0; !got;) {
        int n = ibv_poll_cq(s->cq, 4, wc);
        for (int k = 0; k < n; k++) {
            check(&wc[k]);
            got |= wc[k].wr_id == 1;
        }
    }
}

/* One receive of s used up, `*left` of them still posted: tops the queue up by DEPTH / 4 once
 * it is down to DEPTH / 4. */
static void receive_used(struct side *s, int *left)
{
    if (--*left == DEPTH / 4) {
        post_receives(s, DEPTH / 4);
        *left += DEPTH / 4;
    }
}

/* Round trips of a 64-byte SEND from A to B and back; prints the samples (ns). */
static void rtt(struct side *a, struct side *b, long samples)
{
    post_receives(a, DEPTH / 2);
    post_receives(b, DEPTH / 2);
    int left_a = DEPTH / 2, left_b = DEPTH / 2;
    uint64_t *ns = malloc(samples * sizeof(uint64_t));
    double cpu0 = router_cpu(), t0 = now_s();
    for (long i = 0; i < samples; i++) {
        uint64_t start = now_ns();
        post_batch(a, b, IBV_WR_SEND, 1);
        wait_receive(b);
        post_batch(b, a, IBV_WR_SEND, 1);
        wait_receive(a);
        ns[i] = now_ns() - start;
        /* The send completions (every send is signaled here) land in the same CQs: drained by
         * the waits above or the next ones. */
        receive_used(a, &left_a);
        receive_used(b, &left_b);
    }
    double t1 = now_s(), cpu1 = router_cpu();
    report("rtt", samples, t1 - t0, cpu1 - cpu0, samples * 2 * MSG);
    printf("{\"phase\":\"rtt_samples\",\"ns\":[");
    for (long i = 0; i < samples; i++)
        printf(i ? ",%" PRIu64 : "%" PRIu64, ns[i]);
    printf("]}\n");
    fflush(stdout);
    free(ns);
}

/* Bandwidth of 64 KiB RDMA WRITEs from A's buffer to B's, BW_DEPTH in flight. */
static void write_bw(struct side *a, struct side *b, long ops)
{
    struct ibv_wc wc[16];
    long posted = 0, done = 0;
    double cpu0 = router_cpu(), t0 = now_s();
    while (done < ops) {
        while (posted < ops && posted - done < BW_DEPTH) {
            int slot = posted % BW_SLOTS;
            struct ibv_sge sge = { (uintptr_t)a->buf + slot * BW_SIZE, BW_SIZE, a->mr->lkey };
            struct ibv_send_wr wr = { .wr_id = 3, .sg_list = &sge, .num_sge = 1,
                                      .opcode = IBV_WR_RDMA_WRITE,
                                      .send_flags = IBV_SEND_SIGNALED }, *bad;
            wr.wr.rdma.remote_addr = (uintptr_t)b->buf + slot * BW_SIZE;
            wr.wr.rdma.rkey = b->mr->rkey;
            if (ibv_post_send(a->qp, &wr, &bad))
                die("post write");
            posted++;
        }
        int n = ibv_poll_cq(a->cq, 16, wc);
        for (int i = 0; i < n; i++)
            check(&wc[i]);
        done += n;
    }
    double t1 = now_s(), cpu1 = router_cpu();
    report("write_bw", ops, t1 - t0, cpu1 - cpu0, ops * BW_SIZE);
}

/* The same copies with memcpy on this core: the baseline of the bandwidth phase. */
static void memcpy_bw(struct side *a, struct side *b, long ops)
{
    double t0 = now_s();
    for (long i = 0; i < ops; i++) {
        int slot = i % BW_SLOTS;
        memcpy(b->buf + slot * BW_SIZE, a->buf + slot * BW_SIZE, BW_SIZE);
        __asm__ volatile("" ::: "memory");
    }
    double t1 = now_s();
    report("memcpy_bw", ops, t1 - t0, 0, ops * BW_SIZE);
}

/* The router's CPU time (seconds) as the rdma_cm phase reads it; one router here. */
static void one_router_cpu(double cpu[2])
{
    cpu[0] = router_cpu();
    cpu[1] = 0;
}

#include "rdma_bench_cm.c"
#include "rdma_bench_hosts.c"

int main(int argc, char **argv)
{
    if (argc > 1 && strcmp(argv[1], "peer") == 0)
        return peer_main(argc, argv);
    if (argc > 1 && strcmp(argv[1], "client") == 0)
        return client_main(argc, argv);
    if (argc != 8) {
        fprintf(stderr, "usage: rdma_bench ROUTER_PID APP_CORE MESSAGES SAMPLES BW_OPS "
                        "CM_CONNECTIONS IP\n");
        return 2;
    }
    router_pid = atoi(argv[1]);
    int core = atoi(argv[2]);
    long messages = atol(argv[3]) / BATCH * BATCH, samples = atol(argv[4]), bw_ops = atol(argv[5]);
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(core, &set);
    if (sched_setaffinity(0, sizeof(set), &set))
        die("pin to the application core");
    struct side a, b;
    setup(&a);
    setup(&b);
    connect_to(&a, &b);
    connect_to(&b, &a);
    rate(&a, &b, IBV_WR_SEND, messages, "send_rate");
    rate(&a, &b, IBV_WR_RDMA_WRITE, messages, "write_rate");
    rtt(&a, &b, samples);
    write_bw(&a, &b, bw_ops);
    memcpy_bw(&a, &b, bw_ops);
    cm_rate(argv[7], atol(argv[6]), 1, one_router_cpu);
    return 0;
}
