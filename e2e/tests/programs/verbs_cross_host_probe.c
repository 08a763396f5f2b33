/* RDMA between two hosts through Freeflow (e2e/tests/verbs_cross_host.rs runs it): a server in a
 * container on one host, a client in a container on the other, which exchange their QP numbers
 * and a region's key over TCP (as ibv_rc_pingpong does), then the client runs every opcode and
 * every remote error, each scenario on a QP pair of its own:
 *   0: SEND, SEND_WITH_IMM, RDMA WRITE, WRITE_WITH_IMM, RDMA READ, compare-and-swap,
 *      fetch-and-add, all succeeding, data and original values checked;
 *   1: a WRITE with a wrong rkey (REM_ACCESS_ERR) and a WRITE behind it (WR_FLUSH_ERR);
 *   2: a SEND longer than the receive (REM_INV_REQ_ERR; LOC_LEN_ERR at the server);
 *   3: a SEND with no receive and rnr_retry 1 (RNR_RETRY_EXC_ERR);
 *   4: a SEND with no receive yet and rnr_retry 7: it lands when the server posts one;
 *   5: a READ of a region without remote read access (REM_ACCESS_ERR);
 *   6: the client's QP aims at server QP 0, which is connected to another QP: nothing is
 *      delivered (RETRY_EXC_ERR for the first of three WRITEs, the others flushed), as a forged
 *      QP number on one host.
 * Usage: probe server PORT | probe client SERVER_IP PORT. Each prints "checks passed".
 * `probe stream-server PORT` and `probe stream-client SERVER_IP PORT`: the client keeps 64 KiB
 * WRITEs in flight on QP 0 (printing STREAMING once they flow) until one fails; the first
 * failure must be RETRY_EXC_ERR (the server's router was killed) and every WR behind it
 * WR_FLUSH_ERR. */
#include "verbs_probe.h"
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>

#define NQP 7
#define SERVER_QPS 6
#define BUF 65536

static struct ibv_context *ctx;
static struct ibv_pd *pd;
static struct ibv_cq *cq;
static struct ibv_qp *qps[NQP];
static unsigned char *buf, *ro_buf;
static struct ibv_mr *mr, *ro;

static void setup(int nqp)
{
    ctx = open_device();
    pd = ibv_alloc_pd(ctx);
    cq = ibv_create_cq(ctx, 256, NULL, NULL, 0);
    buf = aligned_alloc(4096, BUF);
    ro_buf = aligned_alloc(4096, 4096);
    memset(buf, 0, BUF);
    memset(ro_buf, 'o', 4096);
    mr = pd ? ibv_reg_mr(pd, buf, BUF, ALL_ACCESS) : NULL;
    ro = pd ? ibv_reg_mr(pd, ro_buf, 4096, IBV_ACCESS_LOCAL_WRITE) : NULL;
    if (!pd || !cq || !mr || !ro) {
        printf("setup: %s\n", strerror(errno));
        exit(1);
    }
    for (int i = 0; i < nqp; i++) {
        struct ibv_qp_init_attr init = { .send_cq = cq, .recv_cq = cq, .qp_type = IBV_QPT_RC,
                                         .cap = { .max_send_wr = 16, .max_recv_wr = 16,
                                                  .max_send_sge = 1, .max_recv_sge = 1 } };
        qps[i] = ibv_create_qp(pd, &init);
        if (!qps[i] || to_init(qps[i], ALL_ACCESS)) {
            printf("qp %d: %s\n", i, strerror(errno));
            exit(1);
        }
    }
}

/* QP i to RTS towards QP dest of the container at ip. */
static int connect_to(int i, uint32_t dest, const char *ip, int timeout, int retry, int rnr)
{
    return to_rtr(qps[i], dest, gid_of(ip), 14) || to_rts(qps[i], timeout, retry, rnr);
}

static void send_line(int fd, const char *line)
{
    if (write(fd, line, strlen(line)) != (ssize_t)strlen(line)) {
        printf("write: %s\n", strerror(errno));
        exit(1);
    }
}

static void read_line(int fd, char *line, size_t cap)
{
    size_t n = 0;
    while (n + 1 < cap && read(fd, line + n, 1) == 1 && line[n] != '\n')
        n++;
    line[n] = 0;
}

/* One completion for each of the n wr_ids in ids, in any order, with the statuses in st. */
static void expect_set(const uint64_t *ids, const int *st, int n)
{
    int seen[16] = { 0 };
    for (int k = 0; k < n; k++) {
        struct ibv_wc wc;
        if (!wait_wc(cq, &wc, 5000)) {
            CHECK(0, "only %d of %d server completions", k, n);
            return;
        }
        int found = 0;
        for (int j = 0; j < n; j++)
            if (wc.wr_id == ids[j] && !seen[j]) {
                seen[j] = found = 1;
                CHECK((int)wc.status == st[j], "wr %" PRIu64 ": %s", wc.wr_id,
                      ibv_wc_status_str(wc.status));
            }
        CHECK(found, "unexpected completion wr %" PRIu64, wc.wr_id);
    }
}

static int server(int port, int stream)
{
    setup(SERVER_QPS);
    memset(buf + 8192, 'R', 256);
    *(uint64_t *)(buf + 4096) = 100;
    int l = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(port) };
    setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (bind(l, (struct sockaddr *)&a, sizeof(a)) || listen(l, 1)) {
        printf("listen: %s\n", strerror(errno));
        return 1;
    }
    struct sockaddr_in peer;
    socklen_t plen = sizeof(peer);
    int c = accept(l, (struct sockaddr *)&peer, &plen);
    char line[512], ip[32];
    inet_ntop(AF_INET, &peer.sin_addr, ip, sizeof(ip));
    snprintf(line, sizeof(line), "%u %u %u %u %u %u %" PRIu64 " %u %" PRIu64 " %u\n",
             qps[0]->qp_num, qps[1]->qp_num, qps[2]->qp_num, qps[3]->qp_num, qps[4]->qp_num,
             qps[5]->qp_num, (uint64_t)(uintptr_t)buf, mr->rkey, (uint64_t)(uintptr_t)ro_buf,
             ro->rkey);
    send_line(c, line);
    read_line(c, line, sizeof(line));
    uint32_t dest[SERVER_QPS];
    if (sscanf(line, "%u %u %u %u %u %u", &dest[0], &dest[1], &dest[2], &dest[3], &dest[4],
               &dest[5]) != SERVER_QPS) {
        printf("bad line from the client: %s\n", line);
        return 1;
    }
    /* Receives before RTR: QP 0 takes three messages, QP 2 one too short; QP 3 none. */
    for (int k = 0; k < 3; k++)
        CHECK(post_recv(qps[0], 1 + k, buf + 64 * k, 64, mr->lkey) == 0, "post_recv");
    CHECK(post_recv(qps[2], 20, buf + 512, 8, mr->lkey) == 0, "post_recv");
    for (int i = 0; i < SERVER_QPS; i++)
        CHECK(connect_to(i, dest[i], ip, 14, 7, 7) == 0, "connect server QP %d", i);
    send_line(c, "ready\n");
    if (stream) {
        read_line(c, line, sizeof(line));
        return 0;
    }
    /* QP 4's receive comes late: the client's SEND waits in RNR until then. */
    usleep(300 * 1000);
    CHECK(post_recv(qps[4], 40, buf + 768, 64, mr->lkey) == 0, "late post_recv");
    read_line(c, line, sizeof(line));
    CHECK(strcmp(line, "done") == 0, "the client said %s", line);
    uint64_t ids[] = { 1, 2, 3, 20, 40 };
    int st[] = { IBV_WC_SUCCESS, IBV_WC_SUCCESS, IBV_WC_SUCCESS, IBV_WC_LOC_LEN_ERR,
                 IBV_WC_SUCCESS };
    expect_set(ids, st, 5);
    CHECK(buf[0] == 'A' && buf[63] == 'A' && buf[64] == 'B', "SEND data");
    CHECK(buf[1024] == 'W' && buf[1087] == 'W' && buf[2048] == 'X', "WRITE data");
    CHECK(buf[768] == 'L', "the late receive got its SEND");
    CHECK(*(uint64_t *)(buf + 4096) == 205, "atomics: %" PRIu64, *(uint64_t *)(buf + 4096));
    CHECK(state_of(qps[1]) == IBV_QPS_ERR && state_of(qps[5]) == IBV_QPS_ERR,
          "the responder's QPs of remote access errors are in the error state");
    return verdict("checks passed");
}

/* Connects to the server, exchanges QP numbers and keys, connects the QPs; returns the socket. */
static int client_exchange(const char *ip, int port, uint32_t *q, uint64_t *raddr,
                           uint32_t *rkey, uint64_t *ro_addr, uint32_t *ro_rkey)
{
    setup(NQP);
    int c = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(port) };
    inet_pton(AF_INET, ip, &a.sin_addr);
    if (connect(c, (struct sockaddr *)&a, sizeof(a))) {
        printf("connect: %s\n", strerror(errno));
        exit(1);
    }
    char line[512];
    read_line(c, line, sizeof(line));
    if (sscanf(line, "%u %u %u %u %u %u %" SCNu64 " %u %" SCNu64 " %u", &q[0], &q[1], &q[2],
               &q[3], &q[4], &q[5], raddr, rkey, ro_addr, ro_rkey) != 10) {
        printf("bad line from the server: %s\n", line);
        exit(1);
    }
    snprintf(line, sizeof(line), "%u %u %u %u %u %u\n", qps[0]->qp_num, qps[1]->qp_num,
             qps[2]->qp_num, qps[3]->qp_num, qps[4]->qp_num, qps[5]->qp_num);
    send_line(c, line);
    for (int i = 0; i < SERVER_QPS; i++)
        CHECK(connect_to(i, q[i], ip, 14, 7, i == 3 ? 1 : 7) == 0, "connect client QP %d", i);
    /* Aimed at server QP 0, which is connected to client QP 0. */
    CHECK(connect_to(6, q[0], ip, 8, 2, 7) == 0, "connect the forging QP");
    read_line(c, line, sizeof(line));
    CHECK(strcmp(line, "ready") == 0, "the server said %s", line);
    return c;
}

static int client(const char *ip, int port)
{
    uint32_t q[SERVER_QPS], rkey, ro_rkey;
    uint64_t raddr, ro_addr;
    int c = client_exchange(ip, port, q, &raddr, &rkey, &ro_addr, &ro_rkey);

    /* 0: every opcode. */
    memset(buf, 'A', 64);
    memset(buf + 64, 'B', 64);
    memset(buf + 128, 'W', 64);
    memset(buf + 192, 'X', 64);
    struct ibv_qp *p = qps[0];
    struct ibv_sge sge = { (uintptr_t)(buf + 64), 64, mr->lkey };
    struct ibv_send_wr imm = { .wr_id = 2, .sg_list = &sge, .num_sge = 1,
                               .opcode = IBV_WR_SEND_WITH_IMM, .send_flags = SIG,
                               .imm_data = htonl(0x1234) }, *bad;
    CHECK(post(p, IBV_WR_SEND, 1, buf, 64, mr->lkey, SIG, 0, 0) == 0 &&
          ibv_post_send(p, &imm, &bad) == 0 &&
          post(p, IBV_WR_RDMA_WRITE, 3, buf + 128, 64, mr->lkey, SIG, raddr + 1024, rkey) == 0,
          "post SEND, SEND_WITH_IMM, WRITE");
    struct ibv_sge wsge = { (uintptr_t)(buf + 192), 64, mr->lkey };
    struct ibv_send_wr wimm = { .wr_id = 4, .sg_list = &wsge, .num_sge = 1,
                                .opcode = IBV_WR_RDMA_WRITE_WITH_IMM, .send_flags = SIG,
                                .imm_data = htonl(0x5678) };
    wimm.wr.rdma.remote_addr = raddr + 2048;
    wimm.wr.rdma.rkey = rkey;
    CHECK(ibv_post_send(p, &wimm, &bad) == 0, "post WRITE_WITH_IMM");
    CHECK(post(p, IBV_WR_RDMA_READ, 5, buf + 8192, 256, mr->lkey, SIG, raddr + 8192, rkey) == 0,
          "post READ");
    struct ibv_sge asge = { (uintptr_t)(buf + 4096), 8, mr->lkey };
    struct ibv_send_wr cas = { .wr_id = 6, .sg_list = &asge, .num_sge = 1,
                               .opcode = IBV_WR_ATOMIC_CMP_AND_SWP, .send_flags = SIG };
    cas.wr.atomic.remote_addr = raddr + 4096;
    cas.wr.atomic.rkey = rkey;
    cas.wr.atomic.compare_add = 100;
    cas.wr.atomic.swap = 200;
    struct ibv_sge fsge = { (uintptr_t)(buf + 4104), 8, mr->lkey };
    struct ibv_send_wr fadd = cas;
    fadd.wr_id = 7;
    fadd.sg_list = &fsge;
    fadd.opcode = IBV_WR_ATOMIC_FETCH_AND_ADD;
    fadd.wr.atomic.compare_add = 5;
    CHECK(ibv_post_send(p, &cas, &bad) == 0 && ibv_post_send(p, &fadd, &bad) == 0,
          "post the atomics");
    int ops[] = { IBV_WC_SEND, IBV_WC_SEND, IBV_WC_RDMA_WRITE, IBV_WC_RDMA_WRITE,
                  IBV_WC_RDMA_READ, IBV_WC_COMP_SWAP, IBV_WC_FETCH_ADD };
    for (int k = 0; k < 7; k++)
        EXPECT(cq, 1 + k, IBV_WC_SUCCESS, ops[k], "every opcode, in order");
    CHECK(buf[8192] == 'R' && buf[8447] == 'R', "READ data");
    CHECK(*(uint64_t *)(buf + 4096) == 100 && *(uint64_t *)(buf + 4104) == 200,
          "original values %" PRIu64 " %" PRIu64, *(uint64_t *)(buf + 4096),
          *(uint64_t *)(buf + 4104));

    /* 1: a wrong rkey fails that WR; the one behind it is flushed. */
    CHECK(post(qps[1], IBV_WR_RDMA_WRITE, 11, buf, 64, mr->lkey, SIG, raddr, rkey ^ 0x5555) == 0 &&
          post(qps[1], IBV_WR_RDMA_WRITE, 12, buf, 64, mr->lkey, SIG, raddr, rkey) == 0,
          "post two WRITEs");
    EXPECT(cq, 11, IBV_WC_REM_ACCESS_ERR, IBV_WC_RDMA_WRITE, "wrong rkey");
    EXPECT(cq, 12, IBV_WC_WR_FLUSH_ERR, -1, "behind the failed WR");
    /* 2: too long for the receive. */
    CHECK(post(qps[2], IBV_WR_SEND, 21, buf, 64, mr->lkey, SIG, 0, 0) == 0, "post SEND");
    EXPECT(cq, 21, IBV_WC_REM_INV_REQ_ERR, IBV_WC_SEND, "receive too short");
    /* 3: no receive, one RNR retry. */
    CHECK(post(qps[3], IBV_WR_SEND, 31, buf, 64, mr->lkey, SIG, 0, 0) == 0, "post SEND");
    EXPECT(cq, 31, IBV_WC_RNR_RETRY_EXC_ERR, IBV_WC_SEND, "no receive");
    /* 4: the receive comes late; RNR retries until it does. */
    memset(buf + 512, 'L', 64);
    CHECK(post(qps[4], IBV_WR_SEND, 41, buf + 512, 64, mr->lkey, SIG, 0, 0) == 0, "post SEND");
    EXPECT(cq, 41, IBV_WC_SUCCESS, IBV_WC_SEND, "a late receive");
    /* 5: a region without remote read access. */
    CHECK(post(qps[5], IBV_WR_RDMA_READ, 51, buf, 64, mr->lkey, SIG, ro_addr, ro_rkey) == 0,
          "post READ");
    EXPECT(cq, 51, IBV_WC_REM_ACCESS_ERR, IBV_WC_RDMA_READ, "no remote read access");
    /* 6: another QP's number: nothing delivered. */
    memset(buf + 1024, 'F', 64);
    for (int k = 0; k < 3; k++)
        CHECK(post(qps[6], IBV_WR_RDMA_WRITE, 61 + k, buf + 1024, 64, mr->lkey, SIG,
                   raddr + 1024, rkey) == 0, "post the forged WRITEs");
    EXPECT(cq, 61, IBV_WC_RETRY_EXC_ERR, -1, "a QP not connected to us");
    EXPECT(cq, 62, IBV_WC_WR_FLUSH_ERR, -1, "behind the refused WR");
    EXPECT(cq, 63, IBV_WC_WR_FLUSH_ERR, -1, "behind the refused WR");
    send_line(c, "done\n");
    return verdict("checks passed");
}

/* WRITEs in flight until one fails: RETRY_EXC_ERR first, WR_FLUSH_ERR for the rest. */
static int stream_client(const char *ip, int port)
{
    uint32_t q[SERVER_QPS], rkey, ro_rkey;
    uint64_t raddr, ro_addr, next = 1, done = 0;
    int c = client_exchange(ip, port, q, &raddr, &rkey, &ro_addr, &ro_rkey);
    double end = now_ms() + 60000;
    struct ibv_wc wc;
    while (now_ms() < end) {
        while (next - done <= 8)
            CHECK(post(qps[0], IBV_WR_RDMA_WRITE, next++, buf, BUF, mr->lkey, SIG, raddr,
                       rkey) == 0, "post WRITE");
        if (ibv_poll_cq(cq, 1, &wc) != 1)
            continue;
        CHECK(wc.wr_id == done + 1, "completion %" PRIu64 " after %" PRIu64, wc.wr_id, done);
        done = wc.wr_id;
        if (wc.status != IBV_WC_SUCCESS)
            break;
        if (done % 500 == 200)
            printf("STREAMING %" PRIu64 "\n", done);
    }
    double failed_at = now_ms();
    CHECK(wc.status == IBV_WC_RETRY_EXC_ERR, "the first failure: %s after %" PRIu64 " WRITEs",
          ibv_wc_status_str(wc.status), done);
    for (uint64_t id = done + 1; id < next; id++)
        EXPECT(cq, id, IBV_WC_WR_FLUSH_ERR, -1, "behind the failed WR");
    printf("%" PRIu64 " WRITEs done, then RETRY_EXC_ERR and %" PRIu64 " flushed in %.1f ms\n",
           done - 1, next - done - 1, now_ms() - failed_at);
    close(c);
    return verdict("checks passed");
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc >= 3 && strcmp(argv[1], "server") == 0)
        return server(atoi(argv[2]), 0);
    if (argc >= 3 && strcmp(argv[1], "stream-server") == 0)
        return server(atoi(argv[2]), 1);
    if (argc >= 4 && strcmp(argv[1], "stream-client") == 0)
        return stream_client(argv[2], atoi(argv[3]));
    if (argc >= 4 && strcmp(argv[1], "client") == 0)
        return client(argv[2], atoi(argv[3]));
    printf("usage: probe server PORT | probe client SERVER_IP PORT\n");
    return 2;
}
