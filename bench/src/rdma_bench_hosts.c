/* freeflow-bench rdma --hosts 2: the two-process form of rdma_bench.c (included by it), one QP
 * in each of two containers on two simulated hosts, connected through both hosts' routers and
 * the routers' verbs transport on the host link.
 *
 *   rdma_bench peer PORT APP_CORE
 *   rdma_bench client PEER_IP PORT APP_CORE ROUTER0_PID ROUTER1_PID MESSAGES SAMPLES BW_OPS
 *              CM_CONNECTIONS
 *
 * The peer listens on TCP PORT (its container's overlay address), the client connects to it;
 * they swap QP number, GID, buffer address and rkey (as ibv_rc_pingpong does), then the client
 * drives the phases and tells the peer over that TCP connection what each needs from it:
 * 'S' n: take n SENDs (keep receives posted); 'E' n: answer n SENDs with a SEND; 'C' n: listen
 * with rdma_cm on PEER_IP (once) and serve n connections (rdma_bench_cm.c); 'Q': done.
 * The RDMA WRITE phases need nothing from the peer. Each host's router shares a core with its
 * host's program; the polling loops spin as perftest's do, and the library gives the core up
 * on a router core (shim/verbs/src/shared_core.rs). They used to call sched_yield after every
 * empty poll: under EEVDF each yield moves the caller's deadline a slice later, so a program
 * that yielded all the time came after every other task of its core whenever its completion
 * arrived (traced on a loaded machine: 64-133 us runnable at the median per wait, against
 * 43 us without).
 * The client prints the same JSON phase lines as the one-host form, with each router's CPU
 * time over the phase (router0_cpu_s, router1_cpu_s).
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

struct endpoint {
    uint32_t qpn;
    uint32_t rkey;
    uint64_t addr;
    union ibv_gid gid;
};

struct command {
    char op;
    char pad[7];
    uint64_t count;
};

static pid_t router1_pid;

static void send_all(int fd, const void *p, size_t n)
{
    for (const char *c = p; n > 0;) {
        ssize_t k = write(fd, c, n);
        if (k <= 0)
            die("control write");
        c += k;
        n -= (size_t)k;
    }
}

static void recv_all(int fd, void *p, size_t n)
{
    for (char *c = p; n > 0;) {
        ssize_t k = read(fd, c, n);
        if (k <= 0) {
            if (k == 0)
                errno = ECONNRESET;
            die("control read");
        }
        c += k;
        n -= (size_t)k;
    }
}

static void pin(int core)
{
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(core, &set);
    if (sched_setaffinity(0, sizeof(set), &set))
        die("pin to the application core");
}

/* Swaps endpoints over fd and moves s's QP to RTS towards the other side's. */
static struct endpoint exchange(int fd, struct side *s)
{
    struct endpoint mine = { s->qp->qp_num, s->mr->rkey, (uintptr_t)s->buf, s->gid }, theirs;
    send_all(fd, &mine, sizeof(mine));
    recv_all(fd, &theirs, sizeof(theirs));
    struct side other = { 0 };
    struct ibv_qp other_qp = { .qp_num = theirs.qpn };
    other.qp = &other_qp;
    other.gid = theirs.gid;
    connect_to(s, &other);
    char ready = 'c';
    send_all(fd, &ready, 1);
    recv_all(fd, &ready, 1);
    return theirs;
}

/* Receives still to post, and posted but not yet used. */
struct budget {
    long to_post;
    int posted;
};

/* Posts receives while fewer than `keep` are posted and the budget allows. */
static void top_up(struct side *s, struct budget *b, int keep)
{
    while (b->to_post > 0 && b->posted <= keep - BATCH) {
        int n = b->to_post < BATCH ? (int)b->to_post : BATCH;
        post_receives(s, n);
        b->to_post -= n;
        b->posted += n;
    }
}

/* Waits for one receive. */
static void wait_own_receive(struct side *s)
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

/* The peer's part of 'S': takes `count` SENDs. */
static void take_sends(int fd, struct side *s, long count)
{
    struct budget b = { count, 0 };
    top_up(s, &b, DEPTH);
    char ack = 'r';
    send_all(fd, &ack, 1);
    struct ibv_wc wc[64];
    for (long received = 0; received < count;) {
        int n = ibv_poll_cq(s->cq, 64, wc);
        for (int i = 0; i < n; i++)
            check(&wc[i]);
        received += n;
        b.posted -= n;
        top_up(s, &b, DEPTH);
    }
}

/* The peer's part of 'E': answers `count` SENDs. */
static void echo(int fd, struct side *s, long count)
{
    struct budget b = { count, 0 };
    top_up(s, &b, DEPTH / 2);
    char ack = 'r';
    send_all(fd, &ack, 1);
    for (long i = 0; i < count; i++) {
        wait_own_receive(s);
        post_list(s, IBV_WR_SEND, 1, 0, 0);
        b.posted--;
        top_up(s, &b, DEPTH / 2);
    }
}

/* 'C' n: the passive side of n rdma_cm connections on this container's address (the one the
 * client dialled), acknowledged once listening. */
static void serve_connections(int fd, long count)
{
    static struct rdma_event_channel *lch;
    static struct rdma_cm_id *listener;
    if (!lch) {
        struct sockaddr_in own;
        socklen_t len = sizeof(own);
        char ip[INET_ADDRSTRLEN];
        if (getsockname(fd, (struct sockaddr *)&own, &len) ||
            !inet_ntop(AF_INET, &own.sin_addr, ip, sizeof(ip)))
            die("own address");
        lch = cm_listen(ip, &listener);
    }
    send_all(fd, "k", 1);
    for (long i = 0; i < count; i++)
        cm_serve_one(lch);
}

static int peer_main(int argc, char **argv)
{
    if (argc != 4) {
        fprintf(stderr, "usage: rdma_bench peer PORT APP_CORE\n");
        return 2;
    }
    pin(atoi(argv[3]));
    struct side s;
    setup(&s);
    int ls = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(atoi(argv[2])) };
    if (ls < 0 || bind(ls, (struct sockaddr *)&a, sizeof(a)) || listen(ls, 1))
        die("listen");
    printf("READY\n");
    fflush(stdout);
    int fd = accept(ls, NULL, NULL);
    if (fd < 0)
        die("accept");
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    exchange(fd, &s);
    for (;;) {
        struct command c;
        recv_all(fd, &c, sizeof(c));
        if (c.op == 'S')
            take_sends(fd, &s, (long)c.count);
        else if (c.op == 'E')
            echo(fd, &s, (long)c.count);
        else if (c.op == 'C')
            serve_connections(fd, (long)c.count);
        else
            return 0;
    }
}

/* Tells the peer what the next phase needs and waits until it is ready. */
static void ask(int fd, char op, long count)
{
    struct command c = { .op = op, .count = (uint64_t)count };
    send_all(fd, &c, sizeof(c));
    char ack;
    if (op != 'Q')
        recv_all(fd, &ack, 1);
}

static void report2(const char *phase, long ops, double seconds, double cpu0, double cpu1,
                    long bytes)
{
    printf("{\"phase\":\"%s\",\"ops\":%ld,\"seconds\":%.9f,\"router_cpu_s\":%.6f,"
           "\"router1_cpu_s\":%.6f,\"bytes\":%ld}\n",
           phase, ops, seconds, cpu0, cpu1, bytes);
    fflush(stdout);
}

/* Both routers' CPU time. */
static void routers_cpu(double cpu[2])
{
    pid_t first = router_pid;
    cpu[0] = router_cpu();
    router_pid = router1_pid;
    cpu[1] = router_cpu();
    router_pid = first;
}

/* Message rate of 64-byte SENDs or RDMA WRITEs to the peer. */
static void xrate(int fd, struct side *s, struct endpoint *peer, enum ibv_wr_opcode op,
                  long messages, const char *phase)
{
    if (op == IBV_WR_SEND)
        ask(fd, 'S', messages);
    struct ibv_wc wc[64];
    long sent = 0, done = 0;
    double c0[2], c1[2];
    routers_cpu(c0);
    double t0 = now_s();
    while (done < messages) {
        while (sent < messages && sent - done <= DEPTH - 2 * BATCH) {
            post_list(s, op, BATCH, (uintptr_t)peer->addr, peer->rkey);
            sent += BATCH;
        }
        int n = ibv_poll_cq(s->cq, 64, wc);
        for (int i = 0; i < n; i++)
            check(&wc[i]);
        done += (long)n * BATCH;
    }
    double t1 = now_s();
    routers_cpu(c1);
    report2(phase, messages, t1 - t0, c1[0] - c0[0], c1[1] - c0[1], messages * MSG);
}

/* Round trips of a 64-byte SEND to the peer and back; prints the samples (ns). */
static void xrtt(int fd, struct side *s, long samples)
{
    struct budget b = { samples, 0 };
    top_up(s, &b, DEPTH / 2);
    ask(fd, 'E', samples);
    uint64_t *ns = malloc(samples * sizeof(uint64_t));
    double c0[2], c1[2];
    routers_cpu(c0);
    double t0 = now_s();
    for (long i = 0; i < samples; i++) {
        uint64_t start = now_ns();
        post_list(s, IBV_WR_SEND, 1, 0, 0);
        wait_own_receive(s);
        ns[i] = now_ns() - start;
        b.posted--;
        top_up(s, &b, DEPTH / 2);
    }
    double t1 = now_s();
    routers_cpu(c1);
    report2("rtt", samples, t1 - t0, c1[0] - c0[0], c1[1] - c0[1], samples * 2 * MSG);
    printf("{\"phase\":\"rtt_samples\",\"ns\":[");
    for (long i = 0; i < samples; i++)
        printf(i ? ",%" PRIu64 : "%" PRIu64, ns[i]);
    printf("]}\n");
    fflush(stdout);
    free(ns);
}

/* Bandwidth of 64 KiB RDMA WRITEs to the peer's buffer, BW_DEPTH in flight. */
static void xwrite_bw(struct side *s, struct endpoint *peer, long ops)
{
    struct ibv_wc wc[16];
    long posted = 0, done = 0;
    double c0[2], c1[2];
    routers_cpu(c0);
    double t0 = now_s();
    while (done < ops) {
        while (posted < ops && posted - done < BW_DEPTH) {
            int slot = posted % BW_SLOTS;
            struct ibv_sge sge = { (uintptr_t)s->buf + slot * BW_SIZE, BW_SIZE, s->mr->lkey };
            struct ibv_send_wr wr = { .wr_id = 3, .sg_list = &sge, .num_sge = 1,
                                      .opcode = IBV_WR_RDMA_WRITE,
                                      .send_flags = IBV_SEND_SIGNALED }, *bad;
            wr.wr.rdma.remote_addr = peer->addr + slot * BW_SIZE;
            wr.wr.rdma.rkey = peer->rkey;
            if (ibv_post_send(s->qp, &wr, &bad))
                die("post write");
            posted++;
        }
        int n = ibv_poll_cq(s->cq, 16, wc);
        for (int i = 0; i < n; i++) {
            check(&wc[i]);
            /* Not the round trips' last send, which may complete only now. */
            done += wc[i].wr_id == 3;
        }
    }
    double t1 = now_s();
    routers_cpu(c1);
    report2("write_bw", ops, t1 - t0, c1[0] - c0[0], c1[1] - c0[1], ops * BW_SIZE);
}

/* Connects to the peer, retrying for up to 10 s while it starts. */
static int dial(const char *ip, int port)
{
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(port) };
    if (inet_pton(AF_INET, ip, &a.sin_addr) != 1)
        die("peer address");
    for (int tries = 0;; tries++) {
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        if (fd < 0)
            die("socket");
        if (connect(fd, (struct sockaddr *)&a, sizeof(a)) == 0) {
            int one = 1;
            setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
            return fd;
        }
        close(fd);
        if (tries == 100)
            die("connect to the peer");
        usleep(100000);
    }
}

static int client_main(int argc, char **argv)
{
    if (argc != 11) {
        fprintf(stderr, "usage: rdma_bench client PEER_IP PORT APP_CORE ROUTER0_PID "
                        "ROUTER1_PID MESSAGES SAMPLES BW_OPS CM_CONNECTIONS\n");
        return 2;
    }
    pin(atoi(argv[4]));
    router_pid = atoi(argv[5]);
    router1_pid = atoi(argv[6]);
    long messages = atol(argv[7]) / BATCH * BATCH, samples = atol(argv[8]), bw_ops = atol(argv[9]);
    struct side s;
    setup(&s);
    int fd = dial(argv[2], atoi(argv[3]));
    struct endpoint peer = exchange(fd, &s);
    xrate(fd, &s, &peer, IBV_WR_SEND, messages, "send_rate");
    xrate(fd, &s, &peer, IBV_WR_RDMA_WRITE, messages, "write_rate");
    xrtt(fd, &s, samples);
    xwrite_bw(&s, &peer, bw_ops);
    long cm_connections = atol(argv[10]);
    /* The peer serves the warm-up connection too. */
    ask(fd, 'C', cm_connections + 1);
    cm_rate(argv[2], cm_connections, 0, routers_cpu);
    ask(fd, 'Q', 0);
    close(fd);
    return 0;
}
