# Many threads of one process connect at once to an echo server (argv: host port threads
# [signal interval in seconds: SIGALRM that often meanwhile, its handler installed without
# SA_RESTART, so blocking calls in any thread are interrupted]);
# each sends its own payload and checks that its own comes back: a reply or socket handed to the
# wrong thread shows as a wrong payload. Prints "CONCURRENT_OK n" when all n did.
import signal, socket, sys, threading
host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
alarms = [0]
if len(sys.argv) > 4:
    def tick(signum, frame):
        alarms[0] += 1
    signal.signal(signal.SIGALRM, tick)
    signal.siginterrupt(signal.SIGALRM, True)
    interval = float(sys.argv[4])
    signal.setitimer(signal.ITIMER_REAL, interval, interval)
start = threading.Barrier(count)
results = [None] * count

def one(i):
    payload = ("thread-%d-" % i).encode() * 50
    try:
        start.wait(timeout=20)
        with socket.create_connection((host, port), timeout=20) as s:
            s.sendall(payload)
            got = b""
            while len(got) < len(payload):
                d = s.recv(65536)
                if not d:
                    break
                got += d
            results[i] = "ok" if got == payload else "thread %d got %r" % (i, got[:40])
    except Exception as e:
        results[i] = "thread %d: %r" % (i, e)

threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
for t in threads:
    t.start()
for t in threads:
    t.join(timeout=40)
signal.setitimer(signal.ITIMER_REAL, 0)
bad = [r for r in results if r != "ok"]
print("ALARMS", alarms[0], flush=True)
for r in bad[:10]:
    print("FAILED", r, flush=True)
if not bad:
    print("CONCURRENT_OK", count, flush=True)
