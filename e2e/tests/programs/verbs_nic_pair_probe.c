/* The opcodes the hardware backend's device path carries, between two processes in containers
 * of two nested routers on two hosts (e2e/tests/verbs_nic.rs): a server and a client exchange
 * their QP numbers and the server region's address and rkey over TCP (as ibv_rc_pingpong does),
 * then the client sends SEND, SEND_WITH_IMM, RDMA WRITE, WRITE_WITH_IMM, an inline SEND and an
 * RDMA READ, each checked byte for byte (the server checks what it received and what was
 * written into its region, the client what it read), a compare-and-swap and a fetch-and-add
 * (old values and the word checked); then a WRITE with a forged rkey fails
 * with REM_ACCESS_ERR and writes nothing, the WRITE behind it flushed; reconnected, the
 * client's SEND to a server QP destroyed meanwhile exhausts its retries on the device
 * (RETRY_EXC_ERR), and an RTR toward that QP number fails (ENETUNREACH).
 * Usage: probe server PORT | probe client SERVER_IP PORT. Each prints "checks passed".
 * `probe connect SERVER_IP PORT`: only takes the server's QP number and moves its QP to RTR
 * toward it, printing "RTR failed: <error> after <ms> ms" or "RTR succeeded". */
#include "verbs_probe.h"
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>

#define BUF 65536
#define ACCESS (IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE | IBV_ACCESS_REMOTE_READ | \
                IBV_ACCESS_REMOTE_ATOMIC)
/* Where each operation lands in the server's region. */
#define AT_SEND 0
#define AT_SEND_IMM 4096
#define AT_WRITE 8192
#define AT_WRITE_IMM 30000
#define AT_READ 33000
#define AT_INLINE 63200
#define AT_ATOMIC 64000
#define WAIT_MS 10000

static struct ibv_context *ctx;
static struct ibv_pd *pd;
static struct ibv_cq *cq;
static struct ibv_qp *qp;
static unsigned char *buf;
static struct ibv_mr *mr;

static void fill(unsigned char *p, size_t n, unsigned seed)
{
    for (size_t i = 0; i < n; i++)
        p[i] = (unsigned char)(i * 31 + seed);
}

/* n bytes at p are fill(seed)'s. */
static int filled(const unsigned char *p, size_t n, unsigned seed)
{
    for (size_t i = 0; i < n; i++)
        if (p[i] != (unsigned char)(i * 31 + seed))
            return 0;
    return 1;
}

static void setup(void)
{
    ctx = open_device();
    pd = ibv_alloc_pd(ctx);
    cq = ibv_create_cq(ctx, 64, NULL, NULL, 0);
    buf = aligned_alloc(4096, BUF);
    memset(buf, 0, BUF);
    mr = pd ? ibv_reg_mr(pd, buf, BUF, ACCESS) : NULL;
    if (!pd || !cq || !mr) {
        printf("setup: %s\n", strerror(errno));
        exit(1);
    }
    struct ibv_qp_init_attr init = { .send_cq = cq, .recv_cq = cq, .qp_type = IBV_QPT_RC,
                                     .cap = { .max_send_wr = 16, .max_recv_wr = 16,
                                              .max_send_sge = 1, .max_recv_sge = 1,
                                              .max_inline_data = 64 } };
    qp = ibv_create_qp(pd, &init);
    if (!qp || to_init(qp, ACCESS)) {
        printf("qp: %s\n", strerror(errno));
        exit(1);
    }
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

/* The next completion: this wr_id, status, opcode and (for a receive) length and immediate. */
static void expect(uint64_t id, enum ibv_wc_status st, int opcode, int len, int imm,
                   uint32_t imm_value, const char *what)
{
    struct ibv_wc wc;
    memset(&wc, 0, sizeof(wc));
    if (!wait_wc(cq, &wc, WAIT_MS)) {
        CHECK(0, "%s: no completion", what);
        return;
    }
    CHECK(wc.wr_id == id && wc.status == st && (opcode < 0 || (int)wc.opcode == opcode) &&
              (len < 0 || (int)wc.byte_len == len),
          "%s: wr_id %" PRIu64 " status %s opcode %d byte_len %u", what, wc.wr_id,
          ibv_wc_status_str(wc.status), wc.opcode, wc.byte_len);
    if (imm)
        CHECK((wc.wc_flags & IBV_WC_WITH_IMM) && ntohl(wc.imm_data) == imm_value,
              "%s: wc_flags %#x imm %#x", what, wc.wc_flags, ntohl(wc.imm_data));
}

static int post_imm(enum ibv_wr_opcode op, uint64_t id, void *p, uint32_t len, uint32_t imm,
                    uint64_t raddr, uint32_t rkey)
{
    struct ibv_sge sge = { .addr = (uintptr_t)p, .length = len, .lkey = mr->lkey };
    struct ibv_send_wr wr = { .wr_id = id, .sg_list = &sge, .num_sge = 1, .opcode = op,
                              .send_flags = SIG }, *bad = NULL;
    wr.imm_data = htonl(imm);
    wr.wr.rdma.remote_addr = raddr;
    wr.wr.rdma.rkey = rkey;
    return ibv_post_send(qp, &wr, &bad);
}

static int server(int port)
{
    setup();
    fill(buf + AT_READ, 30000, 5);
    *(uint64_t *)(buf + AT_ATOMIC) = 100;
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
    char line[256], ip[32];
    inet_ntop(AF_INET, &peer.sin_addr, ip, sizeof(ip));
    snprintf(line, sizeof(line), "%u %" PRIu64 " %u\n", qp->qp_num, (uint64_t)(uintptr_t)buf,
             mr->rkey);
    send_line(c, line);
    read_line(c, line, sizeof(line));
    uint32_t dest;
    if (sscanf(line, "%u", &dest) != 1) {
        printf("bad line from the client: %s\n", line);
        return 1;
    }
    CHECK(post_recv(qp, 10, buf + AT_SEND, 4096, mr->lkey) == 0, "post_recv");
    CHECK(post_recv(qp, 20, buf + AT_SEND_IMM, 4096, mr->lkey) == 0, "post_recv");
    CHECK(post_recv(qp, 40, buf + AT_INLINE, 16, mr->lkey) == 0, "post_recv");
    CHECK(post_recv(qp, 60, buf + AT_INLINE, 64, mr->lkey) == 0, "post_recv");
    CHECK(to_rtr(qp, dest, gid_of(ip), 12) == 0 && to_rts(qp, 14, 7, 7) == 0,
          "connect the server QP to %s QP %u", ip, dest);
    send_line(c, "ready\n");
    expect(10, IBV_WC_SUCCESS, IBV_WC_RECV, 4096, 0, 0, "SEND received");
    CHECK(filled(buf + AT_SEND, 4096, 1), "SEND: bytes differ");
    expect(20, IBV_WC_SUCCESS, IBV_WC_RECV, 1000, 1, 0xc0ffee, "SEND_WITH_IMM received");
    CHECK(filled(buf + AT_SEND_IMM, 1000, 2), "SEND_WITH_IMM: bytes differ");
    expect(40, IBV_WC_SUCCESS, IBV_WC_RECV_RDMA_WITH_IMM, 2000, 1, 0x4242,
           "WRITE_WITH_IMM received");
    /* The WRITE came before the WRITE_WITH_IMM on the same QP: both are in place. */
    CHECK(filled(buf + AT_WRITE, 20000, 3), "WRITE: bytes differ");
    CHECK(filled(buf + AT_WRITE_IMM, 2000, 4), "WRITE_WITH_IMM: bytes differ");
    expect(60, IBV_WC_SUCCESS, IBV_WC_RECV, 48, 0, 0, "inline SEND received");
    CHECK(filled(buf + AT_INLINE, 48, 6), "inline SEND: bytes differ");
    /* The client reads, then forges an rkey for a WRITE over the SEND's bytes. */
    read_line(c, line, sizeof(line));
    CHECK(strcmp(line, "destroy") == 0, "the client said %s", line);
    CHECK(filled(buf + AT_SEND, 4096, 1), "the forged WRITE wrote into the region");
    CHECK(*(uint64_t *)(buf + AT_ATOMIC) == 205, "the atomics left %" PRIu64,
          *(uint64_t *)(buf + AT_ATOMIC));
    CHECK(ibv_destroy_qp(qp) == 0, "destroy the server QP");
    send_line(c, "destroyed\n");
    read_line(c, line, sizeof(line));
    CHECK(strcmp(line, "done") == 0, "the client said %s", line);
    return verdict("checks passed");
}

static int client(const char *ip, int port, int connect_only)
{
    setup();
    int c = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(port) };
    inet_pton(AF_INET, ip, &a.sin_addr);
    if (connect(c, (struct sockaddr *)&a, sizeof(a))) {
        printf("connect: %s\n", strerror(errno));
        return 1;
    }
    char line[256];
    read_line(c, line, sizeof(line));
    uint32_t dest, rkey;
    uint64_t raddr;
    if (sscanf(line, "%u %" SCNu64 " %u", &dest, &raddr, &rkey) != 3) {
        printf("bad line from the server: %s\n", line);
        return 1;
    }
    snprintf(line, sizeof(line), "%u\n", qp->qp_num);
    send_line(c, line);
    if (connect_only) {
        double start = now_ms();
        int r = to_rtr(qp, dest, gid_of(ip), 12);
        if (r)
            printf("RTR failed: %s after %.0f ms\n", strerror(r), now_ms() - start);
        else
            printf("RTR succeeded\n");
        return 0;
    }
    CHECK(to_rtr(qp, dest, gid_of(ip), 12) == 0 && to_rts(qp, 14, 7, 7) == 0,
          "connect the client QP to %s QP %u", ip, dest);
    read_line(c, line, sizeof(line));
    CHECK(strcmp(line, "ready") == 0, "the server said %s", line);

    unsigned char *out = buf, *in = buf + 32768;
    fill(out, 4096, 1);
    CHECK(post(qp, IBV_WR_SEND, 11, out, 4096, mr->lkey, SIG, 0, 0) == 0, "post SEND");
    expect(11, IBV_WC_SUCCESS, IBV_WC_SEND, -1, 0, 0, "SEND");
    fill(out, 1000, 2);
    CHECK(post_imm(IBV_WR_SEND_WITH_IMM, 21, out, 1000, 0xc0ffee, 0, 0) == 0,
          "post SEND_WITH_IMM");
    expect(21, IBV_WC_SUCCESS, IBV_WC_SEND, -1, 0, 0, "SEND_WITH_IMM");
    fill(out, 20000, 3);
    CHECK(post(qp, IBV_WR_RDMA_WRITE, 31, out, 20000, mr->lkey, SIG, raddr + AT_WRITE, rkey) ==
              0, "post WRITE");
    expect(31, IBV_WC_SUCCESS, IBV_WC_RDMA_WRITE, -1, 0, 0, "WRITE");
    fill(out, 2000, 4);
    CHECK(post_imm(IBV_WR_RDMA_WRITE_WITH_IMM, 41, out, 2000, 0x4242, raddr + AT_WRITE_IMM,
                   rkey) == 0, "post WRITE_WITH_IMM");
    expect(41, IBV_WC_SUCCESS, IBV_WC_RDMA_WRITE, -1, 0, 0, "WRITE_WITH_IMM");
    unsigned char small[48];
    fill(small, sizeof(small), 6);
    CHECK(post(qp, IBV_WR_SEND, 61, small, sizeof(small), 0, SIG | IBV_SEND_INLINE, 0, 0) == 0,
          "post inline SEND");
    memset(small, 0, sizeof(small));
    expect(61, IBV_WC_SUCCESS, IBV_WC_SEND, -1, 0, 0, "inline SEND");
    memset(in, 0, 30000);
    CHECK(post(qp, IBV_WR_RDMA_READ, 51, in, 30000, mr->lkey, SIG, raddr + AT_READ, rkey) == 0,
          "post READ");
    expect(51, IBV_WC_SUCCESS, IBV_WC_RDMA_READ, 30000, 0, 0, "READ");
    CHECK(filled(in, 30000, 5), "READ: bytes differ");
    uint64_t *old = (uint64_t *)in;
    CHECK(post_atomic(qp, IBV_WR_ATOMIC_CMP_AND_SWP, 52, in, mr->lkey, raddr + AT_ATOMIC, rkey,
                      100, 200) == 0, "post CMP_AND_SWP");
    expect(52, IBV_WC_SUCCESS, IBV_WC_COMP_SWAP, -1, 0, 0, "CMP_AND_SWP");
    CHECK(*old == 100, "CMP_AND_SWP: old value %" PRIu64, *old);
    CHECK(post_atomic(qp, IBV_WR_ATOMIC_FETCH_AND_ADD, 53, in, mr->lkey, raddr + AT_ATOMIC, rkey,
                      5, 0) == 0, "post FETCH_AND_ADD");
    expect(53, IBV_WC_SUCCESS, IBV_WC_FETCH_ADD, -1, 0, 0, "FETCH_AND_ADD");
    CHECK(*old == 200, "FETCH_AND_ADD: old value %" PRIu64, *old);

    /* A forged rkey: REM_ACCESS_ERR, the WRITE behind it flushed, the QP in ERR. */
    fill(out, 4096, 7);
    CHECK(post(qp, IBV_WR_RDMA_WRITE, 71, out, 4096, mr->lkey, SIG, raddr + AT_SEND,
               rkey ^ 0x5a5a00) == 0, "post forged WRITE");
    CHECK(post(qp, IBV_WR_RDMA_WRITE, 72, out, 4096, mr->lkey, SIG, raddr + AT_SEND, rkey) == 0,
          "post WRITE behind it");
    expect(71, IBV_WC_REM_ACCESS_ERR, -1, -1, 0, 0, "forged rkey");
    expect(72, IBV_WC_WR_FLUSH_ERR, -1, -1, 0, 0, "WRITE behind the forged one");
    CHECK(state_of(qp) == IBV_QPS_ERR, "forged rkey: QP state %d", state_of(qp));

    /* Reconnected (the server's router is asked again), then the server destroys its QP: a
     * SEND finds no QP behind the real number and exhausts its retries, as on a device. */
    CHECK(to_state(qp, IBV_QPS_RESET) == 0 && to_init(qp, ACCESS) == 0 &&
              to_rtr(qp, dest, gid_of(ip), 12) == 0 && to_rts(qp, 10, 3, 7) == 0,
          "reconnect");
    send_line(c, "destroy\n");
    read_line(c, line, sizeof(line));
    CHECK(strcmp(line, "destroyed") == 0, "the server said %s", line);
    fill(out, 64, 8);
    CHECK(post(qp, IBV_WR_SEND, 81, out, 64, mr->lkey, SIG, 0, 0) == 0, "post SEND");
    expect(81, IBV_WC_RETRY_EXC_ERR, -1, -1, 0, 0, "SEND to a destroyed QP");
    /* Its number is withdrawn: a new QP cannot connect to it. */
    struct ibv_qp_init_attr init = { .send_cq = cq, .recv_cq = cq, .qp_type = IBV_QPT_RC,
                                     .cap = { .max_send_wr = 4, .max_recv_wr = 4,
                                              .max_send_sge = 1, .max_recv_sge = 1 } };
    struct ibv_qp *late = ibv_create_qp(pd, &init);
    CHECK(late && to_init(late, ACCESS) == 0, "a new QP");
    int r = late ? to_rtr(late, dest, gid_of(ip), 12) : -1;
    CHECK(r == ENETUNREACH, "RTR toward a destroyed QP: %d (%s)", r, strerror(r));
    send_line(c, "done\n");
    return verdict("checks passed");
}

int main(int argc, char **argv)
{
    if (argc == 3 && strcmp(argv[1], "server") == 0)
        return server(atoi(argv[2]));
    if (argc == 4 && strcmp(argv[1], "client") == 0)
        return client(argv[2], atoi(argv[3]), 0);
    if (argc == 4 && strcmp(argv[1], "connect") == 0)
        return client(argv[2], atoi(argv[3]), 1);
    printf("usage: probe server PORT | probe client|connect SERVER_IP PORT\n");
    return 2;
}
