# Kernel and Python alone in dom0 (socketpair, mmap, sha256): the control for ringcheck.
python3 - <<'EOP'
import hashlib, os, socket, threading, mmap
data = os.urandom(16 << 20)
a, b = socket.socketpair()
def w():
    a.sendall(data); a.shutdown(socket.SHUT_WR)
threading.Thread(target=w).start()
got = bytearray()
while c := b.recv(1 << 20):
    got += c
print("XSOCK-STEP plain-socketpair", "PASS" if bytes(got) == data else "FAIL", len(got), flush=True)
m = mmap.mmap(-1, 16 << 20); m[:] = data
print("XSOCK-STEP plain-mmap", "PASS" if m[:] == data else "FAIL", flush=True)
print("XSOCK-STEP plain-sha", "PASS" if hashlib.sha256(data).digest() == hashlib.sha256(bytes(bytearray(data))).digest() else "FAIL", flush=True)
EOP
