/* What the C probes of the verbs tests share (verbs_rc_probe.c, verbs_srq_probe.c,
 * verbs_mr_probe.c, verbs_device_probe.c): the CHECK macro and its failure count, opening the one
 * device, QP state changes (connecting two QPs of this container to each other), bounded waits for
 * completions, posting one-element work requests, the verdict line.
 * Include it first: it defines _GNU_SOURCE before any system header. Everything here is static
 * inline, so a probe that leaves part of it unused still builds with -Wall -Werror. */
#ifndef FREEFLOW_VERBS_PROBE_H
#define FREEFLOW_VERBS_PROBE_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <infiniband/verbs.h>
#include <arpa/inet.h>
#include <errno.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static int failures;
#define CHECK(cond, ...) do { if (!(cond)) { failures++; \
    printf("FAIL line %d (errno %d): ", __LINE__, errno); printf(__VA_ARGS__); printf("\n"); \
    fflush(stdout); } } while (0)

#define SIG IBV_SEND_SIGNALED
#define ALL_ACCESS (IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE | IBV_ACCESS_REMOTE_READ | \
                    IBV_ACCESS_REMOTE_ATOMIC)

static inline double now_ms(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

/* The GID of overlay address ip (dotted quad): ::ffff:ip. */
static inline union ibv_gid gid_of(const char *ip)
{
    union ibv_gid g;
    memset(&g, 0, sizeof(g));
    g.raw[10] = 0xff;
    g.raw[11] = 0xff;
    inet_pton(AF_INET, ip, &g.raw[12]);
    return g;
}

/* The container's one device, opened; exits if there is not exactly one or it cannot be
 * opened. */
static inline struct ibv_context *open_device(void)
{
    int n = 0;
    struct ibv_device **list = ibv_get_device_list(&n);
    if (!list || n != 1) {
        printf("no device (%d)\n", n);
        exit(1);
    }
    struct ibv_context *ctx = ibv_open_device(list[0]);
    ibv_free_device_list(list);
    if (!ctx) {
        printf("open: %s\n", strerror(errno));
        exit(1);
    }
    return ctx;
}

static inline int to_init(struct ibv_qp *qp, int access)
{
    struct ibv_qp_attr a = { .qp_state = IBV_QPS_INIT, .pkey_index = 0, .port_num = 1,
                             .qp_access_flags = access };
    return ibv_modify_qp(qp, &a, IBV_QP_STATE | IBV_QP_PKEY_INDEX | IBV_QP_PORT |
                                 IBV_QP_ACCESS_FLAGS);
}

#define RTR_MASK (IBV_QP_STATE | IBV_QP_AV | IBV_QP_PATH_MTU | IBV_QP_DEST_QPN | \
                  IBV_QP_RQ_PSN | IBV_QP_MAX_DEST_RD_ATOMIC | IBV_QP_MIN_RNR_TIMER)

/* The attributes of INIT -> RTR towards QP dest at GID dgid (path MTU 1024, PSN 0, one read in
 * flight), for modify_qp with RTR_MASK. */
static inline struct ibv_qp_attr rtr_attr(uint32_t dest, union ibv_gid dgid, int min_rnr)
{
    struct ibv_qp_attr a = { .qp_state = IBV_QPS_RTR, .path_mtu = IBV_MTU_1024,
                             .dest_qp_num = dest, .rq_psn = 0, .max_dest_rd_atomic = 1,
                             .min_rnr_timer = min_rnr };
    a.ah_attr.is_global = 1;
    a.ah_attr.port_num = 1;
    a.ah_attr.grh.dgid = dgid;
    a.ah_attr.grh.sgid_index = 0;
    a.ah_attr.grh.hop_limit = 1;
    return a;
}

static inline int to_rtr(struct ibv_qp *qp, uint32_t dest, union ibv_gid dgid, int min_rnr)
{
    struct ibv_qp_attr a = rtr_attr(dest, dgid, min_rnr);
    return ibv_modify_qp(qp, &a, RTR_MASK);
}

static inline int to_rts(struct ibv_qp *qp, int timeout, int retry, int rnr_retry)
{
    struct ibv_qp_attr a = { .qp_state = IBV_QPS_RTS, .timeout = timeout, .retry_cnt = retry,
                             .rnr_retry = rnr_retry, .sq_psn = 0, .max_rd_atomic = 1 };
    return ibv_modify_qp(qp, &a, IBV_QP_STATE | IBV_QP_TIMEOUT | IBV_QP_RETRY_CNT |
                                 IBV_QP_RNR_RETRY | IBV_QP_SQ_PSN | IBV_QP_MAX_QP_RD_ATOMIC);
}

static inline int to_state(struct ibv_qp *qp, enum ibv_qp_state s)
{
    struct ibv_qp_attr a = { .qp_state = s };
    return ibv_modify_qp(qp, &a, IBV_QP_STATE);
}

/* x and y from any state to RTS, connected to each other; gid is this container's own. */
static inline int connect_qp_pair(struct ibv_qp *x, struct ibv_qp *y, union ibv_gid gid,
                                  int access, int rnr_retry, int min_rnr)
{
    int r = 0;
    r |= to_state(x, IBV_QPS_RESET) | to_state(y, IBV_QPS_RESET);
    r |= to_init(x, access) | to_init(y, access);
    r |= to_rtr(x, y->qp_num, gid, min_rnr) | to_rtr(y, x->qp_num, gid, min_rnr);
    r |= to_rts(x, 14, 7, rnr_retry) | to_rts(y, 14, 7, rnr_retry);
    return r;
}

static inline enum ibv_qp_state state_of(struct ibv_qp *qp)
{
    struct ibv_qp_attr a;
    struct ibv_qp_init_attr i;
    if (ibv_query_qp(qp, &a, IBV_QP_STATE, &i))
        return (enum ibv_qp_state)-1;
    return a.qp_state;
}

/* One completion within ms milliseconds; 0 on timeout or error. */
static inline int wait_wc(struct ibv_cq *cq, struct ibv_wc *wc, int ms)
{
    double end = now_ms() + ms;
    do {
        int n = ibv_poll_cq(cq, 1, wc);
        if (n < 0)
            return 0;
        if (n == 1)
            return 1;
    } while (now_ms() < end);
    return 0;
}

/* No completion for ms milliseconds. */
static inline int quiet(struct ibv_cq *cq, int ms)
{
    struct ibv_wc wc;
    return !wait_wc(cq, &wc, ms);
}

/* One completion within 3 s with this wr_id, status and (unless opcode < 0) opcode; a failed
 * check otherwise, reported with the caller's line (see EXPECT). */
static inline void expect_wc(struct ibv_cq *cq, uint64_t id, enum ibv_wc_status st, int opcode,
                             const char *what, int line)
{
    struct ibv_wc wc;
    memset(&wc, 0xee, sizeof(wc));
    if (!wait_wc(cq, &wc, 3000)) {
        failures++;
        printf("FAIL line %d: %s: no completion\n", line, what);
        return;
    }
    if (wc.wr_id != id || wc.status != st || (opcode >= 0 && (int)wc.opcode != opcode)) {
        failures++;
        printf("FAIL line %d: %s: wr_id %" PRIu64 " status %s (%d) opcode %d; expected %" PRIu64
               " %s opcode %d\n", line, what, wc.wr_id, ibv_wc_status_str(wc.status), wc.status,
               wc.opcode, id, ibv_wc_status_str(st), opcode);
    }
}
#define EXPECT(cq, id, st, op, what) expect_wc(cq, id, st, op, what, __LINE__)

/* A send work request of one scatter/gather element (raddr and rkey for RDMA operations). */
static inline int post(struct ibv_qp *qp, enum ibv_wr_opcode op, uint64_t id, void *buf,
                       uint32_t len, uint32_t lkey, unsigned flags, uint64_t raddr, uint32_t rkey)
{
    struct ibv_sge sge = { .addr = (uintptr_t)buf, .length = len, .lkey = lkey };
    struct ibv_send_wr wr = { .wr_id = id, .sg_list = &sge, .num_sge = 1, .opcode = op,
                              .send_flags = flags }, *bad = NULL;
    wr.wr.rdma.remote_addr = raddr;
    wr.wr.rdma.rkey = rkey;
    return ibv_post_send(qp, &wr, &bad);
}

/* An atomic (op) on the word at raddr; the old value comes back into the 8 bytes at local. */
static inline int post_atomic(struct ibv_qp *qp, enum ibv_wr_opcode op, uint64_t id, void *local,
                       uint32_t lkey, uint64_t raddr, uint32_t rkey, uint64_t compare_add,
                       uint64_t swap)
{
    struct ibv_sge sge = { .addr = (uintptr_t)local, .length = 8, .lkey = lkey };
    struct ibv_send_wr wr = { .wr_id = id, .sg_list = &sge, .num_sge = 1, .opcode = op,
                              .send_flags = SIG }, *bad = NULL;
    wr.wr.atomic.remote_addr = raddr;
    wr.wr.atomic.rkey = rkey;
    wr.wr.atomic.compare_add = compare_add;
    wr.wr.atomic.swap = swap;
    return ibv_post_send(qp, &wr, &bad);
}

/* A receive work request of one scatter/gather element. */
static inline int post_recv(struct ibv_qp *qp, uint64_t id, void *buf, uint32_t len,
                            uint32_t lkey)
{
    struct ibv_sge sge = { .addr = (uintptr_t)buf, .length = len, .lkey = lkey };
    struct ibv_recv_wr wr = { .wr_id = id, .sg_list = &sge, .num_sge = 1 }, *bad = NULL;
    return ibv_post_recv(qp, &wr, &bad);
}

/* The last line of a mode: `passed` if no check failed, else the number of failed checks; returns
 * the exit status. */
static inline int verdict(const char *passed)
{
    if (failures)
        printf("%d checks failed\n", failures);
    else
        printf("%s\n", passed);
    return failures != 0;
}

#endif
