# Speaks the shim's protocol itself (argv: router.sock host port count): sends `count` Connect
# requests on one attachment without reading a reply (as when many threads of a process have
# requests outstanding and the replies come faster than one reader takes them in), then reads
# them all. Prints "REPLIES n OK k DISTINCT d": n replies read, k of them Ok with a socket, d
# distinct sequence numbers among them. First waits (bounded) until the router knows the
# listener (a Connect accelerated), since one that does not yet answers "fall back".
import array, os, socket, struct, sys, time
sockpath, host, port, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.connect(sockpath)
s.send(b"FFHI" + struct.pack("<HH", 1, 1) + bytes(8))
s.settimeout(10)
welcome = s.recv(4096)
assert welcome[:4] == b"FFWL", welcome
ip = socket.inet_aton(host)


def connect_request(seq):
    return b"FFSQ" + struct.pack("<HHI", 1, 0, seq) + ip + struct.pack("<H", port) + bytes(2) + bytes(12)


# The listener is announced router to router after it listens: until this host's router knows
# it, a Connect falls back. Asked one at a time (bounded) until one is accelerated, so that the
# burst below finds it known however loaded the machine is.
known = False
for attempt in range(200):
    s.send(connect_request(1_000_000 + attempt))
    while True:
        data, fds, _, _ = socket.recv_fds(s, 64, 4)
        for fd in fds:
            os.close(fd)
        if data[:4] == b"FFSR":
            break  # else a notice
    if struct.unpack("<H", data[4:6])[0] == 0:
        known = True
        break
    time.sleep(0.05)
print("LISTENER_KNOWN" if known else "LISTENER_UNKNOWN", attempt, flush=True)
# Blocking sends without a timeout: a socket with a timeout waits for a quarter-empty buffer.
s.settimeout(None)
try:
    for seq in range(1, count + 1):
        s.send(connect_request(seq))
except OSError as e:
    print("SEND_FAILED", seq, repr(e), flush=True)
# The router has answered what it read meanwhile: its replies wait unread.
time.sleep(1)
got, ok, seqs = 0, 0, set()
s.settimeout(5)
while got < count:
    try:
        data, fds, _, _ = socket.recv_fds(s, 64, 4)
    except (socket.timeout, OSError) as e:
        print("STOPPED", repr(e), flush=True)
        break
    if not data:
        print("STOPPED closed", flush=True)
        break
    if data[:4] != b"FFSR":
        continue  # a notice
    got += 1
    status, seq = struct.unpack("<H", data[4:6])[0], struct.unpack("<I", data[8:12])[0]
    seqs.add(seq)
    if status == 0 and len(fds) == 1:
        ok += 1
    for fd in fds:
        os.close(fd)
print("REPLIES", got, "OK", ok, "DISTINCT", len(seqs), flush=True)
