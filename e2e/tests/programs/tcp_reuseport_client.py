import socket
c = socket.create_connection(("10.32.0.4", 7301), timeout=5)
try:
    print("GOT", c.recv(1))
except OSError as e:
    print("ERROR", e)
