/* The device, its port, GIDs and P_Keys through Freeflow's libibverbs.so.1, built against the
 * installed headers (e2e/tests/verbs.rs runs it in registered containers). */
#include "verbs_probe.h"
#include <arpa/inet.h>

int main(void)
{
    int n = -1;
    struct ibv_device **list = ibv_get_device_list(&n);
    CHECK(list != NULL && n == 1, "device list %p, %d devices", (void *)list, n);
    if (list == NULL || n != 1)
        return 1;
    CHECK(list[1] == NULL, "list not NULL-terminated");
    CHECK(strcmp(ibv_get_device_name(list[0]), "ffv0") == 0, "name %s",
          ibv_get_device_name(list[0]));
    CHECK(ibv_get_device_index(list[0]) == -1, "virtual device has a kernel index");
    struct ibv_context *ctx = ibv_open_device(list[0]);
    /* A context outlives the list it came from. */
    ibv_free_device_list(list);
    CHECK(ctx != NULL, "open: %s", strerror(errno));
    if (ctx == NULL)
        return 1;

    struct ibv_port_attr port;
    CHECK(ibv_query_port(ctx, 1, &port) == 0, "query_port");
    CHECK(port.state == IBV_PORT_ACTIVE && port.link_layer == IBV_LINK_LAYER_ETHERNET &&
          port.lid == 0 && port.gid_tbl_len == 1 && port.pkey_tbl_len == 1 &&
          port.active_mtu == IBV_MTU_1024, "port attributes");
    CHECK(ibv_query_port(ctx, 2, &port) == EINVAL, "port 2 exists");

    struct ibv_device_attr dev;
    CHECK(ibv_query_device(ctx, &dev) == 0 && dev.phys_port_cnt == 1 && dev.max_qp > 0 &&
          dev.max_cqe > 0 && dev.max_sge > 0, "query_device");
    struct ibv_device_attr_ex dev_ex;
    memset(&dev_ex, 0xab, sizeof(dev_ex));
    CHECK(ibv_query_device_ex(ctx, NULL, &dev_ex) == 0, "query_device_ex");
    CHECK(dev_ex.orig_attr.node_guid == dev.node_guid && dev_ex.phys_port_cnt_ex == 1 &&
          dev_ex.comp_mask == 0 && dev_ex.odp_caps.general_caps == 0, "device_attr_ex");
    CHECK(ibv_get_device_guid(ctx->device) == dev.node_guid, "guid");

    union ibv_gid gid;
    char text[INET6_ADDRSTRLEN] = "";
    CHECK(ibv_query_gid(ctx, 1, 0, &gid) == 0, "query_gid");
    inet_ntop(AF_INET6, gid.raw, text, sizeof(text));
    printf("gid %s\n", text);
    errno = 0;
    CHECK(ibv_query_gid(ctx, 1, 1, &gid) == -1 && errno == EINVAL, "GID index 1 exists");
    struct ibv_gid_entry entry, table[4];
    CHECK(ibv_query_gid_ex(ctx, 1, 0, &entry, 0) == 0, "query_gid_ex");
    CHECK(entry.gid_type == IBV_GID_TYPE_ROCE_V2 && entry.port_num == 1 &&
          memcmp(entry.gid.raw, gid.raw, 16) == 0, "gid entry");
    CHECK(ibv_query_gid_table(ctx, table, 4, 0) == 1, "gid table");
    CHECK(ibv_query_gid_ex(ctx, 1, 0, &entry, 1) == EINVAL, "flags accepted");

    __be16 pkey = 0;
    CHECK(ibv_query_pkey(ctx, 1, 0, &pkey) == 0 && pkey == htons(0xffff), "pkey %x", pkey);
    CHECK(ibv_get_pkey_index(ctx, 1, htons(0xffff)) == 0, "pkey index");

    /* Protection domains exist (verbs_mr.rs tests them and memory regions in depth). */
    struct ibv_pd *pd = ibv_alloc_pd(ctx);
    CHECK(pd != NULL && pd->context == ctx && pd->handle != 0, "alloc_pd: %s", strerror(errno));

    /* CQs and channels exist (verbs_rc.rs tests them in depth). */
    struct ibv_comp_channel *channel = ibv_create_comp_channel(ctx);
    CHECK(channel != NULL && channel->fd >= 0, "comp_channel: %s", strerror(errno));
    struct ibv_cq *cq = ibv_create_cq(ctx, 16, NULL, channel, 0);
    CHECK(cq != NULL && cq->cqe >= 16 && cq->channel == channel, "create_cq: %s", strerror(errno));
    CHECK(cq == NULL || ibv_destroy_cq(cq) == 0, "destroy_cq");
    CHECK(channel == NULL || ibv_destroy_comp_channel(channel) == 0, "destroy_comp_channel");

    /* Extended CQs exist (verbs_ex.rs tests them in depth). */
    struct ibv_cq_init_attr_ex cq_attr = { .cqe = 16 };
    struct ibv_cq_ex *cq_ex = ibv_create_cq_ex(ctx, &cq_attr);
    CHECK(cq_ex != NULL, "create_cq_ex: %s", strerror(errno));
    CHECK(cq_ex == NULL || ibv_destroy_cq(ibv_cq_ex_to_cq(cq_ex)) == 0, "destroy cq_ex");
    /* Not implemented: clean failures, never a crash or a fake object. */
    struct ibv_alloc_dm_attr dm_attr = { .length = 64 };
    errno = 0;
    CHECK(ibv_alloc_dm(ctx, &dm_attr) == NULL && errno == EOPNOTSUPP, "alloc_dm");
    /* SRQs exist (verbs_srq.rs tests them in depth). */
    struct ibv_srq_init_attr srq_attr = { .attr = { .max_wr = 1, .max_sge = 1 } };
    struct ibv_srq *srq = ibv_create_srq(pd, &srq_attr);
    CHECK(srq != NULL && srq_attr.attr.max_wr >= 1, "create_srq: %s", strerror(errno));
    CHECK(srq == NULL || ibv_destroy_srq(srq) == 0, "destroy_srq");
    CHECK(pd == NULL || ibv_dealloc_pd(pd) == 0, "dealloc_pd");
    CHECK(ibv_dealloc_pd(NULL) == EINVAL, "dealloc_pd(NULL)");
    CHECK(strcmp(ibv_wc_status_str(IBV_WC_SUCCESS), "success") == 0, "wc_status_str");
    CHECK(strcmp(ibv_port_state_str(IBV_PORT_ACTIVE), "active") == 0, "port_state_str");

    CHECK(ibv_close_device(ctx) == 0, "close");
    /* A second close is refused without touching the freed context. */
    errno = 0;
    CHECK(ibv_close_device(ctx) == -1 && errno == EINVAL, "double close");
    return verdict("checks passed");
}
