/* Protection domains and memory regions through Freeflow's libibverbs.so.1, built against the
 * installed headers (e2e/tests/verbs_mr.rs runs it in registered containers). */
#include "verbs_probe.h"
#include <dlfcn.h>
#include <sys/mman.h>
#include <sys/wait.h>

/* Freeflow's test hooks (not rdma-core API): the router reads (a digest) or writes a region
 * through its own mapping. */
typedef int (*read_hook)(struct ibv_pd *, uint32_t, uint64_t, uint64_t, uint64_t *);
typedef int (*write_hook)(struct ibv_pd *, uint32_t, uint64_t, const void *, size_t);
static read_hook mr_read;
static write_hook mr_write;

static uint64_t fnv(const void *p, size_t n)
{
    const unsigned char *b = p;
    uint64_t h = 0xcbf29ce484222325ULL;
    for (size_t i = 0; i < n; i++) {
        h ^= b[i];
        h *= 0x100000001b3ULL;
    }
    return h;
}

/* The router's digest of len bytes at addr through lkey equals the program's own. */
static int router_sees(struct ibv_pd *pd, uint32_t lkey, const void *addr, size_t len)
{
    uint64_t d = 0;
    int r = mr_read(pd, lkey, (uint64_t)(uintptr_t)addr, len, &d);
    if (r != 0)
        printf("  router read failed: %s\n", strerror(r));
    return r == 0 && d == fnv(addr, len);
}

/* The line of /proc/self/maps that maps addr ("" if none). */
static void maps_line(const void *addr, char *out, size_t size)
{
    FILE *f = fopen("/proc/self/maps", "r");
    char line[512];
    out[0] = 0;
    while (f && fgets(line, sizeof(line), f)) {
        unsigned long lo, hi;
        if (sscanf(line, "%lx-%lx", &lo, &hi) == 2 && lo <= (uintptr_t)addr &&
            (uintptr_t)addr < hi) {
            snprintf(out, size, "%s", line);
            break;
        }
    }
    if (f)
        fclose(f);
}

/* 1 if addr is on Freeflow's memory file. */
static int on_memory_file(const void *addr)
{
    char line[512];
    maps_line(addr, line, sizeof(line));
    return strstr(line, "freeflow-mr") != NULL;
}

#define PAGE 4096UL
#define PAGE_OF(p) ((uintptr_t)(p) & ~(PAGE - 1))

static int checks(void)
{
    struct ibv_context *ctx = open_device();
    struct ibv_pd *pd = ibv_alloc_pd(ctx);
    CHECK(pd != NULL && pd->context == ctx, "alloc_pd: %s", strerror(errno));
    if (!pd)
        return 1;
    struct ibv_pd *pd2 = ibv_alloc_pd(ctx);
    CHECK(pd2 != NULL && pd2->handle != pd->handle, "second PD");

    /* A malloc'ed block (from the heap: below the mmap threshold) with the buffer inside it at
     * an odd address, so the buffer's first and last pages also hold its neighbours; all of
     * those pages lie inside the block, so every byte on them is ours to check. */
    size_t block_len = 6 * PAGE;
    unsigned char *block = malloc(block_len);
    unsigned char *expected = malloc(block_len);
    for (size_t i = 0; i < block_len; i++)
        block[i] = (unsigned char)(i * 7 + 3);
    unsigned char *buf = (unsigned char *)PAGE_OF(block + PAGE) + PAGE + 1001;
    size_t len = 6000;
    CHECK(PAGE_OF(buf) >= (uintptr_t)block &&
          PAGE_OF(buf + len - 1) + PAGE <= (uintptr_t)block + block_len, "layout");
    memcpy(expected, block, block_len);
    CHECK(!on_memory_file(buf), "on the memory file before registration");

    struct ibv_mr *mr = ibv_reg_mr(pd, buf, len,
                                   IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_READ |
                                   IBV_ACCESS_REMOTE_WRITE);
    CHECK(mr != NULL, "reg_mr: %s", strerror(errno));
    if (!mr)
        return 1;
    CHECK(mr->addr == buf && mr->length == len && mr->pd == pd && mr->context == ctx &&
          mr->lkey != 0 && mr->rkey != 0 && mr->handle != 0, "mr fields");
    /* Every byte of every page: buffer and neighbours. */
    CHECK(memcmp(block, expected, block_len) == 0, "bytes changed by registration");
    CHECK(on_memory_file(buf) && on_memory_file(buf + len - 1), "buffer not on the memory file");
    CHECK(!on_memory_file((void *)(PAGE_OF(buf) - 1)) &&
          !on_memory_file((void *)(PAGE_OF(buf + len - 1) + PAGE)), "more than its pages moved");

    /* The router reads the program's bytes, and what the program writes afterwards. */
    CHECK(router_sees(pd, mr->lkey, buf, len), "router digest after registration");
    buf[0] = 0xa5;
    buf[len - 1] = 0x5a;
    memset(buf + 2000, 0x11, 100);
    buf[-1] = 0x77; /* a neighbour on the first page */
    CHECK(router_sees(pd, mr->lkey, buf, len), "router digest after the program's writes");
    CHECK(router_sees(pd, mr->lkey, buf + 1999, 3), "router digest of a part");
    /* The program reads what the router writes. */
    CHECK(mr_write(pd, mr->lkey, (uintptr_t)buf + 10, "router-was-here", 15) == 0, "router write");
    CHECK(memcmp(buf + 10, "router-was-here", 15) == 0, "program does not see the router's write");
    CHECK(router_sees(pd, mr->lkey, buf, len), "digest after the router's write");

    /* The router's checks: nothing outside the region, no wrap-around, the right key and PD. */
    uint64_t d;
    CHECK(mr_read(pd, mr->lkey, (uintptr_t)buf - 1, 1, &d) == EACCES, "byte before the region");
    CHECK(mr_read(pd, mr->lkey, (uintptr_t)buf + len, 1, &d) == EACCES, "byte after the region");
    CHECK(mr_read(pd, mr->lkey, (uintptr_t)buf, len + 1, &d) == EACCES, "one byte too many");
    CHECK(mr_read(pd, mr->lkey, UINT64_MAX - 4, 10, &d) == EACCES, "wrap-around");
    CHECK(mr_read(pd, mr->lkey, (uintptr_t)buf + 1, UINT64_MAX, &d) == EACCES, "huge length");
    CHECK(mr_read(pd, mr->lkey ^ 1, (uintptr_t)buf, 8, &d) == EACCES, "guessed lkey");
    CHECK(mr_read(pd, mr->rkey, (uintptr_t)buf, 8, &d) == EACCES || mr->rkey == mr->lkey,
          "rkey used as lkey");
    CHECK(mr_read(pd2, mr->lkey, (uintptr_t)buf, 8, &d) == EACCES, "region of another PD");
    CHECK(mr_read(pd, mr->lkey, 0, 0, &d) == 0 && d == fnv("", 0), "zero length");

    /* Two regions on one page: the second shares the last page of the first. */
    unsigned char *buf2 = buf + len + 7;
    CHECK(PAGE_OF(buf2) == PAGE_OF(buf + len - 1), "layout of the second region");
    struct ibv_mr *mr2 = ibv_reg_mr(pd, buf2, 64, IBV_ACCESS_LOCAL_WRITE);
    CHECK(mr2 != NULL && mr2->lkey != mr->lkey && mr2->handle != mr->handle, "reg_mr 2: %s",
          strerror(errno));
    memcpy(expected, block, block_len);
    CHECK(mr2 && memcmp(block, expected, block_len) == 0, "second registration changed bytes");
    CHECK(mr2 && mr_write(pd, mr2->lkey, (uintptr_t)buf2, "second", 6) == 0, "write via mr2");
    CHECK(memcmp(buf2, "second", 6) == 0, "program does not see the write via mr2");
    buf[len - 2] = 0x42; /* the shared page, through the first region */
    CHECK(router_sees(pd, mr->lkey, buf, len), "first region after writes on the shared page");

    /* dealloc_pd while regions use the PD: EBUSY, as rdma-core reports it. */
    CHECK(ibv_dealloc_pd(pd) == EBUSY, "dealloc_pd with regions");

    /* The first region goes; the shared page stays on the file for the second. */
    memcpy(expected, block, block_len);
    CHECK(ibv_dereg_mr(mr) == 0, "dereg_mr");
    CHECK(memcmp(block, expected, block_len) == 0, "deregistration changed bytes");
    CHECK(!on_memory_file(buf), "first page still on the memory file");
    CHECK(on_memory_file(buf2), "shared page left the memory file while mr2 uses it");
    buf2[63] = 0x99;
    expected[buf2 + 63 - block] = 0x99;
    CHECK(mr2 && router_sees(pd, mr2->lkey, buf2, 64), "mr2 after mr dereg");
    CHECK(mr2 && ibv_dereg_mr(mr2) == 0, "dereg_mr 2");
    CHECK(!on_memory_file(buf2), "shared page still on the memory file");
    CHECK(memcmp(block, expected, block_len) == 0, "bytes after both deregistrations");
    buf[5] = 0x12; /* plain private memory again */
    CHECK(ibv_dereg_mr(mr2) == EINVAL, "dereg twice");

    /* iova: work requests address the region from 0x10000000 (same offset in the page). */
    uint64_t iova = 0x10000000 + ((uintptr_t)buf & (PAGE - 1));
    struct ibv_mr *mr3 = ibv_reg_mr_iova(pd, buf, len, iova, IBV_ACCESS_LOCAL_WRITE);
    CHECK(mr3 != NULL, "reg_mr_iova: %s", strerror(errno));
    if (mr3) {
        uint64_t d3 = 0;
        CHECK(mr_read(pd, mr3->lkey, iova, len, &d3) == 0 && d3 == fnv(buf, len), "iova read");
        CHECK(mr_read(pd, mr3->lkey, (uintptr_t)buf, 1, &d3) == EACCES, "address outside iova");
        CHECK(ibv_dereg_mr(mr3) == 0, "dereg iova");
    }
    errno = 0;
    CHECK(ibv_reg_mr_iova(pd, buf, len, iova + 1, IBV_ACCESS_LOCAL_WRITE) == NULL &&
          errno == EINVAL, "iova in another page offset");
    /* Optional flags are dropped, as by rdma-core (this goes through ibv_reg_mr_iova2). */
    struct ibv_mr *mr4 = ibv_reg_mr(pd, buf, len, IBV_ACCESS_LOCAL_WRITE |
                                    IBV_ACCESS_RELAXED_ORDERING);
    CHECK(mr4 != NULL, "relaxed ordering: %s", strerror(errno));
    CHECK(mr4 && ibv_dereg_mr(mr4) == 0, "dereg 4");

    /* Access flags as rdma-core checks them, through ibv_reg_mr (constant flags) and
     * ibv_reg_mr_iova2 (flags known at run time). Nothing moves for a refused registration. */
    memcpy(expected, block, block_len);
    errno = 0;
    CHECK(ibv_reg_mr(pd, buf, len, IBV_ACCESS_REMOTE_WRITE) == NULL && errno == EINVAL,
          "remote write without local write");
    errno = 0;
    CHECK(ibv_reg_mr(pd, buf, len, IBV_ACCESS_REMOTE_ATOMIC) == NULL && errno == EINVAL,
          "remote atomic without local write");
    volatile int flags = IBV_ACCESS_REMOTE_WRITE | IBV_ACCESS_REMOTE_READ;
    errno = 0;
    CHECK(ibv_reg_mr(pd, buf, len, flags) == NULL && errno == EINVAL, "iova2: remote write");
    errno = 0;
    CHECK(ibv_reg_mr_iova2(pd, buf, len, (uintptr_t)buf, 1u << 12) == NULL && errno == EINVAL,
          "unknown flag");
    errno = 0;
    CHECK(ibv_reg_mr(pd, buf, len, IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_ON_DEMAND) == NULL &&
          errno == EOPNOTSUPP, "on-demand paging");
    errno = 0;
    CHECK(ibv_reg_mr(pd, buf, 0, IBV_ACCESS_LOCAL_WRITE) == NULL && errno == EINVAL,
          "zero length");
    errno = 0;
    CHECK(ibv_reg_mr(NULL, buf, len, 0) == NULL && errno == EINVAL, "NULL pd");
    errno = 0;
    CHECK(ibv_reg_mr(pd, (void *)PAGE, 100, 0) == NULL && errno == EFAULT, "unmapped memory");
    CHECK(memcmp(block, expected, block_len) == 0 && !on_memory_file(buf),
          "refused registrations moved memory");

    /* Memory the kernel would not pin: a PROT_NONE page; a range running off a mapping. */
    unsigned char *none = mmap(NULL, 2 * PAGE, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    errno = 0;
    CHECK(ibv_reg_mr(pd, none, 10, 0) == NULL && errno == EFAULT, "PROT_NONE memory");
    munmap(none + PAGE, PAGE);
    mprotect(none, PAGE, PROT_READ | PROT_WRITE);
    errno = 0;
    CHECK(ibv_reg_mr(pd, none + 100, PAGE, 0) == NULL && errno == EFAULT, "range off a mapping");
    munmap(none, PAGE);

    /* Read-only memory registers for reading, and stays read-only. */
    unsigned char *ro = mmap(NULL, PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                             -1, 0);
    memset(ro, 0x3c, PAGE);
    mprotect(ro, PAGE, PROT_READ);
    struct ibv_mr *mro = ibv_reg_mr(pd, ro + 8, 100, IBV_ACCESS_REMOTE_READ);
    CHECK(mro != NULL, "read-only memory: %s", strerror(errno));
    if (mro) {
        char line[512];
        maps_line(ro, line, sizeof(line));
        CHECK(strstr(line, " r--s ") != NULL, "protection not kept: %s", line);
        CHECK(router_sees(pd, mro->lkey, ro + 8, 100), "read-only region");
        CHECK(mr_write(pd, mro->lkey, (uintptr_t)ro + 8, "x", 1) == EACCES,
              "router wrote a region without local write access");
        CHECK(ibv_dereg_mr(mro) == 0, "dereg read-only");
        maps_line(ro, line, sizeof(line));
        CHECK(strstr(line, " r--p ") != NULL, "protection not restored: %s", line);
        CHECK(ro[8] == 0x3c && ro[PAGE - 1] == 0x3c, "read-only bytes");
    }
    munmap(ro, PAGE);

    /* A buffer on this function's own stack (the library's frames share its pages). */
    unsigned char stackbuf[3000];
    for (size_t i = 0; i < sizeof(stackbuf); i++)
        stackbuf[i] = (unsigned char)(i * 13);
    struct ibv_mr *ms = ibv_reg_mr(pd, stackbuf, sizeof(stackbuf), IBV_ACCESS_LOCAL_WRITE);
    CHECK(ms != NULL, "stack buffer: %s", strerror(errno));
    if (ms) {
        CHECK(router_sees(pd, ms->lkey, stackbuf, sizeof(stackbuf)), "stack region");
        CHECK(mr_write(pd, ms->lkey, (uintptr_t)stackbuf + 1, "stack", 5) == 0 &&
              memcmp(stackbuf + 1, "stack", 5) == 0, "router write to the stack");
        CHECK(ibv_dereg_mr(ms) == 0, "dereg stack");
    }
    CHECK(stackbuf[0] == 0 && stackbuf[2999] == (unsigned char)(2999 * 13), "stack bytes");

    /* fork: registered pages stay out of the child (MADV_DONTFORK); the child cannot use the
     * parent's context, and trying does not disturb it. */
    struct ibv_mr *mf = ibv_reg_mr(pd, buf, len, IBV_ACCESS_LOCAL_WRITE);
    CHECK(mf != NULL, "reg for fork");
    fflush(stdout);
    pid_t child = fork();
    if (child == 0) {
        char line[512];
        maps_line(buf, line, sizeof(line));
        int ok = line[0] == 0; /* no mapping at all at the registered buffer */
        errno = 0;
        ok = ok && ibv_alloc_pd(ctx) == NULL && errno == EINVAL;
        ok = ok && block[0] == expected[0]; /* unregistered memory is there */
        _exit(ok ? 0 : 3);
    }
    int status = -1;
    waitpid(child, &status, 0);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0, "child after fork: status %d", status);
    CHECK(mf && router_sees(pd, mf->lkey, buf, len), "region after the child");
    CHECK(mf && ibv_dereg_mr(mf) == 0, "dereg after fork");

    /* Two contexts register the same page; closing one keeps the other's region. */
    struct ibv_context *ctx2 = open_device();
    struct ibv_pd *pdb = ibv_alloc_pd(ctx2);
    struct ibv_mr *ma = ibv_reg_mr(pd, buf, 100, IBV_ACCESS_LOCAL_WRITE);
    struct ibv_mr *mb = ibv_reg_mr(pdb, buf + 50, 100, IBV_ACCESS_LOCAL_WRITE);
    CHECK(pdb && ma && mb, "two contexts: %s", strerror(errno));
    buf[60] = 0x60;
    CHECK(ma && mb && router_sees(pd, ma->lkey, buf, 100) && router_sees(pdb, mb->lkey, buf + 50, 100),
          "both contexts see the page");
    memcpy(expected, block, block_len);
    CHECK(ibv_close_device(ctx2) == 0, "close with a PD and an MR");
    CHECK(on_memory_file(buf) && ma && router_sees(pd, ma->lkey, buf, 100),
          "the other context's region after close");
    CHECK(ma && ibv_dereg_mr(ma) == 0 && !on_memory_file(buf), "last region of the page");
    CHECK(memcmp(block, expected, block_len) == 0, "bytes after close and dereg");

    CHECK(ibv_dealloc_pd(pd) == 0, "dealloc_pd");
    CHECK(ibv_dealloc_pd(pd) == EINVAL, "dealloc twice");
    CHECK(ibv_dealloc_pd(pd2) == 0, "dealloc pd2");
    CHECK(ibv_close_device(ctx) == 0, "close");
    return verdict("checks passed");
}

/* Registers a region, prints its keys, keeps it until stdin closes, then checks it. */
static int hold(void)
{
    struct ibv_context *ctx = open_device();
    struct ibv_pd *pd = ibv_alloc_pd(ctx);
    static unsigned char secret[4096];
    memset(secret, 0x5e, sizeof(secret));
    struct ibv_mr *mr = pd ? ibv_reg_mr(pd, secret, sizeof(secret),
                                        IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_READ |
                                        IBV_ACCESS_REMOTE_WRITE) : NULL;
    if (!mr) {
        printf("reg failed: %s\n", strerror(errno));
        return 1;
    }
    printf("keys %" PRIu32 " %" PRIu32 " %" PRIu64 "\n", mr->lkey, mr->rkey,
           (uint64_t)(uintptr_t)secret);
    fflush(stdout);
    char line[64];
    while (fgets(line, sizeof(line), stdin))
        ;
    CHECK(router_sees(pd, mr->lkey, secret, sizeof(secret)) && secret[0] == 0x5e, "secret");
    CHECK(ibv_dereg_mr(mr) == 0 && ibv_dealloc_pd(pd) == 0 && ibv_close_device(ctx) == 0,
          "teardown");
    return verdict("held");
}

/* Another container's keys name nothing here. */
static int guess(uint32_t lkey, uint32_t rkey, uint64_t addr)
{
    struct ibv_context *ctx = open_device();
    struct ibv_pd *pd = ibv_alloc_pd(ctx);
    static unsigned char mine[4096];
    struct ibv_mr *mr = ibv_reg_mr(pd, mine, sizeof(mine), IBV_ACCESS_LOCAL_WRITE);
    CHECK(mr != NULL, "reg: %s", strerror(errno));
    uint64_t d;
    CHECK(mr_read(pd, lkey, addr, 8, &d) == EACCES || (mr && lkey == mr->lkey),
          "their lkey resolved here");
    CHECK(mr_read(pd, rkey, addr, 8, &d) == EACCES || (mr && rkey == mr->lkey),
          "their rkey resolved here");
    CHECK(mr_write(pd, lkey, addr, "x", 1) == EACCES || (mr && lkey == mr->lkey),
          "wrote through their lkey");
    CHECK(mr && router_sees(pd, mr->lkey, mine, sizeof(mine)), "own region");
    return verdict("guesses refused");
}

int main(int argc, char **argv)
{
    mr_read = (read_hook)dlsym(RTLD_DEFAULT, "freeflow_test_mr_read");
    mr_write = (write_hook)dlsym(RTLD_DEFAULT, "freeflow_test_mr_write");
    if (!mr_read || !mr_write) {
        printf("no test hooks: not Freeflow's libibverbs\n");
        return 1;
    }
    if (argc == 2 && strcmp(argv[1], "checks") == 0)
        return checks();
    if (argc == 2 && strcmp(argv[1], "hold") == 0)
        return hold();
    if (argc == 5 && strcmp(argv[1], "guess") == 0)
        return guess(strtoul(argv[2], NULL, 10), strtoul(argv[3], NULL, 10),
                     strtoull(argv[4], NULL, 10));
    printf("usage: mr_probe checks | hold | guess LKEY RKEY ADDR\n");
    return 2;
}
