# Threads of one process with connects outstanding at the router while something happens to it
# (argv: host port threads mode). First one connection (the process attaches), "ATTACHED"; then,
# at a line on stdin (the test has stopped the router meanwhile), the threads connect at once,
# each echoing its own payload, and "STARTED" is printed.
# mode "wait": the threads are joined: "DONE n OK k" (n threads finished, k echoed), then each
#   failure, or "HUNG h" if h threads did not finish in time.
# mode "fork": after a moment (the requests outstanding) the process forks; the child connects
#   once and exits 0 if its connection echoed; the parent prints "FORKED", joins its threads
#   as above and prints "CHILD exit-status".
import os, socket, sys, threading, time
host, port, count, mode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]

def echo_once(tag):
    payload = tag.encode() * 40
    with socket.create_connection((host, port), timeout=20) as s:
        s.sendall(payload)
        got = b""
        while len(got) < len(payload):
            d = s.recv(65536)
            if not d:
                break
            got += d
    return "ok" if got == payload else "%s got %r" % (tag, got[:30])

print("ATTACHED", echo_once("first"), flush=True)
sys.stdin.readline()
results = [None] * count
def one(i):
    try:
        results[i] = echo_once("thread-%d-" % i)
    except Exception as e:
        results[i] = "thread %d: %r" % (i, e)
threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(count)]
for t in threads:
    t.start()
print("STARTED", flush=True)
child = None
if mode == "fork":
    time.sleep(0.5)
    child = os.fork()
    if child == 0:
        try:
            os._exit(0 if echo_once("child-") == "ok" else 1)
        except Exception as e:
            print("CHILD_ERROR", repr(e), flush=True)
            os._exit(2)
    print("FORKED", flush=True)
deadline = time.monotonic() + 40
for t in threads:
    t.join(timeout=max(0.0, deadline - time.monotonic()))
hung = sum(1 for t in threads if t.is_alive())
if hung:
    print("HUNG", hung, flush=True)
done = [r for r in results if r is not None]
print("DONE", len(done), "OK", sum(1 for r in done if r == "ok"), flush=True)
for r in done:
    if r != "ok":
        print("FAILED", r, flush=True)
if child:
    _, status = os.waitpid(child, 0)
    print("CHILD", os.waitstatus_to_exitcode(status), flush=True)
os._exit(0)
