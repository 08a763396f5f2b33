# A program that, between accelerated connections, does what daemons and careful servers do to
# descriptors it did not open itself: closes every fd from 3 up one by one, closes them with
# os.closerange (close_range(2)), and dup2()s a file onto every number. The shim's own
# descriptors (its router connection) must survive all of it: every connection stays
# accelerated, nothing the shim sends lands in a file of the program, nothing crashes.
# argv: server ip, port, scratch file. Prints OK <step> per step.
import os, resource, socket, sys

ip, port, scratch = sys.argv[1], int(sys.argv[2]), sys.argv[3]
soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
top = min(soft, 4096)  # every number the shim could use is below this (it picks <= 512)

def echo(step):
    s = socket.create_connection((ip, port), timeout=10)
    s.sendall(step.encode())
    got = b""
    while len(got) < len(step):
        d = s.recv(100)
        if not d:
            break
        got += d
    assert got == step.encode(), (step, got)
    s.close()
    print("OK", step, flush=True)

echo("first")
for fd in range(3, top):
    try:
        os.close(fd)
    except OSError:
        pass
# A file opened now may get a number the shim used before: nothing of the shim may land in it.
watched = open(scratch, "wb", buffering=0)
echo("close_each")
os.closerange(3, 2**31 - 1)  # close_range(3, ~0U, 0) in CPython 3.11
watched = open(scratch, "ab", buffering=0)
echo("closerange")
devnull = os.open(os.devnull, os.O_RDWR)
for fd in range(3, top):
    if fd != devnull and fd != watched.fileno():
        os.dup2(devnull, fd)
echo("dup2_everywhere")
for fd in range(3, top):
    if fd != watched.fileno():
        try:
            os.close(fd)
        except OSError:
            pass
echo("last")
watched.close()
print("SCRATCH", os.path.getsize(scratch), flush=True)
