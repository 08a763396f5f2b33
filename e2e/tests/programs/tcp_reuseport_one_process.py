import socket, os
def listener(port, opt):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, opt, 1)
    s.bind(("0.0.0.0", port)); s.listen(8); return s
a = listener(7301, socket.SO_REUSEPORT)
b = listener(7301, socket.SO_REUSEPORT)
b.close()
x = listener(7302, socket.SO_REUSEADDR)
devnull = os.open("/dev/null", os.O_RDONLY)
os.dup2(devnull, x.fileno())
print("READY", flush=True)
a.settimeout(10)
c, peer = a.accept(); c.sendall(b"a"); c.close()
print("SERVED", peer[0], flush=True)
