import socket, time
s = socket.create_connection(("10.32.0.4", 5001)); s.makefile("rb").readline()
print("UP", flush=True); time.sleep(1.5); s.close()
