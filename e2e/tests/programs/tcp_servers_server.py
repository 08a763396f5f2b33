# A server with the listener layouts real servers use, for e2e/tests/tcp_servers.rs.
# argv: port layout daemon connections
#   layout "pair": 0.0.0.0:port (AF_INET), then [::]:port with IPV6_V6ONLY=1 (PostgreSQL's
#                  listen_addresses='*'); "dual": [::]:port with IPV6_V6ONLY=0; "v4": 0.0.0.0:port
#   daemon "1": listen, then the classic double fork: the first parent exits at once, the middle
#               one (after setsid) too; the grandchild serves.
# Prints "LISTENING <pid> <getsockname of each listener>", then answers `connections` clients,
# each with one line "ARRIVED <family> <peer> <sockname>", and exits.
import os, select, signal, socket, sys

port, layout, daemon, n = int(sys.argv[1]), sys.argv[2], sys.argv[3] == "1", int(sys.argv[4])
signal.alarm(60)  # bounded, whatever the test does


def listener(family, addr, v6only=None):
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if v6only is not None:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, v6only)
    s.bind((addr, port))
    s.listen(16)
    return s


if layout == "pair":
    listeners = [listener(socket.AF_INET, "0.0.0.0"), listener(socket.AF_INET6, "::", 1)]
elif layout == "dual":
    listeners = [listener(socket.AF_INET6, "::", 0)]
else:
    listeners = [listener(socket.AF_INET, "0.0.0.0")]

if daemon:
    if os.fork() > 0:
        os._exit(0)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)

names = " ".join(repr(s.getsockname()) for s in listeners)
print("LISTENING", os.getpid(), names, flush=True)
for _ in range(n):
    ready, _, _ = select.select(listeners, [], [])
    conn, peer = ready[0].accept()
    family = "inet6" if ready[0].family == socket.AF_INET6 else "inet"
    line = "ARRIVED %s %r %r" % (family, peer, conn.getsockname())
    print(line, flush=True)
    conn.sendall((line + "\n").encode())
    conn.close()
