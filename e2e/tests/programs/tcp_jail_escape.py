# The host-socket jail's test program, in three roles:
#   serve PORT             an overlay server: accepts, says "hello\n" to each client, holds them
#   host-listen IP PORT    a listener only in the host's namespace: counts the connections it
#                          gets until stdin closes, then prints HOST_ACCEPTED <n>
#   escape SERVER_IP PORT HOST_IP HOST_PORT OWN_IP
#                          a hostile client: takes host sockets from Freeflow (an accelerated
#                          connect, an accelerated listen) and tries to reuse them on the host
#                          network with raw system calls (syscall(2) through ctypes: the shim
#                          interposes libc's connect, listen and shutdown, not syscall); prints
#                          "<STEP> <errno>" lines (0: the call succeeded).
import ctypes, select, socket, struct, sys

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
SYS_SHUTDOWN, SYS_LISTEN, SYS_CONNECT, SYS_GETSOCKNAME, SYS_ACCEPT4 = 48, 50, 42, 51, 288  # x86_64
SYS_FCNTL, F_SETFL, O_NONBLOCK = 72, 4, 0o4000
SOCK_NONBLOCK = 0o4000


def raw(nr, *args):
    ctypes.set_errno(0)
    rc = libc.syscall(ctypes.c_long(nr), *args)
    return 0 if rc >= 0 else ctypes.get_errno()


def raw_connect(fd, sockaddr):
    buf = ctypes.create_string_buffer(sockaddr, len(sockaddr))
    return raw(SYS_CONNECT, ctypes.c_long(fd), buf, ctypes.c_long(len(sockaddr)))


def sockaddr_in(ip, port):
    return struct.pack("<H", socket.AF_INET) + struct.pack(">H", port) + socket.inet_aton(ip) + bytes(8)


# A sockaddr whose family is AF_UNSPEC: connect() with it disconnects a TCP socket.
UNSPEC = bytes(16)


def kernel_name(fd):
    """The socket's real local address (not the shim's overlay view)."""
    buf = ctypes.create_string_buffer(128)
    size = ctypes.c_uint32(128)
    if raw(SYS_GETSOCKNAME, ctypes.c_long(fd), buf, ctypes.byref(size)) != 0:
        return "?"
    family = struct.unpack("<H", buf.raw[:2])[0]
    port = struct.unpack(">H", buf.raw[2:4])[0]
    if family == socket.AF_INET:
        return "%s:%d" % (socket.inet_ntoa(buf.raw[4:8]), port)
    if family == socket.AF_INET6:
        return "%s:%d" % (socket.inet_ntop(socket.AF_INET6, buf.raw[8:24]).replace("::ffff:", ""), port)
    return "?"


def say(*words):
    print(*words, flush=True)


def serve(port):
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port)); srv.listen(16)
    say("LISTENING")
    held = []
    while True:
        ready, _, _ = select.select([srv, sys.stdin], [], [])
        if sys.stdin in ready and not sys.stdin.readline():
            return
        if srv in ready:
            conn, _ = srv.accept()
            conn.sendall(b"hello\n")
            held.append(conn)


def host_listen(ip, port):
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((ip, port)); srv.listen(16)
    say("LISTENING")
    accepted = []
    while True:
        ready, _, _ = select.select([srv, sys.stdin], [], [])
        if srv in ready:
            accepted.append(srv.accept()[0])
        if sys.stdin in ready and not sys.stdin.readline():
            break
    say("HOST_ACCEPTED", len(accepted))


def connected(server_ip, port, step):
    """An accelerated connection to the overlay server, used once as the application would."""
    s = socket.create_connection((server_ip, port), timeout=10)
    say(step + "_HELLO", s.recv(16) == b"hello\n")
    say(step + "_SOCKNAME", kernel_name(s.fileno()))
    return s


def escape(server_ip, port, host_ip, host_port, own_ip):
    target = sockaddr_in(host_ip, host_port)
    # (a) An accelerated connection, disconnected, connected to a host-only listener.
    a = connected(server_ip, port, "A")
    say("A_DISCONNECT", raw_connect(a.fileno(), UNSPEC))
    say("A_CONNECT", raw_connect(a.fileno(), target))
    say("A_AGAIN", raw_connect(a.fileno(), target))
    # (c) An accelerated listener, shut down (which disconnects it), connected likewise.
    c = socket.socket()
    c.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    c.bind(("0.0.0.0", port + 1)); c.listen(4)
    say("C_SOCKNAME", kernel_name(c.fileno()))
    say("C_SHUTDOWN", raw(SYS_SHUTDOWN, ctypes.c_long(c.fileno()), ctypes.c_long(socket.SHUT_RDWR)))
    say("C_CONNECT", raw_connect(c.fileno(), target))
    # (e) A connection accepted on an accelerated listener (from this container itself),
    # disconnected, connected likewise.
    e = socket.socket()
    e.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    e.bind(("0.0.0.0", port + 2)); e.listen(4)
    client = socket.create_connection((own_ip, port + 2), timeout=10)
    accepted, _ = e.accept()
    say("E_SOCKNAME", kernel_name(accepted.fileno()))
    say("E_DISCONNECT", raw_connect(accepted.fileno(), UNSPEC))
    say("E_CONNECT", raw_connect(accepted.fileno(), target))
    # (d) An accelerated connection, disconnected, listening on its host port.
    d = connected(server_ip, port, "D")
    say("D_DISCONNECT", raw_connect(d.fileno(), UNSPEC))
    say("D_LISTEN", raw(SYS_LISTEN, ctypes.c_long(d.fileno()), ctypes.c_long(8)))
    say("D_PORT", kernel_name(d.fileno()).split(":")[-1])
    sys.stdin.readline()  # the test tried to connect to it from the host
    raw(SYS_FCNTL, ctypes.c_long(d.fileno()), ctypes.c_long(F_SETFL), ctypes.c_long(O_NONBLOCK))
    say("D_ACCEPT", raw(SYS_ACCEPT4, ctypes.c_long(d.fileno()), None, None, ctypes.c_long(SOCK_NONBLOCK)))


role = sys.argv[1]
if role == "serve":
    serve(int(sys.argv[2]))
elif role == "host-listen":
    host_listen(sys.argv[2], int(sys.argv[3]))
else:
    escape(sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5]), sys.argv[6])
