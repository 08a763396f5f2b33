# Reads commands from stdin, one a line: "connect IP PORT" connects (the application's own
# timeout: 10 s), reads the server's line and prints "CONNECTED <seconds> <line>" or
# "FAILED <seconds> <errno or reason>"; end of input ends the program. With the argument
# "timer", a signal interrupts the program every 50 ms (an interval timer, as profilers and
# language runtimes keep): a wait in the shim must stay bounded through them.
import signal, socket, sys, time
if sys.argv[1:] == ["timer"]:
    signal.signal(signal.SIGALRM, lambda *_: None)
    signal.setitimer(signal.ITIMER_REAL, 0.05, 0.05)
for command in sys.stdin:
    words = command.split()
    if not words:
        continue
    ip, port = words[1], int(words[2])
    started = time.monotonic()
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(10)
    try:
        s.connect((ip, port))
        line = s.makefile("rb").readline().decode().strip()
        print("CONNECTED %.3f %s" % (time.monotonic() - started, line), flush=True)
    except OSError as e:
        print("FAILED %.3f %s" % (time.monotonic() - started, e.errno or e), flush=True)
    finally:
        s.close()
