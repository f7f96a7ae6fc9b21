"""The processes the benchmark suite runs: one server, and clients that each measure one thing.

They run as separate Python processes (``python -c``) so that the process measuring never shares
a GIL with the one serving or relaying.  The server is the same for every path; what differs is
where a client connects: the server's own socket (direct), a socat relay's, or xsockd's.

Protocol between a client and the server, on each connection: if the first byte is ``s`` the
connection is a sink (the server reads to EOF, then answers the byte count as 8 bytes little
endian and closes); otherwise it is an echo (every byte comes back, the first one included).
"""

from __future__ import annotations

# The server: one thread, epoll, non-blocking; echo or sink per connection (see above).
SERVER = r"""
import select, socket, sys
srv = socket.socket(socket.AF_UNIX); srv.bind(sys.argv[1]); srv.listen(4096)
srv.setblocking(False)
ep = select.epoll(); ep.register(srv.fileno(), select.EPOLLIN)
conns = {}  # fd -> [socket, mode (None until the first byte), bytes sunk]
buf = bytearray(1 << 20); view = memoryview(buf)
print("ready", flush=True)
while True:
    for fd, _ in ep.poll():
        if fd == srv.fileno():
            while True:
                try:
                    c, _ = srv.accept()
                except BlockingIOError:
                    break
                c.setblocking(False); conns[c.fileno()] = [c, None, 0]
                ep.register(c.fileno(), select.EPOLLIN)
            continue
        st = conns.get(fd)
        if st is None:
            continue
        c = st[0]
        try:
            n = c.recv_into(buf)
        except BlockingIOError:
            continue
        except OSError:
            n = 0
        if n and st[1] is None:
            st[1] = "s" if buf[0] == 0x73 else "e"
        if n and st[1] == "s":
            st[2] += n
        elif n:
            c.setblocking(True)
            try:
                c.sendall(view[:n])
            except OSError:
                n = 0
            c.setblocking(False)
        if not n:
            if st[1] == "s":
                c.setblocking(True)
                try:
                    c.sendall(st[2].to_bytes(8, "little"))
                except OSError:
                    pass
            ep.unregister(fd); del conns[fd]; c.close()
"""

# A client: argv = mode, socket path, mode's arguments; prints one JSON document.
#   rt SIZE N          one connection, N round trips of SIZE bytes (after N/10 not counted);
#                      prints the latencies in ns
#   open N             N times: connect, 1-byte echo, close; prints latencies in ns and wall s
#   tput TOTAL SIZE    one stream, TOTAL bytes in writes of SIZE, until the server's count;
#                      prints seconds from connect to the count
#   streams N EACH     N streams at once, EACH bytes each in 64 KiB writes (one thread, epoll);
#                      prints seconds from all connected to every count
CLIENT = r"""
import json, select, socket, sys, time
mode, path, a = sys.argv[1], sys.argv[2], [int(x) for x in sys.argv[3:]]

def connect():
    s = socket.socket(socket.AF_UNIX); s.connect(path); return s

def recv_exact(s, view):
    got = 0
    while got < len(view):
        k = s.recv_into(view[got:])
        if not k:
            raise SystemExit("client: the connection ended early")
        got += k

def count(s):
    b = bytearray(8); recv_exact(s, memoryview(b)); return int.from_bytes(b, "little")

if mode == "rt":
    size, n = a
    s = connect(); msg = b"e" * size; buf = bytearray(size); view = memoryview(buf); out = []
    for _ in range(n + n // 10):
        t0 = time.perf_counter_ns(); s.sendall(msg); recv_exact(s, view)
        out.append(time.perf_counter_ns() - t0)
    if bytes(buf) != msg:
        raise SystemExit("client: the echo differs")
    print(json.dumps(out[n // 10:]))
elif mode == "open":
    (n,) = a
    out = []; start = time.perf_counter()
    for _ in range(n):
        t0 = time.perf_counter_ns()
        s = socket.socket(socket.AF_UNIX); s.connect(path); s.sendall(b"e")
        if s.recv(1) != b"e":
            raise SystemExit("client: no echo")
        s.close(); out.append(time.perf_counter_ns() - t0)
    print(json.dumps({"lat": out, "wall": time.perf_counter() - start}))
elif mode == "tput":
    total, size = a
    chunk = b"s" * size
    s = connect(); t0 = time.perf_counter(); left = total
    while left > 0:
        s.sendall(chunk if left >= size else chunk[:left]); left -= size
    s.shutdown(socket.SHUT_WR); got = count(s); dt = time.perf_counter() - t0
    if got != total:
        raise SystemExit(f"client: the server got {got} bytes of {total}")
    print(json.dumps(dt))
elif mode == "streams":
    n, each = a
    chunk = memoryview(b"s" * 65536)
    socks = [connect() for _ in range(n)]
    ep = select.epoll(); left = {}; acks = {}
    for s in socks:
        s.setblocking(False); left[s.fileno()] = each; ep.register(s.fileno(), select.EPOLLOUT)
    by_fd = {s.fileno(): s for s in socks}
    t0 = time.perf_counter(); done = 0
    while done < n:
        for fd, ev in ep.poll():
            s = by_fd[fd]
            if fd in left:
                try:
                    k = s.send(chunk[:min(65536, left[fd])])
                except BlockingIOError:
                    continue
                left[fd] -= k
                if left[fd] == 0:
                    del left[fd]; s.shutdown(socket.SHUT_WR); acks[fd] = bytearray()
                    ep.modify(fd, select.EPOLLIN)
            else:
                b = s.recv(8 - len(acks[fd]))
                if not b:
                    raise SystemExit("client: a stream ended before its count")
                acks[fd] += b
                if len(acks[fd]) == 8:
                    if int.from_bytes(acks[fd], "little") != each:
                        raise SystemExit("client: a stream lost bytes")
                    ep.unregister(fd); done += 1
    dt = time.perf_counter() - t0
    for s in socks:
        s.close()
    print(json.dumps(dt))
else:
    raise SystemExit(f"client: unknown mode {mode}")
"""
