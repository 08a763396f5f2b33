# Listens on `count` ports from `first` (all in one process, so one container's listeners) and
# answers every connection on any of them with "HELLO <port>\n", then closes it. Prints
# "LISTENING <count>" once every listen succeeded, or "LISTEN_FAILED <i> <errno>" and exits.
import select, socket, sys
first, count = int(sys.argv[1]), int(sys.argv[2])
listeners = {}
for i in range(count):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", first + i))
    try:
        s.listen(16)
    except OSError as e:
        print("LISTEN_FAILED", i, e.errno, flush=True)
        sys.exit(1)
    listeners[s.fileno()] = (s, first + i)
print("LISTENING", count, flush=True)
poller = select.poll()
for fd in listeners:
    poller.register(fd, select.POLLIN)
while True:
    for fd, _ in poller.poll():
        s, port = listeners[fd]
        conn, _ = s.accept()
        conn.sendall(("HELLO %d\n" % port).encode())
        conn.close()
