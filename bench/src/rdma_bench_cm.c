/* freeflow-bench rdma: the rdma_cm connection-setup rate, included by rdma_bench.c (linked with
 * librdmacm; run with Freeflow's librdmacm.so.1 from the same directory as its libibverbs.so.1).
 *
 * One connection at a time, as a program that opens a connection per request would: the active
 * side creates an id, resolves the address and the route, creates a QP, connects, and once
 * ESTABLISHED disconnects and destroys both; the passive side gets the CONNECT_REQUEST, creates a
 * QP, accepts, and sees ESTABLISHED and DISCONNECTED. Each cycle is counted from the active id's
 * creation to its destruction. Both sides wait in rdma_get_cm_event (a blocking read of the
 * event channel), never spinning, so the router has the core whenever it has work.
 *
 * Debian's cmtime is not used for this: it starts all its connections' steps at once and
 * prints a table of per-step times, not a rate, and its main thread waits in a sched_yield
 * loop, which on a core shared with the router measures the scheduler more than the CM.
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <rdma/rdma_cma.h>

#define CM_PORT 18516 /* the listener's rdma_cm port (RDMA_PS_TCP) */

/* The next event of `ch`, which must be `type`; its id (for CONNECT_REQUEST the new id). */
static struct rdma_cm_id *cm_expect(struct rdma_event_channel *ch, enum rdma_cm_event_type type)
{
    struct rdma_cm_event *ev;
    if (rdma_get_cm_event(ch, &ev))
        die("rdma_get_cm_event");
    if (ev->event != type) {
        fprintf(stderr, "rdma_bench: expected %s, got %s (status %d)\n", rdma_event_str(type),
                rdma_event_str(ev->event), ev->status);
        exit(1);
    }
    struct rdma_cm_id *id = ev->id;
    if (rdma_ack_cm_event(ev))
        die("rdma_ack_cm_event");
    return id;
}

/* A small RC QP on `id` (the library's PD and CQs of its own, as rping's are per connection). */
static void cm_qp(struct rdma_cm_id *id)
{
    struct ibv_qp_init_attr attr = { .qp_type = IBV_QPT_RC,
                                     .cap = { .max_send_wr = 4, .max_recv_wr = 4,
                                              .max_send_sge = 1, .max_recv_sge = 1 } };
    if (rdma_create_qp(id, NULL, &attr))
        die("rdma_create_qp");
}

/* A listener on ip:CM_PORT with its own event channel. */
static struct rdma_event_channel *cm_listen(const char *ip, struct rdma_cm_id **listener)
{
    struct rdma_event_channel *ch = rdma_create_event_channel();
    if (!ch)
        die("rdma_create_event_channel");
    if (rdma_create_id(ch, listener, NULL, RDMA_PS_TCP))
        die("rdma_create_id (listener)");
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(CM_PORT) };
    if (inet_pton(AF_INET, ip, &a.sin_addr) != 1)
        die("listener address");
    if (rdma_bind_addr(*listener, (struct sockaddr *)&a) || rdma_listen(*listener, 16))
        die("rdma_bind_addr / rdma_listen");
    return ch;
}

/* The passive side's part of a connection, up to ESTABLISHED; returns the new id. */
static struct rdma_cm_id *cm_accept(struct rdma_event_channel *lch)
{
    struct rdma_cm_id *id = cm_expect(lch, RDMA_CM_EVENT_CONNECT_REQUEST);
    cm_qp(id);
    struct rdma_conn_param param = { .responder_resources = 1, .initiator_depth = 1 };
    if (rdma_accept(id, &param))
        die("rdma_accept");
    return id;
}

static void cm_close(struct rdma_cm_id *id)
{
    rdma_destroy_qp(id);
    if (rdma_destroy_id(id))
        die("rdma_destroy_id");
}

/* The passive side's whole connection, for the peer on another host. */
static void cm_serve_one(struct rdma_event_channel *lch)
{
    struct rdma_cm_id *id = cm_accept(lch);
    cm_expect(lch, RDMA_CM_EVENT_ESTABLISHED);
    cm_expect(lch, RDMA_CM_EVENT_DISCONNECTED);
    cm_close(id);
}

/* One connection to ip:CM_PORT and its end. `lch`: the listener's channel when the passive
 * side is this process (one host), else NULL (the peer serves it). */
static void cm_cycle(struct rdma_event_channel *ch, struct rdma_event_channel *lch,
                     struct sockaddr_in *dst)
{
    struct rdma_cm_id *id, *passive = NULL;
    if (rdma_create_id(ch, &id, NULL, RDMA_PS_TCP))
        die("rdma_create_id");
    if (rdma_resolve_addr(id, NULL, (struct sockaddr *)dst, 2000))
        die("rdma_resolve_addr");
    cm_expect(ch, RDMA_CM_EVENT_ADDR_RESOLVED);
    if (rdma_resolve_route(id, 2000))
        die("rdma_resolve_route");
    cm_expect(ch, RDMA_CM_EVENT_ROUTE_RESOLVED);
    cm_qp(id);
    struct rdma_conn_param param = { .responder_resources = 1, .initiator_depth = 1,
                                     .retry_count = 7, .rnr_retry_count = 7 };
    if (rdma_connect(id, &param))
        die("rdma_connect");
    if (lch)
        passive = cm_accept(lch);
    cm_expect(ch, RDMA_CM_EVENT_ESTABLISHED);
    if (lch)
        cm_expect(lch, RDMA_CM_EVENT_ESTABLISHED);
    if (rdma_disconnect(id))
        die("rdma_disconnect");
    cm_expect(ch, RDMA_CM_EVENT_DISCONNECTED);
    if (lch) {
        cm_expect(lch, RDMA_CM_EVENT_DISCONNECTED);
        cm_close(passive);
    }
    cm_close(id);
}

/* `count` connections to ip:CM_PORT, one after another; prints the phase "cm_setup". With
 * `local`, this process listens on ip and accepts them too. `cpu` reads the routers' CPU time
 * (one or two routers, in seconds). */
static void cm_rate(const char *ip, long count, int local, void (*cpu)(double[2]))
{
    struct rdma_cm_id *listener = NULL;
    struct rdma_event_channel *lch = local ? cm_listen(ip, &listener) : NULL;
    struct rdma_event_channel *ch = rdma_create_event_channel();
    if (!ch)
        die("rdma_create_event_channel");
    struct sockaddr_in dst = { .sin_family = AF_INET, .sin_port = htons(CM_PORT) };
    if (inet_pton(AF_INET, ip, &dst.sin_addr) != 1)
        die("server address");
    /* One connection first, so that the one-time costs (the library's attach to the router,
     * the device context, the PD) are not counted. */
    cm_cycle(ch, lch, &dst);
    double cpu0[2], cpu1[2];
    cpu(cpu0);
    double t0 = now_s();
    for (long i = 0; i < count; i++)
        cm_cycle(ch, lch, &dst);
    double t1 = now_s();
    cpu(cpu1);
    printf("{\"phase\":\"cm_setup\",\"ops\":%ld,\"seconds\":%.9f,\"router_cpu_s\":%.9f,"
           "\"router1_cpu_s\":%.9f}\n",
           count, t1 - t0, cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]);
    fflush(stdout);
    rdma_destroy_event_channel(ch);
    if (local) {
        rdma_destroy_id(listener);
        rdma_destroy_event_channel(lch);
    }
}
