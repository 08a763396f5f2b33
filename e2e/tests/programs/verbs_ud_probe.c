/* UD and UC queue pairs through Freeflow's libibverbs.so.1, built against the installed headers
 * (e2e/tests/verbs_ud.rs runs it in registered containers): address handles, qkeys (and the
 * privileged-qkey rule), the GRH area in front of each UD receive, the fields of a UD
 * completion, ibv_init_ah_from_wc / ibv_create_ah_from_wc, the MTU limit, the operations each
 * transport refuses, UC's silent drops, and that a UD send reaches no other tenant. */
#include "verbs_probe.h"
#include <arpa/inet.h>

#define QKEY 0x11111111u
#define GRH 40
#define MTU 1024

static struct ibv_context *ctx;
static struct ibv_pd *pd;
static union ibv_gid my_gid;
static unsigned char *buf;
static struct ibv_mr *mr;

static void open_ctx(void)
{
    ctx = open_device();
    pd = ibv_alloc_pd(ctx);
    buf = calloc(1, 1 << 16);
    mr = pd && buf ? ibv_reg_mr(pd, buf, 1 << 16, ALL_ACCESS) : NULL;
    if (!mr || ibv_query_gid(ctx, 1, 0, &my_gid)) {
        printf("pd/mr/gid: %s\n", strerror(errno));
        exit(1);
    }
}

static struct ibv_qp *new_qp(struct ibv_cq *cq, enum ibv_qp_type type)
{
    struct ibv_qp_init_attr init = { .send_cq = cq, .recv_cq = cq, .qp_type = type,
                                     .cap = { .max_send_wr = 64, .max_recv_wr = 64,
                                              .max_send_sge = 2, .max_recv_sge = 2,
                                              .max_inline_data = 64 } };
    return ibv_create_qp(pd, &init);
}

/* A UD QP from RESET to RTS with qkey. */
static int ud_up(struct ibv_qp *qp, uint32_t qkey)
{
    struct ibv_qp_attr a = { .qp_state = IBV_QPS_INIT, .pkey_index = 0, .port_num = 1,
                             .qkey = qkey };
    int r = ibv_modify_qp(qp, &a, IBV_QP_STATE | IBV_QP_PKEY_INDEX | IBV_QP_PORT | IBV_QP_QKEY);
    struct ibv_qp_attr rtr = { .qp_state = IBV_QPS_RTR };
    r |= ibv_modify_qp(qp, &rtr, IBV_QP_STATE);
    struct ibv_qp_attr rts = { .qp_state = IBV_QPS_RTS, .sq_psn = 0 };
    r |= ibv_modify_qp(qp, &rts, IBV_QP_STATE | IBV_QP_SQ_PSN);
    return r;
}

static struct ibv_ah *ah_to(union ibv_gid gid, uint8_t hop_limit)
{
    struct ibv_ah_attr a = { .is_global = 1, .port_num = 1 };
    a.grh.dgid = gid;
    a.grh.hop_limit = hop_limit;
    a.grh.traffic_class = 0;
    return ibv_create_ah(pd, &a);
}

/* A UD send of len bytes at p (with immediate data imm unless 0). */
static int ud_send(struct ibv_qp *qp, uint64_t id, struct ibv_ah *ah, uint32_t qpn,
                   uint32_t qkey, void *p, uint32_t len, uint32_t imm)
{
    struct ibv_sge sge = { .addr = (uintptr_t)p, .length = len, .lkey = mr->lkey };
    struct ibv_send_wr wr = { .wr_id = id, .sg_list = &sge, .num_sge = 1,
                              .opcode = imm ? IBV_WR_SEND_WITH_IMM : IBV_WR_SEND,
                              .send_flags = SIG, .imm_data = htonl(imm) }, *bad = NULL;
    wr.wr.ud.ah = ah;
    wr.wr.ud.remote_qpn = qpn;
    wr.wr.ud.remote_qkey = qkey;
    return ibv_post_send(qp, &wr, &bad);
}

/* One completion within 3 s, returned in *wc; a failed check otherwise. */
static int got(struct ibv_cq *cq, struct ibv_wc *wc, const char *what)
{
    memset(wc, 0xee, sizeof(*wc));
    int ok = wait_wc(cq, wc, 3000);
    CHECK(ok, "%s: no completion", what);
    return ok;
}

/* The GRH area at g: an IPv4 header from src to dst (RoCE v2 over IPv4) behind 20 zero bytes. */
static void check_grh(const unsigned char *g, const char *src, const char *dst, int ttl,
                      uint32_t payload, const char *what)
{
    static const unsigned char zeros[20];
    struct in_addr s, d;
    inet_pton(AF_INET, src, &s);
    inet_pton(AF_INET, dst, &d);
    uint32_t sum = 0;
    for (int i = 20; i < 40; i += 2)
        sum += (uint32_t)g[i] << 8 | g[i + 1];
    while (sum >> 16)
        sum = (sum & 0xffff) + (sum >> 16);
    uint16_t total = (uint16_t)(g[22] << 8 | g[23]);
    CHECK(memcmp(g, zeros, 20) == 0, "%s: GRH bytes 0..20 zero", what);
    CHECK(g[20] == 0x45 && g[29] == 17 && g[28] == ttl, "%s: IPv4/UDP header, TTL %d (%02x %d %d)",
          what, ttl, g[20], g[29], g[28]);
    CHECK(sum == 0xffff, "%s: IPv4 header checksum", what);
    CHECK(total >= 20 + 8 + 12 + 8 + payload, "%s: IPv4 total length %u", what, total);
    CHECK(memcmp(g + 32, &s, 4) == 0 && memcmp(g + 36, &d, 4) == 0, "%s: source %s, dest %s",
          what, src, dst);
}

static void ud_checks(const char *other_ip, uint32_t red_qpn, const char *server_ip,
                      uint32_t server_qpn)
{
    struct ibv_cq *cq = ibv_create_cq(ctx, 256, NULL, NULL, 0);
    struct ibv_cq *cqb = ibv_create_cq(ctx, 256, NULL, NULL, 0);
    struct ibv_qp *a = new_qp(cq, IBV_QPT_UD), *b = new_qp(cqb, IBV_QPT_UD);
    CHECK(cq && cqb && a && b, "create UD QPs");
    if (!a || !b)
        return;
    /* The state machine: a qkey at INIT; the privileged bit is the kernel's EPERM. */
    struct ibv_qp_attr at = { .qp_state = IBV_QPS_INIT, .port_num = 1, .qkey = 0x80000001 };
    int mask = IBV_QP_STATE | IBV_QP_PKEY_INDEX | IBV_QP_PORT | IBV_QP_QKEY;
    CHECK(ibv_modify_qp(a, &at, mask) == EPERM, "a privileged qkey is EPERM");
    CHECK(ibv_modify_qp(a, &at, mask & ~IBV_QP_QKEY) == EINVAL, "INIT of UD without qkey");
    at.qp_access_flags = IBV_ACCESS_REMOTE_WRITE;
    CHECK(ibv_modify_qp(a, &at, mask | IBV_QP_ACCESS_FLAGS) == EINVAL, "access flags on UD");
    CHECK(ud_up(a, QKEY) == 0 && ud_up(b, QKEY) == 0, "UD QPs to RTS");
    struct ibv_qp_attr q;
    struct ibv_qp_init_attr qi;
    CHECK(ibv_query_qp(b, &q, IBV_QP_QKEY, &qi) == 0 && q.qkey == QKEY &&
          qi.qp_type == IBV_QPT_UD && q.qp_state == IBV_QPS_RTS, "query: qkey, type, state");

    /* Address handles: RoCE needs the GRH; another tenant's address is unreachable. */
    struct ibv_ah_attr bad = { .is_global = 0, .port_num = 1 };
    errno = 0;
    CHECK(ibv_create_ah(pd, &bad) == NULL && errno == EINVAL, "AH without GRH: EINVAL");
    errno = 0;
    CHECK(ah_to(gid_of(other_ip), 1) == NULL && errno == ENETUNREACH,
          "AH to another tenant's container: ENETUNREACH");
    struct ibv_ah *self = ah_to(my_gid, 7);
    CHECK(self != NULL, "AH to this container");
    if (!self)
        return;

    /* A SEND with immediate data from a to b: GRH area, then the message. */
    unsigned char *rb = buf, *sb = buf + 8192;
    for (int i = 0; i < MTU + 64; i++)
        sb[i] = (unsigned char)(i * 7 + 1);
    memset(rb, 0, 4096);
    CHECK(post_recv(b, 1, rb, GRH + MTU, mr->lkey) == 0, "post receive");
    CHECK(ud_send(a, 2, self, b->qp_num, QKEY, sb, 100, 0xabcd) == 0, "post UD send");
    struct ibv_wc wc;
    if (got(cq, &wc, "sender"))
        CHECK(wc.wr_id == 2 && wc.status == IBV_WC_SUCCESS && wc.opcode == IBV_WC_SEND,
              "sender completion: %s", ibv_wc_status_str(wc.status));
    struct ibv_wc rwc;
    if (got(cqb, &rwc, "receiver")) {
        CHECK(rwc.wr_id == 1 && rwc.status == IBV_WC_SUCCESS && rwc.opcode == IBV_WC_RECV,
              "receive completion: %s", ibv_wc_status_str(rwc.status));
        CHECK(rwc.byte_len == GRH + 100, "byte_len %u is GRH + message", rwc.byte_len);
        CHECK((rwc.wc_flags & IBV_WC_GRH) && (rwc.wc_flags & IBV_WC_WITH_IMM) &&
              ntohl(rwc.imm_data) == 0xabcd, "GRH and immediate flags, imm %x", rwc.imm_data);
        CHECK(rwc.src_qp == a->qp_num && rwc.qp_num == b->qp_num, "src_qp %u, qp_num %u",
              rwc.src_qp, rwc.qp_num);
        CHECK(memcmp(rb + GRH, sb, 100) == 0, "the message follows the GRH area");
        char me[INET_ADDRSTRLEN];
        inet_ntop(AF_INET, &my_gid.raw[12], me, sizeof(me));
        check_grh(rb, me, me, 7, 100, "to itself");
        /* The sender's address from the completion, as a UD server answers. */
        struct ibv_ah_attr back;
        CHECK(ibv_init_ah_from_wc(ctx, 1, &rwc, (struct ibv_grh *)rb, &back) == 0 &&
              back.is_global == 1 && memcmp(&back.grh.dgid, &my_gid, 16) == 0 &&
              back.grh.sgid_index == 0 && back.port_num == 1, "init_ah_from_wc");
        struct ibv_ah *reply = ibv_create_ah_from_wc(pd, &rwc, (struct ibv_grh *)rb, 1);
        CHECK(reply != NULL, "create_ah_from_wc");
        CHECK(post_recv(a, 3, rb + 2048, GRH + MTU, mr->lkey) == 0 &&
              ud_send(b, 4, reply, rwc.src_qp, QKEY, sb, 10, 0) == 0, "answer");
        if (got(cq, &wc, "answer received"))
            CHECK(wc.wr_id == 3 && wc.status == IBV_WC_SUCCESS && wc.byte_len == GRH + 10 &&
                  !(wc.wc_flags & IBV_WC_WITH_IMM), "answer through an AH from the wc");
        EXPECT(cqb, 4, IBV_WC_SUCCESS, IBV_WC_SEND, "answer sent");
        CHECK(reply && ibv_destroy_ah(reply) == 0, "destroy_ah");
        struct ibv_wc fake = rwc;
        fake.wc_flags = 0;
        CHECK(ibv_init_ah_from_wc(ctx, 1, &fake, (struct ibv_grh *)rb, &back) != 0,
              "init_ah_from_wc of a completion without GRH fails");
    }

    /* A wrong qkey is dropped; a privileged remote_qkey means the sender's own. The sender
     * completes each; the receiver's next completion is the one that arrived. */
    CHECK(post_recv(b, 10, rb, GRH + MTU, mr->lkey) == 0, "post receive");
    CHECK(ud_send(a, 11, self, b->qp_num, QKEY + 1, sb, 8, 1) == 0 &&
          ud_send(a, 12, self, b->qp_num, 0x80000000, sb, 8, 2) == 0, "post qkey sends");
    EXPECT(cq, 11, IBV_WC_SUCCESS, IBV_WC_SEND, "wrong qkey: sent");
    EXPECT(cq, 12, IBV_WC_SUCCESS, IBV_WC_SEND, "privileged qkey: sent");
    if (got(cqb, &rwc, "qkey"))
        CHECK(rwc.wr_id == 10 && ntohl(rwc.imm_data) == 2,
              "only the message with the sender's own qkey arrived (imm %u)", ntohl(rwc.imm_data));
    /* No receive posted: dropped (no RNR in UD); an unknown QP number: dropped. */
    CHECK(ud_send(a, 13, self, b->qp_num, QKEY, sb, 8, 3) == 0 &&
          ud_send(a, 14, self, 0xfffffe, QKEY, sb, 8, 4) == 0, "post drops");
    EXPECT(cq, 13, IBV_WC_SUCCESS, IBV_WC_SEND, "no receive: sent");
    EXPECT(cq, 14, IBV_WC_SUCCESS, IBV_WC_SEND, "no such QP: sent");
    /* Forged destinations: another tenant's QP number behind our own addresses. */
    struct ibv_ah *srv = ah_to(gid_of(server_ip), 1);
    CHECK(srv != NULL, "AH to the server");
    CHECK(ud_send(a, 15, self, red_qpn, QKEY, sb, 8, 5) == 0 &&
          ud_send(a, 16, srv, red_qpn, QKEY, sb, 8, 6) == 0, "post forged sends");
    EXPECT(cq, 15, IBV_WC_SUCCESS, IBV_WC_SEND, "forged 1: sent");
    EXPECT(cq, 16, IBV_WC_SUCCESS, IBV_WC_SEND, "forged 2: sent");
    /* The server (our tenant) gets one datagram, whose GRH it checks. */
    CHECK(ud_send(a, 17, srv, server_qpn, QKEY, sb, 32, 7) == 0, "post to the server");
    EXPECT(cq, 17, IBV_WC_SUCCESS, IBV_WC_SEND, "to the server: sent");
    CHECK(post_recv(b, 18, rb, GRH + MTU, mr->lkey) == 0 &&
          ud_send(a, 19, self, b->qp_num, QKEY, sb, 8, 8) == 0, "post after drops");
    EXPECT(cq, 19, IBV_WC_SUCCESS, IBV_WC_SEND, "after drops: sent");
    if (got(cqb, &rwc, "after drops"))
        CHECK(rwc.wr_id == 18 && ntohl(rwc.imm_data) == 8, "nothing dropped arrived");

    /* Operations UD does not have are refused at post time. */
    CHECK(post(a, IBV_WR_RDMA_WRITE, 20, sb, 8, mr->lkey, SIG, (uintptr_t)rb, mr->rkey) == EINVAL,
          "UD RDMA WRITE: EINVAL");
    CHECK(post(a, IBV_WR_RDMA_READ, 21, sb, 8, mr->lkey, SIG, (uintptr_t)rb, mr->rkey) == EINVAL,
          "UD RDMA READ: EINVAL");

    /* A receive too short for GRH + message: the receiver's LOC_LEN_ERR (its QP to ERR). */
    CHECK(post_recv(b, 22, rb, GRH + 10, mr->lkey) == 0 &&
          ud_send(a, 23, self, b->qp_num, QKEY, sb, 100, 0) == 0, "post short receive");
    EXPECT(cq, 23, IBV_WC_SUCCESS, IBV_WC_SEND, "short receive: sent");
    EXPECT(cqb, 22, IBV_WC_LOC_LEN_ERR, IBV_WC_RECV, "short receive");
    CHECK(state_of(b) == IBV_QPS_ERR, "the receiver's QP is in ERR");

    /* Beyond the MTU: the sender's LOC_LEN_ERR, its QP to ERR. */
    CHECK(ud_send(a, 24, self, b->qp_num, QKEY, sb, MTU + 1, 0) == 0, "post oversize");
    EXPECT(cq, 24, IBV_WC_LOC_LEN_ERR, IBV_WC_SEND, "a message beyond the MTU");
    CHECK(state_of(a) == IBV_QPS_ERR, "the sender's QP is in ERR");

    CHECK(ibv_destroy_qp(a) == 0 && ibv_destroy_qp(b) == 0, "destroy QPs");
    CHECK(ibv_destroy_ah(self) == 0 && (!srv || ibv_destroy_ah(srv) == 0), "destroy AHs");
}

/* UC from RESET to RTS towards dest (this container), without RC's attributes. */
static int uc_up(struct ibv_qp *qp, uint32_t dest)
{
    int r = to_init(qp, IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE);
    struct ibv_qp_attr a = rtr_attr(dest, my_gid, 0);
    r |= ibv_modify_qp(qp, &a, IBV_QP_STATE | IBV_QP_AV | IBV_QP_PATH_MTU | IBV_QP_DEST_QPN |
                                   IBV_QP_RQ_PSN);
    struct ibv_qp_attr rts = { .qp_state = IBV_QPS_RTS, .sq_psn = 0 };
    r |= ibv_modify_qp(qp, &rts, IBV_QP_STATE | IBV_QP_SQ_PSN);
    return r;
}

static void uc_checks(void)
{
    struct ibv_cq *cq = ibv_create_cq(ctx, 256, NULL, NULL, 0);
    struct ibv_cq *cqd = ibv_create_cq(ctx, 256, NULL, NULL, 0);
    struct ibv_qp *c = new_qp(cq, IBV_QPT_UC), *d = new_qp(cqd, IBV_QPT_UC);
    CHECK(cq && cqd && c && d, "create UC QPs");
    if (!c || !d)
        return;
    /* RC's RTR mask is not UC's. */
    CHECK(to_init(c, IBV_ACCESS_REMOTE_WRITE) == 0, "UC INIT");
    CHECK(to_rtr(c, d->qp_num, my_gid, 1) == EINVAL, "UC RTR with RC's attributes: EINVAL");
    CHECK(uc_up(c, d->qp_num) == 0 && uc_up(d, c->qp_num) == 0, "UC QPs to RTS");
    unsigned char *rb = buf + 16384, *sb = buf + 32768;
    for (int i = 0; i < 4096; i++)
        sb[i] = (unsigned char)(i * 3 + 5);
    memset(rb, 0, 8192);
    /* SEND, WRITE, WRITE with immediate. */
    CHECK(post_recv(d, 1, rb, 4096, mr->lkey) == 0 &&
          post(c, IBV_WR_SEND, 2, sb, 3000, mr->lkey, SIG, 0, 0) == 0, "post UC send");
    EXPECT(cq, 2, IBV_WC_SUCCESS, IBV_WC_SEND, "UC send");
    EXPECT(cqd, 1, IBV_WC_SUCCESS, IBV_WC_RECV, "UC receive");
    CHECK(memcmp(rb, sb, 3000) == 0, "UC send data");
    CHECK(post(c, IBV_WR_RDMA_WRITE, 3, sb, 2000, mr->lkey, SIG, (uintptr_t)(rb + 4096),
               mr->rkey) == 0, "post UC write");
    EXPECT(cq, 3, IBV_WC_SUCCESS, IBV_WC_RDMA_WRITE, "UC write");
    CHECK(memcmp(rb + 4096, sb, 2000) == 0, "UC write data");
    /* Operations UC does not have. */
    CHECK(post(c, IBV_WR_RDMA_READ, 4, sb, 8, mr->lkey, SIG, (uintptr_t)rb, mr->rkey) == EINVAL,
          "UC RDMA READ: EINVAL");
    CHECK(post(c, IBV_WR_ATOMIC_FETCH_AND_ADD, 5, sb, 8, mr->lkey, SIG, (uintptr_t)rb,
               mr->rkey) == EINVAL, "UC atomic: EINVAL");
    /* No receive posted, a bad rkey: dropped without an error on either side. */
    CHECK(post(c, IBV_WR_SEND, 6, sb, 10, mr->lkey, SIG, 0, 0) == 0 &&
          post(c, IBV_WR_RDMA_WRITE, 7, sb, 10, mr->lkey, SIG, (uintptr_t)rb, mr->rkey + 1) == 0,
          "post drops");
    EXPECT(cq, 6, IBV_WC_SUCCESS, IBV_WC_SEND, "no receive: dropped, sender unaware");
    EXPECT(cq, 7, IBV_WC_SUCCESS, IBV_WC_RDMA_WRITE, "bad rkey: dropped, sender unaware");
    CHECK(state_of(c) == IBV_QPS_RTS && state_of(d) == IBV_QPS_RTS, "both QPs still in RTS");
    CHECK(post_recv(d, 8, rb, 4096, mr->lkey) == 0 &&
          post(c, IBV_WR_RDMA_WRITE_WITH_IMM, 9, sb, 16, mr->lkey, SIG, (uintptr_t)rb,
               mr->rkey) == 0, "post write with imm");
    EXPECT(cq, 9, IBV_WC_SUCCESS, IBV_WC_RDMA_WRITE, "UC write with imm");
    EXPECT(cqd, 8, IBV_WC_SUCCESS, IBV_WC_RECV_RDMA_WITH_IMM,
           "the receive after the drops is the write with imm's");
    CHECK(ibv_destroy_qp(c) == 0 && ibv_destroy_qp(d) == 0, "destroy UC QPs");
}

static int checks(const char *other_ip, uint32_t red_qpn, const char *server_ip,
                  uint32_t server_qpn)
{
    open_ctx();
    struct ibv_device_attr dev;
    CHECK(ibv_query_device(ctx, &dev) == 0 && dev.max_ah > 0, "max_ah");
    ud_checks(other_ip, red_qpn, server_ip, server_qpn);
    uc_checks();
    return verdict("checks passed");
}

/* Holds a UD QP (qkey QKEY) with receives posted; prints its QP number, waits for stdin to
 * close, then reports what arrived: "received N" and each datagram's GRH addresses. */
static int hold(void)
{
    open_ctx();
    struct ibv_cq *cq = ibv_create_cq(ctx, 64, NULL, NULL, 0);
    struct ibv_qp *qp = cq ? new_qp(cq, IBV_QPT_UD) : NULL;
    CHECK(qp && ud_up(qp, QKEY) == 0, "UD QP");
    if (!qp)
        return verdict("checks passed");
    for (int i = 0; i < 8; i++)
        CHECK(post_recv(qp, i, buf + i * 2048, 2048, mr->lkey) == 0, "post receive");
    printf("%u\n", qp->qp_num);
    char line[16];
    while (fgets(line, sizeof(line), stdin))
        ;
    /* The sender saw each send complete before stdin closed, and the router delivers a
     * datagram before it completes the send: whatever arrived is in the CQ now. */
    struct ibv_wc wc[8];
    int n = ibv_poll_cq(cq, 8, wc);
    printf("received %d\n", n);
    for (int i = 0; i < n; i++) {
        unsigned char *g = buf + wc[i].wr_id * 2048;
        char s[INET_ADDRSTRLEN], d[INET_ADDRSTRLEN];
        inet_ntop(AF_INET, g + 32, s, sizeof(s));
        inet_ntop(AF_INET, g + 36, d, sizeof(d));
        printf("datagram %s from %s to %s, %u bytes, src_qp %u\n",
               ibv_wc_status_str(wc[i].status), s, d, wc[i].byte_len, wc[i].src_qp);
        if (wc[i].status == IBV_WC_SUCCESS)
            check_grh(g, s, d, 1, 32, "held");
    }
    return verdict("checks passed");
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc >= 6 && strcmp(argv[1], "checks") == 0)
        return checks(argv[2], strtoul(argv[3], NULL, 0), argv[4], strtoul(argv[5], NULL, 0));
    if (argc >= 2 && strcmp(argv[1], "hold") == 0)
        return hold();
    printf("usage: ud_probe checks OTHER_TENANT_IP OTHER_QPN SERVER_IP SERVER_QPN | hold\n");
    return 2;
}
