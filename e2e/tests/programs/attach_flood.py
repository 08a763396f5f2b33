# Holds COUNT connections to the router's attach socket and never says hello. A connection the
# router answers or closes is replaced at once, so the flood stays at COUNT for as long as the
# program runs. Prints "HOLDING n" once COUNT are open; when stdin closes, prints
# "REPLACED k" (how many it replaced) and exits.
import select, socket, sys, time
path, count = sys.argv[1], int(sys.argv[2])

def connect():
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            s.connect(path)
            return s
        except OSError:
            s.close()
            time.sleep(0.01)

conns = {}
poller = select.poll()
poller.register(0, select.POLLIN)
def open_one():
    s = connect()
    conns[s.fileno()] = s
    poller.register(s.fileno(), select.POLLIN)

for _ in range(count):
    open_one()
print("HOLDING", len(conns), flush=True)
replaced = 0
while True:
    for fd, _ in poller.poll(1000):
        if fd == 0:
            print("REPLACED", replaced, flush=True)
            sys.exit(0)
        poller.unregister(fd)
        conns.pop(fd).close()
        open_one()
        replaced += 1
