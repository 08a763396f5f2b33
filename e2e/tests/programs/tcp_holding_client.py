import socket, sys, errno
c = socket.create_connection(("10.32.0.4", 6100), timeout=10)
c.sendall(b"a"); assert c.recv(10) == b"a"
print("CONNECTED", flush=True)
sys.stdin.readline()
c.sendall(b"b"); print("AFTER", c.recv(10), flush=True)
try:
    n = socket.create_connection(("10.32.0.4", 6100), timeout=10)
    n.sendall(b"c"); print("NEW", n.recv(10), flush=True)
except OSError as e:
    print("NEW_ERROR", e.errno, flush=True)
