# Connects to argv[1]:argv[2] over IPv4, prints the server's one line and its own socket name.
import socket, sys

s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=20)
line = s.makefile().readline().strip()
print(line, "CLIENT", s.getsockname()[0], flush=True)
