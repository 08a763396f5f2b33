# HTTP load with a new connection per request, as `wrk -H 'Connection: close'` makes it:
# argv: IP PORT CONNECTIONS REQUESTS_EACH EXPECT. CONNECTIONS clients run at once, each makes
# REQUESTS_EACH requests one after another (connect, GET, read to EOF, close). A request counts
# as served if the reply is a 200 whose body contains EXPECT. Every step is bounded in time.
# Prints "SERVED n ERRORS e" and, when there are errors, the first few.
import asyncio, sys

IP, PORT = sys.argv[1], int(sys.argv[2])
CONNECTIONS, REQUESTS_EACH, EXPECT = int(sys.argv[3]), int(sys.argv[4]), sys.argv[5].encode()
REQUEST = b"GET / HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n\r\n"
served = 0
errors = []


async def one_request():
    reader, writer = await asyncio.open_connection(IP, PORT)
    try:
        writer.write(REQUEST)
        await writer.drain()
        reply = await reader.read(-1)
    finally:
        writer.close()
    if not reply.startswith(b"HTTP/1.1 200") or EXPECT not in reply:
        raise ValueError(f"unexpected reply {reply[:120]!r}")


async def client():
    global served
    for _ in range(REQUESTS_EACH):
        try:
            await asyncio.wait_for(one_request(), timeout=20)
            served += 1
        except Exception as e:
            errors.append(repr(e))


async def main():
    await asyncio.gather(*(client() for _ in range(CONNECTIONS)))


asyncio.run(main())
print("SERVED", served, "ERRORS", len(errors), flush=True)
for e in errors[:5]:
    print("ERROR", e, flush=True)
