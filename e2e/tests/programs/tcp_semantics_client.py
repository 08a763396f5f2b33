import socket, sys, os, select, threading, errno, time
db = "10.32.0.4"; portfile = sys.argv[1]
def ok(part): print("OK", part, flush=True)
def expect_overlay(s, port):
    assert s.getpeername() == (db, port), s.getpeername()
    assert s.getsockname()[0] == "10.32.0.2", s.getsockname()

# epoll registration made before connect; non-blocking connect.
s = socket.socket(); s.setblocking(False)
ep = select.epoll(); ep.register(s.fileno(), select.EPOLLOUT)
rc = s.connect_ex((db, 7101))
assert rc in (0, errno.EINPROGRESS), rc
events = ep.poll(10)
assert events and events[0][0] == s.fileno() and events[0][1] & select.EPOLLOUT, events
assert s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
expect_overlay(s, 7101)
s.setblocking(True); s.sendall(b"ping"); assert s.recv(100) == b"ping"; s.close()
ok("epoll_connect")

# 20 concurrent clients from threads.
errors = []
def one(i):
    try:
        c = socket.create_connection((db, 7102), timeout=10)
        expect_overlay(c, 7102)
        c.sendall(b"%d %d\n" % (i, c.getsockname()[1]))
        idx, seen_port = c.makefile("rb").readline().decode().split()
        assert int(idx) == i and int(seen_port) == c.getsockname()[1], (i, idx, seen_port)
        c.close()
    except Exception as e:
        errors.append(repr(e))
threads = [threading.Thread(target=one, args=(i,)) for i in range(20)]
for t in threads: t.start()
for t in threads: t.join()
assert not errors, errors
ok("many")

# fork-accepting server: every connection answered by a child, with our overlay address.
pids = set()
for _ in range(6):
    c = socket.create_connection((db, 7103), timeout=10)
    pid, peer = c.makefile("rb").readline().decode().split()
    assert peer == "10.32.0.2", peer
    pids.add(pid); c.close()
print("FORK_PIDS", len(pids), flush=True)
ok("fork")

# shutdown(SHUT_WR), then read the answer.
c = socket.create_connection((db, 7104), timeout=10)
c.sendall(b"x" * 1000); c.shutdown(socket.SHUT_WR)
assert c.recv(100) == b"got 1000"; assert c.recv(100) == b""; c.close()
ok("shutdown")

# Re-listened port.
c = socket.create_connection((db, 7105), timeout=10); assert c.recv(10) == b"first"; c.close()
deadline = time.time() + 10
while True:
    try:
        c = socket.create_connection((db, 7105), timeout=10); got = c.recv(10); c.close()
        if got == b"second": break
    except OSError:
        pass
    assert time.time() < deadline, "no second listener"
    time.sleep(0.05)
ok("reuseaddr")

# Port 0.
port7 = int(open(portfile).read())
c = socket.create_connection((db, port7), timeout=10); expect_overlay(c, port7)
assert c.recv(10) == b"port0"; c.close()
ok("port0")

# SO_REUSEPORT: both processes serve the port.
answers = []
for _ in range(8):
    c = socket.create_connection((db, 7106), timeout=10); answers.append(c.recv(10)); c.close()
assert all(a in (b"parent", b"child") for a in answers), answers
print("REUSEPORT", sorted(set(answers)), flush=True)
ok("reuseport")
ok("client_done")
