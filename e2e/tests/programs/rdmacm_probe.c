/* rdma_cm through Freeflow's librdmacm.so.1, built against the installed headers and Debian's
 * librdmacm (so it imports the functions at rdma-core's versions); e2e/tests/rdmacm.rs runs it in
 * the client container (10.32.0.3, tenant blue). Both sides of each connection live in this
 * process, on one event channel: the channel's fd (O_NONBLOCK, poll, epoll), address and route
 * resolution, connect with private data, reject with private data, accept, the QPs moved to RTS
 * and carrying a SEND, disconnect, and the errors (another tenant's address, a port nobody
 * listens on, an address not ours, a port bound twice, private data too long, what Freeflow
 * does not offer). Usage: rdmacm_probe SAME_TENANT_PEER OTHER_TENANT_ADDRESS. */
#include "verbs_probe.h"
#include <arpa/inet.h>
#include <fcntl.h>
#include <poll.h>
#include <rdma/rdma_cma.h>
#include <rdma/rsocket.h>
#include <sys/epoll.h>

static const char *OWN = "10.32.0.3";

static struct sockaddr_in addr_of(const char *ip, int port)
{
    struct sockaddr_in a;
    memset(&a, 0, sizeof(a));
    a.sin_family = AF_INET;
    a.sin_port = htons(port);
    inet_pton(AF_INET, ip, &a.sin_addr);
    return a;
}

/* The next event, waiting (bounded) with poll(2) on the non-blocking channel fd. */
static struct rdma_cm_event *next_event(struct rdma_event_channel *ch)
{
    struct pollfd p = {.fd = ch->fd, .events = POLLIN};
    CHECK(poll(&p, 1, 10000) == 1 && (p.revents & POLLIN), "channel fd never readable");
    struct rdma_cm_event *ev = NULL;
    CHECK(rdma_get_cm_event(ch, &ev) == 0, "rdma_get_cm_event: %s", strerror(errno));
    if (!ev) {
        printf("no event: giving up\n");
        exit(1);
    }
    return ev;
}

/* Expects event `kind` on `id` (any id if NULL) and acks it; returns its status. */
static int expect(struct rdma_event_channel *ch, struct rdma_cm_id *id, enum rdma_cm_event_type kind,
                  const char *what)
{
    struct rdma_cm_event *ev = next_event(ch);
    CHECK(ev->event == kind, "%s: got %s (status %d), wanted %s", what, rdma_event_str(ev->event),
          ev->status, rdma_event_str(kind));
    CHECK(id == NULL || ev->id == id, "%s: event for another id", what);
    int status = ev->status;
    rdma_ack_cm_event(ev);
    return status;
}

static struct rdma_cm_id *resolved(struct rdma_event_channel *ch, const char *ip, int port)
{
    struct rdma_cm_id *id = NULL;
    CHECK(rdma_create_id(ch, &id, NULL, RDMA_PS_TCP) == 0, "create_id");
    struct sockaddr_in dst = addr_of(ip, port);
    CHECK(rdma_resolve_addr(id, NULL, (struct sockaddr *)&dst, 2000) == 0, "resolve_addr");
    expect(ch, id, RDMA_CM_EVENT_ADDR_RESOLVED, "resolve");
    CHECK(id->verbs != NULL && id->pd != NULL && id->port_num == 1, "no device after resolve");
    CHECK(rdma_resolve_route(id, 2000) == 0, "resolve_route");
    expect(ch, id, RDMA_CM_EVENT_ROUTE_RESOLVED, "route");
    return id;
}

static struct ibv_qp_init_attr qp_attr(void)
{
    struct ibv_qp_init_attr a;
    memset(&a, 0, sizeof(a));
    a.qp_type = IBV_QPT_RC;
    a.cap.max_send_wr = a.cap.max_recv_wr = 4;
    a.cap.max_send_sge = a.cap.max_recv_sge = 1;
    return a;
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: %s PEER OTHER_TENANT\n", argv[0]);
        return 2;
    }
    const char *peer = argv[1], *stranger = argv[2];
    struct rdma_event_channel *ch = rdma_create_event_channel();
    CHECK(ch != NULL && ch->fd >= 0, "create_event_channel: %s", strerror(errno));
    if (!ch)
        return 1;

    /* The fd: non-blocking, nothing to read yet. */
    CHECK(fcntl(ch->fd, F_SETFL, fcntl(ch->fd, F_GETFL) | O_NONBLOCK) == 0, "O_NONBLOCK");
    struct rdma_cm_event *ev = NULL;
    errno = 0;
    CHECK(rdma_get_cm_event(ch, &ev) == -1 && errno == EAGAIN, "empty channel: not EAGAIN");
    struct pollfd p = {.fd = ch->fd, .events = POLLIN};
    CHECK(poll(&p, 1, 0) == 0, "empty channel readable");

    /* Resolution, watched with epoll. */
    int epfd = epoll_create1(0);
    struct epoll_event watch = {.events = EPOLLIN};
    CHECK(epoll_ctl(epfd, EPOLL_CTL_ADD, ch->fd, &watch) == 0, "epoll_ctl");
    struct rdma_cm_id *probe = NULL;
    CHECK(rdma_create_id(ch, &probe, NULL, RDMA_PS_TCP) == 0, "create_id");
    struct sockaddr_in dst = addr_of(peer, 9);
    CHECK(rdma_resolve_addr(probe, NULL, (struct sockaddr *)&dst, 2000) == 0, "resolve_addr");
    struct epoll_event got;
    CHECK(epoll_wait(epfd, &got, 1, 10000) == 1, "epoll: no event");
    expect(ch, probe, RDMA_CM_EVENT_ADDR_RESOLVED, "resolve peer");
    CHECK(rdma_get_src_port(probe) != 0, "no source port");
    CHECK(rdma_get_dst_port(probe) == htons(9), "destination port");
    CHECK(rdma_resolve_route(probe, 2000) == 0, "resolve_route");
    expect(ch, probe, RDMA_CM_EVENT_ROUTE_RESOLVED, "route");
    /* Nobody listens on port 9 of the peer: REJECTED, "invalid service ID" (8). */
    struct rdma_conn_param cp;
    memset(&cp, 0, sizeof(cp));
    cp.qp_num = 77;
    CHECK(rdma_connect(probe, &cp) == 0, "connect: %s", strerror(errno));
    int status = expect(ch, probe, RDMA_CM_EVENT_REJECTED, "connect to no listener");
    CHECK(status == 8, "reject status %d", status);
    CHECK(rdma_destroy_id(probe) == 0, "destroy");

    /* Another tenant's address does not resolve. */
    struct rdma_cm_id *far = NULL;
    CHECK(rdma_create_id(ch, &far, NULL, RDMA_PS_TCP) == 0, "create_id");
    struct sockaddr_in other = addr_of(stranger, 7000);
    CHECK(rdma_resolve_addr(far, NULL, (struct sockaddr *)&other, 2000) == 0, "resolve_addr");
    status = expect(ch, far, RDMA_CM_EVENT_ADDR_ERROR, "another tenant");
    CHECK(status == -EHOSTUNREACH, "ADDR_ERROR status %d", status);
    CHECK(rdma_resolve_route(far, 2000) == -1 && errno == EINVAL, "route without address");
    CHECK(rdma_destroy_id(far) == 0, "destroy");

    /* Binding: only our address, each port once. */
    struct rdma_cm_id *listener = NULL, *second = NULL;
    CHECK(rdma_create_id(ch, &listener, NULL, RDMA_PS_TCP) == 0, "create_id");
    CHECK(rdma_create_id(ch, &second, NULL, RDMA_PS_TCP) == 0, "create_id");
    struct sockaddr_in theirs = addr_of(peer, 7400);
    CHECK(rdma_bind_addr(listener, (struct sockaddr *)&theirs) == -1 && errno == EADDRNOTAVAIL,
          "bound to another container's address");
    struct sockaddr_in mine = addr_of(OWN, 7400);
    CHECK(rdma_bind_addr(listener, (struct sockaddr *)&mine) == 0, "bind: %s", strerror(errno));
    CHECK(rdma_bind_addr(second, (struct sockaddr *)&mine) == -1 && errno == EADDRINUSE,
          "port bound twice");
    CHECK(rdma_destroy_id(second) == 0, "destroy");
    CHECK(rdma_listen(listener, 4) == 0, "listen: %s", strerror(errno));

    /* Connect to ourselves, with private data; the listener rejects with private data. */
    struct rdma_cm_id *active = resolved(ch, OWN, 7400);
    struct ibv_qp_init_attr qa = qp_attr();
    CHECK(rdma_create_qp(active, NULL, &qa) == 0, "create_qp: %s", strerror(errno));
    CHECK(active->qp && active->send_cq && active->recv_cq && active->recv_cq_channel,
          "QP and its CQs");
    char big[57];
    memset(big, 'x', sizeof(big));
    memset(&cp, 0, sizeof(cp));
    cp.private_data = big;
    cp.private_data_len = sizeof(big);
    CHECK(rdma_connect(active, &cp) == -1 && errno == EINVAL, "57 bytes of connect data");
    cp.private_data = "hello";
    cp.private_data_len = 6;
    cp.responder_resources = cp.initiator_depth = 1;
    cp.retry_count = cp.rnr_retry_count = 7;
    CHECK(rdma_connect(active, &cp) == 0, "connect: %s", strerror(errno));
    ev = next_event(ch);
    CHECK(ev->event == RDMA_CM_EVENT_CONNECT_REQUEST && ev->listen_id == listener,
          "got %s", rdma_event_str(ev->event));
    CHECK(ev->param.conn.private_data_len >= 6 &&
          memcmp(ev->param.conn.private_data, "hello", 6) == 0, "request's private data");
    CHECK(ev->param.conn.qp_num == active->qp->qp_num, "request's QP number");
    struct rdma_cm_id *refused = ev->id;
    rdma_ack_cm_event(ev);
    CHECK(rdma_reject(refused, "no", 3) == 0, "reject: %s", strerror(errno));
    ev = next_event(ch);
    CHECK(ev->event == RDMA_CM_EVENT_REJECTED && ev->id == active && ev->status == 28,
          "got %s status %d", rdma_event_str(ev->event), ev->status);
    CHECK(ev->param.conn.private_data_len >= 3 &&
          memcmp(ev->param.conn.private_data, "no", 3) == 0, "reject's private data");
    rdma_ack_cm_event(ev);
    CHECK(rdma_destroy_id(refused) == 0, "destroy refused");
    rdma_destroy_qp(active);
    CHECK(rdma_destroy_id(active) == 0, "destroy active");

    /* Again, accepted this time: a SEND goes from the active QP to the passive one. */
    active = resolved(ch, OWN, 7400);
    qa = qp_attr();
    CHECK(rdma_create_qp(active, NULL, &qa) == 0, "create_qp: %s", strerror(errno));
    memset(&cp, 0, sizeof(cp));
    cp.responder_resources = cp.initiator_depth = 1;
    cp.retry_count = cp.rnr_retry_count = 7;
    CHECK(rdma_connect(active, &cp) == 0, "connect: %s", strerror(errno));
    ev = next_event(ch);
    CHECK(ev->event == RDMA_CM_EVENT_CONNECT_REQUEST, "got %s", rdma_event_str(ev->event));
    struct rdma_cm_id *passive = ev->id;
    rdma_ack_cm_event(ev);
    CHECK(passive->verbs != NULL && passive->pd != NULL, "passive id has no device");
    qa = qp_attr();
    CHECK(rdma_create_qp(passive, NULL, &qa) == 0, "create_qp: %s", strerror(errno));
    char inbox[16] = {0}, outbox[16] = "over rdma_cm";
    struct ibv_mr *in_mr = ibv_reg_mr(passive->pd, inbox, sizeof(inbox), IBV_ACCESS_LOCAL_WRITE);
    struct ibv_mr *out_mr = ibv_reg_mr(active->pd, outbox, sizeof(outbox), 0);
    CHECK(in_mr && out_mr, "reg_mr");
    struct ibv_sge rsge = {.addr = (uintptr_t)inbox, .length = sizeof(inbox), .lkey = in_mr->lkey};
    struct ibv_recv_wr rwr = {.wr_id = 1, .sg_list = &rsge, .num_sge = 1}, *bad_r;
    CHECK(ibv_post_recv(passive->qp, &rwr, &bad_r) == 0, "post_recv");
    memset(&cp, 0, sizeof(cp));
    cp.private_data = "yes";
    cp.private_data_len = 4;
    cp.responder_resources = cp.initiator_depth = 1;
    CHECK(rdma_accept(passive, &cp) == 0, "accept: %s", strerror(errno));
    struct ibv_qp_attr qattr;
    struct ibv_qp_init_attr qinit;
    CHECK(ibv_query_qp(passive->qp, &qattr, IBV_QP_STATE, &qinit) == 0 &&
          qattr.qp_state == IBV_QPS_RTS, "passive QP not in RTS");
    int established = 0;
    for (int i = 0; i < 2; i++) {
        ev = next_event(ch);
        CHECK(ev->event == RDMA_CM_EVENT_ESTABLISHED, "got %s", rdma_event_str(ev->event));
        if (ev->id == active) {
            CHECK(ev->param.conn.private_data_len >= 4 &&
                  memcmp(ev->param.conn.private_data, "yes", 4) == 0, "accept's private data");
            CHECK(ev->param.conn.qp_num == passive->qp->qp_num, "accept's QP number");
        }
        established += ev->id == active || ev->id == passive;
        rdma_ack_cm_event(ev);
    }
    CHECK(established == 2, "both sides established");
    CHECK(ibv_query_qp(active->qp, &qattr, IBV_QP_STATE, &qinit) == 0 &&
          qattr.qp_state == IBV_QPS_RTS, "active QP not in RTS");
    int mask = 0;
    qattr.qp_state = IBV_QPS_RTR;
    CHECK(rdma_init_qp_attr(active, &qattr, &mask) == 0, "init_qp_attr");
    CHECK(qattr.dest_qp_num == passive->qp->qp_num && qattr.ah_attr.is_global == 1 &&
          (mask & IBV_QP_AV) && (mask & IBV_QP_DEST_QPN), "RTR attributes");
    struct ibv_sge ssge = {.addr = (uintptr_t)outbox, .length = sizeof(outbox), .lkey = out_mr->lkey};
    struct ibv_send_wr swr = {.wr_id = 2, .sg_list = &ssge, .num_sge = 1, .opcode = IBV_WR_SEND,
                              .send_flags = IBV_SEND_SIGNALED}, *bad_s;
    CHECK(ibv_post_send(active->qp, &swr, &bad_s) == 0, "post_send");
    struct ibv_wc wc;
    int polled = 0;
    for (double end = now_ms() + 10000; !polled && now_ms() < end;)
        polled = ibv_poll_cq(passive->recv_cq, 1, &wc);
    CHECK(polled == 1 && wc.status == IBV_WC_SUCCESS && wc.byte_len == sizeof(outbox),
          "receive completion");
    CHECK(strcmp(inbox, "over rdma_cm") == 0, "received %s", inbox);

    /* Disconnect: both sides hear it. */
    CHECK(rdma_disconnect(active) == 0, "disconnect: %s", strerror(errno));
    for (int i = 0; i < 2; i++)
        expect(ch, NULL, RDMA_CM_EVENT_DISCONNECTED, "disconnect");
    CHECK(rdma_disconnect(passive) == 0, "second disconnect");
    ibv_dereg_mr(in_mr);
    ibv_dereg_mr(out_mr);
    rdma_destroy_qp(passive);
    rdma_destroy_qp(active);
    CHECK(rdma_destroy_id(passive) == 0 && rdma_destroy_id(active) == 0, "destroy");
    CHECK(rdma_destroy_id(listener) == 0, "destroy listener");

    /* What Freeflow does not offer fails with an errno. */
    CHECK(riomap(0, NULL, 0, 0, 0, -1) == -1 && errno == EBADF, "riomap on what is no rsocket");
    CHECK(rsocket(AF_INET, SOCK_DGRAM, 0) == -1 && errno == EOPNOTSUPP, "rsocket SOCK_DGRAM");
    CHECK(rdma_join_multicast(listener, (struct sockaddr *)&mine, NULL) == -1 &&
          errno == EOPNOTSUPP, "multicast");
    CHECK(rdma_destroy_id(listener) == -1 && errno == EINVAL, "destroyed id accepted");

    /* Synchronous endpoints: a refused connect returns its error. */
    struct rdma_addrinfo hints, *res = NULL;
    memset(&hints, 0, sizeof(hints));
    hints.ai_port_space = RDMA_PS_TCP;
    CHECK(rdma_getaddrinfo(peer, "7999", &hints, &res) == 0 && res && res->ai_dst_addr,
          "getaddrinfo");
    struct rdma_cm_id *ep = NULL;
    qa = qp_attr();
    CHECK(rdma_create_ep(&ep, res, NULL, &qa) == 0, "create_ep: %s", strerror(errno));
    CHECK(rdma_connect(ep, NULL) == -1 && errno == ECONNREFUSED, "sync connect to no listener");
    rdma_destroy_ep(ep);
    rdma_freeaddrinfo(res);

    rdma_destroy_event_channel(ch);
    close(epfd);
    return verdict("checks passed");
}
