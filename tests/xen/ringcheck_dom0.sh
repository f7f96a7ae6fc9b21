# The ring core alone (no grants: mmap + eventfds) inside dom0: see docs/XEN.md.
TOUCH=1 python3 - <<'EOP'
import hashlib, mmap, os, select, socket, threading
from dataclasses import dataclass
from xsockd.ring import EventType, RingLink, Role
@dataclass
class Ch:
    fd: int; notify_fd: int; port: int = 1; kind: str = "eventfd"
e = [os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)]
ctl, rings = mmap.mmap(-1, 4096), mmap.mmap(-1, 2 * 262144)
if os.environ.get("TOUCH"):  # fault every ring page in before the pumps start
    rings[:] = bytes(len(rings))
a = RingLink(control=ctl, rings=rings, ring_size=262144, role=Role.INITIATOR, evtchn=Ch(e[0], e[1]), window=262144, max_streams=8)
b = RingLink(control=ctl, rings=rings, ring_size=262144, role=Role.ACCEPTOR, evtchn=Ch(e[1], e[0]), window=262144, max_streams=8)
a.start(); b.start()
app, ae = socket.socketpair(); svc, be = socket.socketpair()
sid, _ = a.open_stream(ae, "x")
while True:
    select.select([b.fileno()], [], [], 10)
    evs = [x for x in b.events() if x.type == EventType.OPEN_REQUEST]
    if evs: break
b.accept_stream(sid, evs[0].serial, be)
data = os.urandom(16 << 20)
def w():
    app.sendall(data); app.shutdown(socket.SHUT_WR)
threading.Thread(target=w).start()
got = bytearray()
while c := svc.recv(1 << 20):
    got += c
bad = [i for i in range(0, len(data), 4096) if got[i:i + 4096] != data[i:i + 4096]]
first = next((i for i in range(bad[0], bad[0] + 4096) if got[i] != data[i]), -1) if bad else -1
print("XSOCK-STEP ringcheck", "PASS" if bytes(got) == data else "FAIL", len(got),
      f"bad pages {len(bad)} first byte {first}", flush=True)
# Where the wrong bytes came from: each bad run, its length, and where else in the stream
# (relative offset) the same 64 bytes occur, or "zero"/"nowhere".
i, runs = 0, 0
n = min(len(got), len(data))
while i < n and runs < 12:
    if got[i] == data[i]:
        i += 1
        continue
    j = i
    while j < n and (got[j] != data[j] or got[j:j + 8] != data[j:j + 8]):
        j += 1
    probe = bytes(got[i:i + 64])
    where = "zero" if not probe.strip(b"\0") else (
        f"at {data.find(probe) - i:+d}" if data.find(probe) >= 0 else "nowhere")
    print(f"XSOCK-DIAG run {i}..{j} len {j - i} ring-off {i % 262144} src {where}", flush=True)
    runs += 1
    i = j
os._exit(0)
EOP
