/* rsockets_iomap_probe server IP PORT | client IP PORT: the edges of riomap/riowrite between
 * two rsockets. The server leaves RDMA_IOMAPSIZE at its default (0) and maps 4096 bytes; the
 * client sets RDMA_IOMAPSIZE 1 before connecting. Checked (each failure says which and exits
 * 1; "server checks passed" / "client checks passed" otherwise):
 * - server: RDMA_IOMAPSIZE reads 0 and cannot be set once connected (EINVAL); riomap with
 *   PROT_READ is EINVAL; a first PROT_WRITE map works, a second is ENOMEM (the client takes
 *   one); riounmap of a range never mapped is EINVAL; the client's riowrite is in place when
 *   its later rsend is read (ordered with the stream); riounmap works.
 * - client: its own riomap is ENOMEM (the server takes none); riowrite where the server mapped
 *   nothing is EINVAL; one that runs past the map's end is cut there; after the server's
 *   riounmap (announced before its next rsend) a riowrite there is EINVAL.
 * Every blocking call is bounded by the socket timeouts (10 s). */
#include <arpa/inet.h>
#include <errno.h>
#include <rdma/rsocket.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/time.h>

#define MAP_LEN 4096

static int failed(const char *what)
{
    fprintf(stderr, "FAILED: %s (errno %d: %s)\n", what, errno, strerror(errno));
    return 1;
}

static void bound(int fd)
{
    struct timeval tv = { .tv_sec = 10 };
    rsetsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    rsetsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
}

static int recv_word(int fd, const char *want)
{
    char got[16] = { 0 };
    size_t n = strlen(want);
    if (rrecv(fd, got, n, MSG_WAITALL) != (ssize_t)n || memcmp(got, want, n))
        return failed(want);
    return 0;
}

static int server(struct sockaddr_in *addr)
{
    static unsigned char buf[2 * MAP_LEN] __attribute__((aligned(4096)));
    int l = rsocket(AF_INET, SOCK_STREAM, 0);
    if (l < 0 || rbind(l, (struct sockaddr *)addr, sizeof *addr) || rlisten(l, 1))
        return failed("listen");
    int fd = raccept(l, NULL, NULL);
    if (fd < 0)
        return failed("raccept");
    bound(fd);
    int size = -1;
    socklen_t len = sizeof size;
    if (rgetsockopt(fd, SOL_RDMA, RDMA_IOMAPSIZE, &size, &len) || size != 0)
        return failed("RDMA_IOMAPSIZE reads 0 by default");
    int one = 1;
    if (rsetsockopt(fd, SOL_RDMA, RDMA_IOMAPSIZE, &one, sizeof one) != -1 || errno != EINVAL)
        return failed("RDMA_IOMAPSIZE once connected is EINVAL");
    if (riomap(fd, buf, MAP_LEN, PROT_READ, 0, 0) != -1 || errno != EINVAL)
        return failed("riomap PROT_READ is EINVAL");
    if (riomap(fd, buf, MAP_LEN, PROT_WRITE, 0, 0) != 0)
        return failed("riomap at offset 0");
    if (riomap(fd, buf + MAP_LEN, MAP_LEN, PROT_WRITE, 0, MAP_LEN) != -1 || errno != ENOMEM)
        return failed("a second map beyond the client's RDMA_IOMAPSIZE is ENOMEM");
    if (riounmap(fd, buf, MAP_LEN - 1) != -1 || errno != EINVAL)
        return failed("riounmap of a range never mapped is EINVAL");
    /* The map is announced before this. */
    if (rsend(fd, "mapped", 6, 0) != 6)
        return failed("rsend mapped");
    if (recv_word(fd, "written"))
        return 1;
    for (int i = 0; i < MAP_LEN; i++)
        if (buf[i] != (unsigned char)(i * 7 + 1)) {
            fprintf(stderr, "byte %d is %u\n", i, buf[i]);
            return failed("the riowrite is in place when the later rsend is read");
        }
    if (riounmap(fd, buf, MAP_LEN))
        return failed("riounmap");
    if (rsend(fd, "unmapped", 8, 0) != 8)
        return failed("rsend unmapped");
    if (recv_word(fd, "bye"))
        return 1;
    rclose(fd);
    rclose(l);
    printf("server checks passed\n");
    return 0;
}

static int client(struct sockaddr_in *addr)
{
    static unsigned char buf[MAP_LEN] __attribute__((aligned(4096)));
    int fd = rsocket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    if (fd < 0 || rsetsockopt(fd, SOL_RDMA, RDMA_IOMAPSIZE, &one, sizeof one))
        return failed("RDMA_IOMAPSIZE before connecting");
    bound(fd);
    /* The server listens before the client starts (the test waits for its listener). */
    if (rconnect(fd, (struct sockaddr *)addr, sizeof *addr))
        return failed("rconnect");
    if (riomap(fd, buf, MAP_LEN, PROT_WRITE, 0, -1) != -1 || errno != ENOMEM)
        return failed("riomap when the server takes no map is ENOMEM");
    if (recv_word(fd, "mapped"))
        return 1;
    if ((ssize_t)riowrite(fd, buf, 10, 5 * MAP_LEN, 0) != -1 || errno != EINVAL)
        return failed("riowrite where nothing is mapped is EINVAL");
    if (riowrite(fd, buf, 100, MAP_LEN - 46, 0) != 46)
        return failed("riowrite past the map's end is cut there");
    for (int i = 0; i < MAP_LEN; i++)
        buf[i] = (unsigned char)(i * 7 + 1);
    if (riowrite(fd, buf, MAP_LEN, 0, 0) != MAP_LEN)
        return failed("riowrite of the whole map");
    if (rsend(fd, "written", 7, 0) != 7)
        return failed("rsend written");
    if (recv_word(fd, "unmapped"))
        return 1;
    if ((ssize_t)riowrite(fd, buf, 1, 0, 0) != -1 || errno != EINVAL)
        return failed("riowrite after the server's riounmap is EINVAL");
    if (rsend(fd, "bye", 3, 0) != 3)
        return failed("rsend bye");
    rclose(fd);
    printf("client checks passed\n");
    return 0;
}

int main(int argc, char **argv)
{
    if (argc != 4) {
        fprintf(stderr, "usage: rsockets_iomap_probe server|client IP PORT\n");
        return 2;
    }
    struct sockaddr_in addr = { .sin_family = AF_INET, .sin_port = htons(atoi(argv[3])) };
    if (inet_pton(AF_INET, argv[2], &addr.sin_addr) != 1)
        return failed("address");
    return strcmp(argv[1], "server") ? client(&addr) : server(&addr);
}
