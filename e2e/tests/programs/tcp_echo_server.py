import socket, sys
n = int(sys.argv[1]); port = int(sys.argv[2]); family = socket.AF_INET6 if sys.argv[3] == "6" else socket.AF_INET
srv = socket.socket(family, socket.SOCK_STREAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port)); srv.listen(16)
print("LISTENING", srv.getsockname(), flush=True)
for _ in range(n):
    conn, peer = srv.accept()
    conn.sendall((repr((peer[0], peer[1], conn.getpeername()[0], conn.getsockname()[0])) + "\n").encode())
    while True:
        data = conn.recv(65536)
        if not data: break
        conn.sendall(data)
    conn.close()
