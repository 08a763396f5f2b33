/* rdmacm_peer_loss SERVER_IP PORT: connects to SERVER_IP:PORT with rdma_cm (an RC QP, no
 * traffic), prints "established", then waits (at most 60 s) for the next event on the channel
 * and prints its name: with the server's host's router gone, a real CM's DISCONNECTED is
 * expected. Exits 0 when that event is DISCONNECTED, 1 otherwise. */
#include <arpa/inet.h>
#include <poll.h>
#include <rdma/rdma_cma.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int fail(const char *what)
{
    perror(what);
    return 1;
}

/* The next event, waiting at most `ms`; NULL when none came. */
static struct rdma_cm_event *next_event(struct rdma_event_channel *ch, int ms)
{
    struct pollfd p = { .fd = ch->fd, .events = POLLIN };
    if (poll(&p, 1, ms) != 1)
        return NULL;
    struct rdma_cm_event *ev;
    return rdma_get_cm_event(ch, &ev) ? NULL : ev;
}

static int expect(struct rdma_event_channel *ch, enum rdma_cm_event_type type)
{
    struct rdma_cm_event *ev = next_event(ch, 20000);
    if (!ev) {
        fprintf(stderr, "no %s within 20 s\n", rdma_event_str(type));
        return 1;
    }
    int ok = ev->event == type;
    if (!ok)
        fprintf(stderr, "expected %s, got %s (status %d)\n", rdma_event_str(type),
                rdma_event_str(ev->event), ev->status);
    rdma_ack_cm_event(ev);
    return !ok;
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: rdmacm_peer_loss SERVER_IP PORT\n");
        return 2;
    }
    struct rdma_event_channel *ch = rdma_create_event_channel();
    struct rdma_cm_id *id;
    if (!ch || rdma_create_id(ch, &id, NULL, RDMA_PS_TCP))
        return fail("rdma_create_id");
    struct sockaddr_in dst = { .sin_family = AF_INET, .sin_port = htons(atoi(argv[2])) };
    if (inet_pton(AF_INET, argv[1], &dst.sin_addr) != 1)
        return fail("address");
    if (rdma_resolve_addr(id, NULL, (struct sockaddr *)&dst, 2000) ||
        expect(ch, RDMA_CM_EVENT_ADDR_RESOLVED))
        return fail("resolve addr");
    if (rdma_resolve_route(id, 2000) || expect(ch, RDMA_CM_EVENT_ROUTE_RESOLVED))
        return fail("resolve route");
    struct ibv_qp_init_attr attr = { .qp_type = IBV_QPT_RC,
                                     .cap = { .max_send_wr = 2, .max_recv_wr = 2,
                                              .max_send_sge = 1, .max_recv_sge = 1 } };
    if (rdma_create_qp(id, NULL, &attr))
        return fail("rdma_create_qp");
    struct rdma_conn_param param = { .responder_resources = 1, .initiator_depth = 1,
                                     .retry_count = 7, .rnr_retry_count = 7 };
    if (rdma_connect(id, &param) || expect(ch, RDMA_CM_EVENT_ESTABLISHED))
        return fail("connect");
    printf("established\n");
    fflush(stdout);
    struct rdma_cm_event *ev = next_event(ch, 60000);
    if (!ev) {
        printf("no event within 60 s\n");
        return 1;
    }
    printf("event %s status %d\n", rdma_event_str(ev->event), ev->status);
    int ok = ev->event == RDMA_CM_EVENT_DISCONNECTED;
    rdma_ack_cm_event(ev);
    return !ok;
}
