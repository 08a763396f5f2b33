import socket, sys, select, errno
ip, port, size, mode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
family = socket.AF_INET6 if ":" in ip else socket.AF_INET
s = socket.socket(family, socket.SOCK_STREAM)
if mode == "nonblocking":
    s.setblocking(False)
    rc = s.connect_ex((ip, port))
    print("CONNECT_EX", rc, flush=True)
    assert rc in (0, errno.EINPROGRESS), rc
    _, w, _ = select.select([], [s], [], 10)
    assert w, "connect did not complete"
    print("SO_ERROR", s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR), flush=True)
    s.setblocking(True)
else:
    try:
        s.connect((ip, port))
    except OSError as e:
        print("CONNECT_ERROR", e.errno, flush=True); sys.exit(0)
f = s.makefile("rb")
print("SERVER_SAW", f.readline().decode().strip(), flush=True)
print("CLIENT_SOCKNAME", s.getsockname()[0], "PEERNAME", s.getpeername()[0], s.getpeername()[1], flush=True)
payload = bytes(range(256)) * (size // 256)
# Send from a thread while reading the echo: an echo server blocks once both directions'
# buffers are full if the client only reads after sending everything.
import threading
def send():
    s.sendall(payload); s.shutdown(socket.SHUT_WR)
sender = threading.Thread(target=send); sender.start()
got = b""
while len(got) < len(payload):
    chunk = f.read(min(65536, len(payload) - len(got)))
    if not chunk: break
    got += chunk
sender.join()
print("ECHO_OK" if got == payload else "ECHO_BAD %d" % len(got), flush=True)
