import socket, struct, sys, os, fcntl, time
sockpath = sys.argv[1]
def attach():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.connect(sockpath)
    s.send(b"FFHI" + struct.pack("<HH", 1, 1) + bytes(8))
    welcome = s.recv(4096)
    assert welcome[:4] == b"FFWE" or len(welcome) > 0, welcome
    return s
def request(s, op, port, fds=(), flags=0):
    msg = b"FFSQ" + struct.pack("<HHI", op, flags, 7) + bytes([0, 0, 0, 0]) + struct.pack("<H", port) + bytes(2) + struct.pack("<I", 16) + bytes(8)
    socket.send_fds(s, [msg], list(fds))
    s.settimeout(5)
    data = s.recv(64)
    return struct.unpack("<H", data[4:6])[0], struct.unpack("<i", data[12:16])[0]
def overlay_listener(port):
    o = socket.socket(); o.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    o.bind(("0.0.0.0", port)); o.listen(8); return o

s = attach()
# 1. A socket of our own, bound to the host's address, handed back as "our host listener".
fake = socket.socket()
fake.setsockopt(socket.IPPROTO_IP, 15, 1)  # IP_FREEBIND
fake.bind(("192.168.1.2", 47999)); fake.listen(8)
o1 = overlay_listener(9001)
status, errno_ = request(s, 6, 9001, [fake.fileno(), o1.fileno()])
print("RELISTEN_FAKE", status, errno_, flush=True)

# 2. An overlay listener made blocking after the router took it, then clients.
o2 = overlay_listener(9002)
status, _ = request(s, 2, 9002, [o2.fileno()])
print("LISTEN", status, flush=True)
flags = fcntl.fcntl(o2.fileno(), fcntl.F_GETFL)
fcntl.fcntl(o2.fileno(), fcntl.F_SETFL, flags & ~os.O_NONBLOCK)
clients = [socket.create_connection(("10.32.0.4", 9002), timeout=2) for _ in range(3)]
print("CLIENTS_CONNECTED", flush=True)

# 3. An overlay listener shut down after the router took it.
o3 = overlay_listener(9003)
status, _ = request(s, 2, 9003, [o3.fileno()])
o3.shutdown(socket.SHUT_RDWR)
print("SHUT", status, flush=True)

# 4. Garbage: the router drops this attachment, nothing else.
g = attach(); g.send(b"garbage!" * 4)
g.settimeout(5)
print("GARBAGE_ANSWER", g.recv(64), flush=True)
sys.stdin.readline()
