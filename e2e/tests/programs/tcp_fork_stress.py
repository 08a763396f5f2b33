import os, socket, select, threading, time
stop = False
def churn():
    while not stop:
        e = select.epoll(); s = socket.socket(); e.register(s.fileno(), select.EPOLLIN); e.close(); s.close()
def connects():
    while not stop:
        try:
            c = socket.create_connection(("10.32.0.4", 6100), timeout=2); c.close()
        except OSError:
            pass
threads = [threading.Thread(target=churn), threading.Thread(target=churn), threading.Thread(target=connects)]
for t in threads: t.start()
hung = 0
for i in range(100):
    pid = os.fork()
    if pid == 0:
        s = socket.socket(); s.close(); os._exit(0)
    deadline = time.time() + 5
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done: break
        if time.time() > deadline:
            hung += 1; os.kill(pid, 9); os.waitpid(pid, 0); break
        time.sleep(0.001)
stop = True
for t in threads: t.join()
print("HUNG", hung, flush=True)
