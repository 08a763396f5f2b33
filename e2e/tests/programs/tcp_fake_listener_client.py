import socket
try:
    socket.create_connection(("10.32.0.4", 9001), timeout=5); print("CONNECTED")
except OSError as e:
    print("ERROR", e.errno)
