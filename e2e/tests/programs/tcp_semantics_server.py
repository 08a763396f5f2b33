import socket, sys, os, select, threading, ctypes, signal, errno, fcntl, time
libc = ctypes.CDLL(None, use_errno=True)
portfile = sys.argv[1]
def listener(port, reuseport=False, bind=True):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuseport: s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if bind: s.bind(("0.0.0.0", port))
    return s
def overlay(addr): return addr[0].startswith("10.32.")
_print_lock = threading.Lock()
def say(*words):
    # The parts run on threads: one print's pieces ("OK", " ", part, "\n") interleaved with
    # another's ("OKOK port0\n reuseaddr") without the lock.
    with _print_lock:
        print(*words, flush=True)
def ok(part): say("OK", part)

# epoll registration made before listen; accept4 with SOCK_NONBLOCK|SOCK_CLOEXEC through the C ABI.
ep = select.epoll()
s1 = listener(7101); s1.setblocking(False)
ep.register(s1.fileno(), select.EPOLLIN)
s1.listen(8)
def part_epoll_accept4():
    events = ep.poll(20)
    assert events and events[0][0] == s1.fileno(), events
    fd = libc.accept4(s1.fileno(), None, None, os.O_NONBLOCK | os.O_CLOEXEC)
    assert fd >= 0, ctypes.get_errno()
    assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK
    assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    c = socket.socket(fileno=fd); c.setblocking(True)
    assert overlay(c.getpeername()), c.getpeername()
    # dup, dup2, F_DUPFD_CLOEXEC: every copy reports the overlay peer.
    d1 = os.dup(fd); d2 = os.dup2(fd, 200); d3 = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 300)
    for d in (d1, d2, d3):
        assert socket.socket(fileno=os.dup(d)).getpeername() == c.getpeername(), d
    c.sendall(c.recv(100))
    for d in (d1, d2, d3): os.close(d)
    c.close()
    ok("epoll_accept4_dup")

# Many concurrent clients, each paired with the right peer.
s2 = listener(7102); s2.listen(64)
def part_many():
    def serve(c, peer):
        line = c.makefile("rb").readline().decode().split()
        c.sendall(("%s %d\n" % (line[0], peer[1])).encode()); c.close()
    threads = []
    for _ in range(20):
        c, peer = s2.accept()
        assert overlay(peer), peer
        t = threading.Thread(target=serve, args=(c, peer)); t.start(); threads.append(t)
    for t in threads: t.join()
    ok("many")

# shutdown: the client half-closes; we read to EOF, then answer.
s4 = listener(7104); s4.listen(4)
def part_shutdown():
    c, _ = s4.accept()
    got = b""
    while True:
        chunk = c.recv(65536)
        if not chunk: break
        got += chunk
    c.sendall(b"got %d" % len(got)); c.shutdown(socket.SHUT_WR); c.close()
    ok("shutdown")

# SO_REUSEADDR: close the listener and listen again on the same port at once.
s5 = listener(7105); s5.listen(4)
def part_reuseaddr():
    global s5
    c, _ = s5.accept(); c.sendall(b"first"); c.close(); s5.close()
    s5 = listener(7105); s5.listen(4)
    say("RELISTENED")
    c, peer = s5.accept(); assert overlay(peer); c.sendall(b"second"); c.close()
    ok("reuseaddr")

# Port 0: listen without bind; the kernel's port is the overlay port.
s7 = listener(0, bind=False); s7.listen(4)
port7 = s7.getsockname()[1]
assert port7 != 0
def part_port0():
    c, peer = s7.accept(); assert overlay(peer); c.sendall(b"port0"); c.close()
    ok("port0")

s8 = listener(7108); s8.listen(4)

# fork: listen in the parent, accept in two children. Children close the listeners they do not
# serve, as servers do: a listener lives while any process holds it (with or without Freeflow).
s3 = listener(7103); s3.listen(16)
def close_others(keep):
    for other in (s1, s2, s3, s4, s5, s7, s8):
        if other not in keep: other.close()
children = []
for i in range(2):
    pid = os.fork()
    if pid == 0:
        close_others([s3])
        s3.settimeout(8)
        try:
            while True:
                c, peer = s3.accept()
                assert overlay(peer), peer
                c.sendall(("%d %s\n" % (os.getpid(), peer[0])).encode()); c.close()
        except socket.timeout:
            pass
        os._exit(0)
    children.append(pid)

# SO_REUSEPORT: a second process of the container listens on the same port.
s6 = listener(7106, reuseport=True); s6.listen(8)
pid6 = os.fork()
if pid6 == 0:
    close_others([]); s6.close()
    t = listener(7106, reuseport=True); t.listen(8); t.settimeout(8)
    try:
        while True:
            c, _ = t.accept(); c.sendall(b"child"); c.close()
    except socket.timeout:
        pass
    os._exit(0)
children.append(pid6)
def part_reuseport():
    s6.settimeout(8)
    try:
        while True:
            c, _ = s6.accept(); c.sendall(b"parent"); c.close()
    except socket.timeout:
        pass

# EINTR: a blocking accept on an accelerated listener, interrupted by a signal with a handler.
def part_eintr():
    signal.signal(signal.SIGALRM, lambda *a: None)
    signal.siginterrupt(signal.SIGALRM, True)
    signal.setitimer(signal.ITIMER_REAL, 0.2)
    rc = libc.accept(s8.fileno(), None, None)
    assert rc == -1 and ctypes.get_errno() == errno.EINTR, (rc, ctypes.get_errno())
    ok("eintr")

with open(portfile + ".tmp", "w") as f: f.write(str(port7))
os.rename(portfile + ".tmp", portfile)
print("READY", flush=True)
part_eintr()
workers = [threading.Thread(target=p) for p in (part_epoll_accept4, part_many, part_shutdown, part_reuseaddr, part_port0, part_reuseport)]
for w in workers: w.start()
for w in workers: w.join()
for pid in children:
    _, status = os.waitpid(pid, 0)
    assert status == 0, status
ok("children")
