import socket
c = socket.create_connection(("10.32.0.4", 7201), timeout=10)
c.sendall(b"over exec"); print("ECHO", c.recv(100), c.getpeername(), flush=True)
