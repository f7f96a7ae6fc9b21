"""A hostile domain for tests: it speaks the RAW xsockd link protocol (docs/PROTOCOL.md).

It shares no code with the daemon under test above the backend: offers are read, frames
encoded and decoded, rings indexed right here with ``struct``, so that a bug in xsockd's own
link, manager or ring code cannot hide itself by being on both ends.  Only grants, mapping,
event channels and the XenStore connection come from ``xsockd.backend_sim``.

The fixture is domain ``domid`` (say 2), which the daemon under test (``victim``, say 1) lists
as a peer.  It is always the link's *acceptor*: it creates its own request node, the daemon asks
for a link through it when a local application connects to ``<rundir>/<domid>.sock``, and the
fixture maps the daemon's pages and answers.  Then the test drives it frame by frame, index by
index, and may make it die or leave at any moment.

Usage::

    h = HostileDomain(sim_dir, domid=2, victim=1)
    app = h.establish(lambda: world.connect(1, 2))   # the app connection triggers the offer
    h.send(open_frame(2, "count"), reset_frame(2))  # one burst, one prod update
    frames = h.recv()
    h.die()                                         # like a kill -9 of the peer's process
"""

from __future__ import annotations

import errno
import hashlib
import os
import select
import selectors
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from simworld import SimWorld

from xsockd.backend import EventChannel, MappedPages, UnmapNotify, XenStorePerm
from xsockd.backend_sim import SimBackend
from xsockd.demo import DaemonProcess, config_text
from xsockd.errors import BackendError, XenStoreError

# The protocol version this fixture speaks: the value of the offer's ``version`` node.  The ONE
# place to change when the protocol moves on (2 with rendezvous v2).
PROTOCOL_VERSION = 2

# Everything below is copied from docs/PROTOCOL.md on purpose, not imported from xsockd: the
# fixture is an independent implementation of the wire protocol.
PAGE = 4096
XS_ROOT = "data/xsock"
REFS_PER_NODE = 128

# Frame types ("Frames").
OPEN, ACCEPT, DATA, CREDIT, FIN, RESET, GOODBYE = range(1, 8)
FRAME_TYPES = (OPEN, ACCEPT, DATA, CREDIT, FIN, RESET, GOODBYE)
# RESET reasons.
R_REFUSED, R_NO_SERVICE, R_TOO_MANY, R_ABORTED, R_CLOSED = range(1, 6)
HEADER = struct.Struct("<IHHII")  # stream, type, flags, len, arg
HDR = HEADER.size  # 16
MAX_WINDOW = 16 << 20

# Control page ("Shared memory").  Ring 0 carries initiator -> acceptor (the daemon to us), ring
# 1 acceptor -> initiator (us to the daemon).
LIVE_INITIATOR, LIVE_ACCEPTOR = 0x000, 0x001
RING0, RING1 = 0x040, 0x0C0
PROD, PROD_WANTS, CONS, CONS_WANTS = 0x00, 0x04, 0x40, 0x44

# Indices a test may write raw: name -> control-page offset.
INDEX_OFFSETS = {
    "tx_prod": RING1 + PROD,            # ours: the daemon reads it as ring 1's prod
    "tx_prod_wants": RING1 + PROD_WANTS,
    "tx_cons": RING1 + CONS,            # the daemon's: we scribble on it
    "tx_cons_wants": RING1 + CONS_WANTS,
    "rx_prod": RING0 + PROD,            # the daemon's
    "rx_prod_wants": RING0 + PROD_WANTS,
    "rx_cons": RING0 + CONS,            # ours: how far we consumed ring 0
    "rx_cons_wants": RING0 + CONS_WANTS,
}


def pad16(n: int) -> int:
    return (n + 15) & ~15


@dataclass(frozen=True)
class Frame:
    """A decoded frame; ``payload`` holds ``length`` bytes (not the padding)."""

    stream: int
    type: int
    flags: int
    length: int
    arg: int
    payload: bytes


def encode_frame(stream: int, ftype: int, arg: int = 0, payload: bytes = b"", *,
                 flags: int = 0, length: int | None = None) -> bytes:
    """Returns one frame: header, payload, zero padding to 16.

    ``length`` is what the header claims (default: the payload's size); a different value lets
    a test lie about it.  Fields are masked to their widths so that any integer encodes.
    """
    claimed = len(payload) if length is None else length
    hdr = HEADER.pack(stream & 0xFFFFFFFF, ftype & 0xFFFF, flags & 0xFFFF,
                      claimed & 0xFFFFFFFF, arg & 0xFFFFFFFF)
    return hdr + payload + b"\0" * (pad16(len(payload)) - len(payload))


def open_frame(stream: int, service: str | bytes = b"", window: int = 256 * 1024) -> bytes:
    name = service.encode() if isinstance(service, str) else service
    return encode_frame(stream, OPEN, window, name)


def accept_frame(stream: int, window: int = 256 * 1024) -> bytes:
    return encode_frame(stream, ACCEPT, window)


def data_frame(stream: int, payload: bytes) -> bytes:
    return encode_frame(stream, DATA, 0, payload)


def credit_frame(stream: int, amount: int) -> bytes:
    return encode_frame(stream, CREDIT, amount)


def fin_frame(stream: int) -> bytes:
    return encode_frame(stream, FIN)


def reset_frame(stream: int, reason: int = R_ABORTED) -> bytes:
    return encode_frame(stream, RESET, reason)


def goodbye_frame() -> bytes:
    return encode_frame(0, GOODBYE)


@dataclass(frozen=True)
class RawOffer:
    """The daemon's offer, read node by node; ``nodes`` keeps every raw value read."""

    generation: int
    version: int
    ring_size: int
    control_ref: int
    port: int
    ring_refs: tuple[int, ...]
    nodes: dict[str, bytes]


class LinkGone(Exception):
    """The fixture's link is dead (it died) or the daemon stopped consuming its ring."""


def xs_errno(fn: Callable[[], object]) -> int:
    """Runs a XenStore call; returns 0 or the errno it failed with (a hostile test wants both)."""
    try:
        fn()
    except XenStoreError as e:
        return e.errno or errno.EIO
    return 0


class HostileDomain:
    """Domain ``domid`` acting against the xsockd of domain ``victim`` (see module doc).

    Lifecycle: prepared (``prepare``) -> attached (``attach``) -> dead (``die``) or closed
    (``close``).  ``close()`` is idempotent and also follows ``die()``.
    """

    def __init__(self, sim_dir: str | os.PathLike[str], domid: int, victim: int) -> None:
        self.domid = domid
        self.victim = victim
        self.backend: SimBackend | None = SimBackend(domid, sim_dir)
        self.xs = self.backend.open_xenstore()
        self.offer: RawOffer | None = None
        self.channel: EventChannel | None = None
        self.control: MappedPages | None = None
        self.rings: MappedPages | None = None
        self.tx_prod = 0   # private copies of our own indices: shared memory is never trusted
        self.rx_cons = 0
        self.dead = False
        self.scribbled = False  # we wrote a field that only the daemon should write

    # ---- paths --------------------------------------------------------------------------

    @staticmethod
    def home(domid: int) -> str:
        return f"/local/domain/{domid}"

    @property
    def request_dir(self) -> str:
        return f"{self.home(self.domid)}/{XS_ROOT}/request"

    @property
    def request_node(self) -> str:
        """The node through which the victim asks us for a link and reads our answer."""
        return f"{self.request_dir}/{self.victim}"

    @property
    def offer_dir(self) -> str:
        return f"{self.home(self.victim)}/{XS_ROOT}/link/{self.domid}"

    # ---- rendezvous ---------------------------------------------------------------------

    def prepare(self) -> None:
        """Creates our request directory and the victim's request node in it.

        Directory ``[w D]``, node ``[n D, b victim]``: a v1 daemon replaces the node (it has
        write access), a v2 one writes its offer into it; both work.
        """
        root = f"{self.home(self.domid)}/{XS_ROOT}"
        self.xs.write(root, b"")
        self.xs.set_perms(root, [XenStorePerm(self.domid, "n")])
        self.xs.write(self.request_dir, b"")
        self.xs.set_perms(self.request_dir, [XenStorePerm(self.domid, "w")])
        self.xs.write(self.request_node, b"")
        self.xs.set_perms(self.request_node, [XenStorePerm(self.domid, "n"),
                                              XenStorePerm(self.victim, "b")])

    def wait_offer(self, timeout: float = 10.0, not_generation: int | None = None) -> RawOffer:
        """Returns the victim's offer once ``request/<victim>`` says ``offer <gen>``.

        Polled (every 10 ms), not watched: simpler, and no watch quota is involved.
        ``not_generation`` skips a stale request of an earlier link.
        """
        deadline = time.monotonic() + timeout
        while True:
            try:
                words = self.xs.read(self.request_node).decode("ascii", "replace").split()
            except XenStoreError:
                words = []
            if len(words) == 2 and words[0] == "offer" and words[1].isdigit() \
                    and int(words[1]) != not_generation:
                gen = int(words[1])
                try:
                    offer = self.read_offer()
                except (XenStoreError, ValueError, KeyError):
                    offer = None  # not published yet, or half torn down: look again
                if offer is not None and offer.generation == gen:
                    self.offer = offer
                    return offer
            if time.monotonic() > deadline:
                raise TimeoutError(f"domain {self.victim} made no offer to domain {self.domid} "
                                   f"within {timeout:g} s (request node: {words})")
            time.sleep(0.01)

    def read_offer(self) -> RawOffer:
        """Reads the offer's nodes in one transaction; minimal checks (the daemon is not the
        one under suspicion here, but a wrong version must say so loudly)."""
        base = self.offer_dir
        tx = self.xs.transaction_start()
        try:
            nodes: dict[str, bytes] = {}
            for name in self.xs.directory(base, tx):
                if name == "ring-refs":
                    for k in self.xs.directory(f"{base}/ring-refs", tx):
                        nodes[f"ring-refs/{k}"] = self.xs.read(f"{base}/ring-refs/{k}", tx)
                else:
                    nodes[name] = self.xs.read(f"{base}/{name}", tx)
        finally:
            self.xs.transaction_end(tx, commit=False)
        version = int(nodes["version"])
        if version != PROTOCOL_VERSION:
            raise AssertionError(f"the daemon offers protocol version {version}; the fixture "
                                 f"speaks {PROTOCOL_VERSION} (tests/hostile.py PROTOCOL_VERSION)")
        ring_size = int(nodes["ring-size"])
        chunks = sorted(int(k.split("/")[1]) for k in nodes if k.startswith("ring-refs/"))
        refs = tuple(int(w) for k in chunks for w in nodes[f"ring-refs/{k}"].split())
        if len(refs) != 2 * ring_size // PAGE:
            raise ValueError("offer not complete yet")
        return RawOffer(int(nodes["generation"]), version, ring_size, int(nodes["control-ref"]),
                        int(nodes["event-channel"]), refs, nodes)

    def attach(self, offer: RawOffer | None = None, answer: bool = True) -> None:
        """Binds, maps (control page with an unmap notification clearing our live byte, as a
        real acceptor does, so that our death is seen at once), sets live, notifies, answers."""
        offer = offer or self.offer
        assert offer is not None and self.backend is not None
        self.channel = self.backend.bind_interdomain(self.victim, offer.port)
        self.control = self.backend.map(self.victim, [offer.control_ref],
                                        UnmapNotify(LIVE_ACCEPTOR, self.channel.port))
        self.rings = self.backend.map(self.victim, offer.ring_refs)
        self.offer = offer
        self.tx_prod = self.rx_cons = 0
        self.control.buffer[LIVE_ACCEPTOR] = 1
        self.notify()
        if answer:
            self.answer(f"accepted {offer.generation}")

    def answer(self, text: str | bytes) -> None:
        """Writes ``text`` (anything: a test may lie) into the request node."""
        self.xs.write(self.request_node, text)

    def establish(self, trigger: Callable[[], socket.socket], timeout: float = 10.0,
                  not_generation: int | None = None) -> socket.socket:
        """prepare + trigger (an application connecting to the victim's socket for us, which
        makes the daemon offer a link) + wait_offer + attach.  Returns the trigger's socket."""
        self.prepare()
        app = trigger()
        try:
            self.attach(self.wait_offer(timeout, not_generation))
        except BaseException:
            app.close()
            raise
        return app

    # ---- shared memory ------------------------------------------------------------------

    @property
    def ring_size(self) -> int:
        assert self.offer is not None
        return self.offer.ring_size

    def _ctl(self) -> memoryview:
        if self.control is None or self.dead:
            raise LinkGone("not attached")
        return self.control.buffer

    def peek(self, offset: int) -> int:
        """Returns the uint32 at ``offset`` of the control page."""
        return int(struct.unpack_from("<I", self._ctl(), offset)[0])

    def poke(self, offset: int, value: int) -> None:
        """Writes the uint32 ``value`` (masked to 32 bits) at ``offset`` of the control page."""
        if offset not in (RING1 + PROD, RING0 + CONS):
            self.scribbled = True  # a field the daemon writes: what we read back is ours now
        struct.pack_into("<I", self._ctl(), offset, value & 0xFFFFFFFF)

    def poke_byte(self, offset: int, value: int) -> None:
        self.scribbled = self.scribbled or offset != LIVE_ACCEPTOR
        self._ctl()[offset] = value & 0xFF

    def set_index(self, name: str, value: int, notify: bool = True,
                  follow: bool = False) -> None:
        """Writes a raw index (see INDEX_OFFSETS), misaligned or out of range as the test likes.

        Only shared memory changes: our private copy stays true, so that the next ``send`` or
        ``recv`` stores the real value again (a lie the daemon may or may not have seen).
        ``follow=True`` moves our private copy too (a peer that lies consistently: later
        frames go where the test put the index).
        """
        self.poke(INDEX_OFFSETS[name], value)
        if follow and name == "tx_prod":
            self.tx_prod = value & 0xFFFFFFFF
        elif follow and name == "rx_cons":
            self.rx_cons = value & 0xFFFFFFFF
        if notify:
            self.notify()

    def _ring(self, which: int) -> memoryview:
        if self.rings is None or self.dead:
            raise LinkGone("not attached")
        size = self.ring_size
        return self.rings.buffer[which * size:(which + 1) * size]

    def notify(self) -> None:
        if self.channel is not None and not self.dead:
            self.channel.notify()

    def tx_space(self) -> int:
        """Free bytes in our tx ring by the daemon's cons (negative if the cons is impossible,
        e.g. after we scribbled on it: then nothing fits and send_raw gives up in time)."""
        used = (self.tx_prod - self.peek(RING1 + CONS)) & 0xFFFFFFFF
        return self.ring_size - used

    def send_raw(self, data: bytes, *, wait: float = 5.0, notify: bool = True,
                 publish: bool = True) -> None:
        """Copies ``data`` into ring 1 at our prod (wrapping), then stores prod += len(data).

        ``data`` need not be frames, nor a multiple of 16.  Waits up to ``wait`` seconds for
        space (draining ring 0 meanwhile, so that the daemon is never stuck on us); raises
        LinkGone if the space never comes.  ``publish=False`` writes the bytes but not prod.
        """
        size = self.ring_size
        if len(data) > size:
            raise ValueError(f"{len(data)} bytes do not fit a {size}-byte ring")
        deadline = time.monotonic() + wait
        while self.tx_space() < len(data):
            self.recv()
            if time.monotonic() > deadline:
                raise LinkGone(f"no room for {len(data)} bytes in ring 1 within {wait:g} s")
            self.wait_event(0.02)
        ring = self._ring(1)
        off = self.tx_prod & (size - 1)
        first = min(len(data), size - off)
        ring[off:off + first] = data[:first]
        if first < len(data):
            ring[:len(data) - first] = data[first:]
        self.tx_prod = (self.tx_prod + len(data)) & 0xFFFFFFFF
        if publish:
            # x86 keeps stores in program order: the bytes above are visible before prod.
            self.poke(RING1 + PROD, self.tx_prod)
        if notify:
            self.notify()

    def send(self, *frames: bytes, wait: float = 5.0, notify: bool = True) -> None:
        """Sends ``frames`` in one burst: one prod update for all of them (split into several
        bursts only when they do not fit in the ring together)."""
        chunk = b""
        for f in frames:
            if len(chunk) + len(f) > self.ring_size // 2:
                self.send_raw(chunk, wait=wait, notify=notify)
                chunk = b""
            chunk += f
        if chunk:
            self.send_raw(chunk, wait=wait, notify=notify)

    def goodbye(self) -> None:
        self.send(goodbye_frame())

    def recv(self) -> list[Frame]:
        """Consumes every whole frame in ring 0; stores cons and notifies if anything moved.

        A daemon that wrote nonsense would be a finding of its own: raises AssertionError.
        """
        if self.dead or self.control is None:
            return []
        size = self.ring_size
        prod = self.peek(RING0 + PROD)
        fill = (prod - self.rx_cons) & 0xFFFFFFFF
        if fill > size or fill % 16:
            what = f"ring 0 prod {prod} is impossible (our cons {self.rx_cons})"
            if self.scribbled:
                raise LinkGone(what)  # we wrote the daemon's indices ourselves: our doing
            raise AssertionError(f"the daemon's {what}")
        ring = self._ring(0)
        out: list[Frame] = []
        while fill >= HDR:
            off = self.rx_cons & (size - 1)
            stream, ftype, flags, length, arg = HEADER.unpack_from(ring, off)
            step = HDR + pad16(length)
            if step > fill:
                what = f"ring 0 holds a frame of {length} bytes past prod"
                if self.scribbled:
                    raise LinkGone(what)
                raise AssertionError(f"the daemon's {what}")
            start = (off + HDR) & (size - 1)
            end = start + length
            if end <= size:
                payload = bytes(ring[start:end])
            else:
                payload = bytes(ring[start:]) + bytes(ring[:end - size])
            out.append(Frame(stream, ftype, flags, length, arg, payload))
            self.rx_cons = (self.rx_cons + step) & 0xFFFFFFFF
            fill -= step
        if out:
            self.poke(RING0 + CONS, self.rx_cons)
            self.notify()
        return out

    def wait_event(self, timeout: float) -> bool:
        """Waits until the daemon notifies us (or ``timeout``); clears it.  True if it did."""
        if self.channel is None or self.dead:
            return False
        ready = select.select([self.channel.fd], [], [], timeout)[0]
        if ready:
            self.channel.clear()
        return bool(ready)

    def recv_until(self, cond: Callable[[Frame], bool], timeout: float = 5.0) -> list[Frame]:
        """Consumes frames until one satisfies ``cond`` (returned last) or ``timeout``."""
        deadline = time.monotonic() + timeout
        got: list[Frame] = []
        while True:
            for f in self.recv():
                got.append(f)
                if cond(f):
                    return got
            left = deadline - time.monotonic()
            if left <= 0:
                return got
            self.wait_event(min(left, 0.05))

    def daemon_live(self) -> bool:
        """The daemon's live byte (live[0]): 0 once its process died or it detached."""
        return not self.dead and self.control is not None \
            and self._ctl()[LIVE_INITIATOR] == 1

    # ---- XenStore, raw ------------------------------------------------------------------

    def xs_write(self, path: str, value: bytes | str) -> int:
        """Writes anything anywhere; returns 0 or the errno xenstored answered."""
        return xs_errno(lambda: self.xs.write(path, value))

    def xs_rm(self, path: str) -> int:
        return xs_errno(lambda: self.xs.rm(path))

    def xs_set_perms(self, path: str, perms: Iterable[XenStorePerm]) -> int:
        return xs_errno(lambda: self.xs.set_perms(path, list(perms)))

    # ---- the end ------------------------------------------------------------------------

    def die(self) -> None:
        """Dies abruptly, as a kill -9 of the peer's process: its hypervisor connection (our
        /dev/xen) and XenStore connection drop without a word; the hypervisor then performs
        our unmap notification (clears live[1], signals the daemon), exactly as on a death."""
        if self.backend is None:
            return
        self.dead = True
        # The sim's /dev/xen is this one socket (private to SimBackend: a test fixture may
        # reach in).  Shutting it down is what the kernel's exit does to the real devices.
        self.backend._handle.sock.shutdown(socket.SHUT_RDWR)
        self._release()

    def close(self) -> None:
        """Leaves cleanly-ish (no GOODBYE: send it first if the test wants one): unmaps, so
        that the daemon sees live[1] cleared, and closes every handle.  Idempotent."""
        if self.backend is None:
            return
        self._release()

    def _release(self) -> None:
        # After die() the hypervisor is gone for us: these closes only free local memory and
        # descriptors (their release requests fail quietly, as the backend intends).
        for res in (self.rings, self.control, self.channel):
            if res is not None:
                try:
                    res.close()
                except BackendError:
                    pass
        self.rings = self.control = self.channel = None
        self.dead = True
        self.xs.close()
        if self.backend is not None:
            self.backend.close()
            self.backend = None

    def __enter__(self) -> HostileDomain:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---- the world around the hostile domain: a counting service, a bystander, observations ----


class CountingService:
    """A Unix stream service on a thread that counts the connections it accepts.

    It reads and discards (or, with ``echo``, sends back) whatever arrives, and closes on EOF;
    ``accepted`` and ``open`` say how many connections it ever took and holds now.  Never blocks
    the daemon: it accepts as fast as it can.
    """

    def __init__(self, path: str | os.PathLike[str], echo: bool = False) -> None:
        self.path = os.fspath(path)
        self.echo = echo
        self.accepted = 0
        self.open = 0
        self.max_open = 0
        if os.path.exists(self.path):
            os.unlink(self.path)
        self._srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._srv.bind(self.path)
        self._srv.listen(socket.SOMAXCONN)
        self._srv.setblocking(False)
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._srv, selectors.EVENT_READ)
        self._stop_r, self._stop_w = os.pipe()
        self._sel.register(self._stop_r, selectors.EVENT_READ)
        self._thread = threading.Thread(target=self._run, name="counting-service", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        conns: set[socket.socket] = set()
        try:
            while True:
                for key, _ in self._sel.select():
                    if key.fileobj == self._stop_r:
                        return
                    if key.fileobj is self._srv:
                        while True:
                            try:
                                c, _ = self._srv.accept()
                            except BlockingIOError:
                                break
                            c.setblocking(False)
                            conns.add(c)
                            self._sel.register(c, selectors.EVENT_READ)
                            self.accepted += 1
                            self.open += 1
                            self.max_open = max(self.max_open, self.open)
                        continue
                    c = key.fileobj
                    assert isinstance(c, socket.socket)
                    try:
                        data = c.recv(1 << 16)
                        if data and self.echo:
                            c.setblocking(True)
                            c.settimeout(1)
                            c.sendall(data)
                            c.setblocking(False)
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError:
                        data = b""
                    if not data:
                        self._sel.unregister(c)
                        conns.discard(c)
                        c.close()
                        self.open -= 1
        finally:
            for c in conns:
                c.close()

    def close(self) -> None:
        os.write(self._stop_w, b"x")
        self._thread.join(10)
        self._sel.close()
        self._srv.close()
        os.close(self._stop_r)
        os.close(self._stop_w)
        if os.path.exists(self.path):
            os.unlink(self.path)


class Bystander:
    """A stream through an echo that runs until ``finish()``: pseudo-random bytes out, the echo
    back, both hashed, so that it spans the whole attack whatever the attack's length."""

    def __init__(self, sock: socket.socket, block: int = 1 << 16) -> None:
        self.sock = sock
        self.sent = hashlib.sha256()
        self.got = hashlib.sha256()
        self.sent_bytes = self.got_bytes = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._blocks = [os.urandom(block) for _ in range(4)]
        self._writer = threading.Thread(target=self._write, daemon=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._writer.start()
        self._reader.start()

    def _write(self) -> None:
        i = 0
        try:
            while not self._stop.is_set():
                chunk = self._blocks[i % 4]
                self.sock.sendall(chunk)
                self.sent.update(chunk)
                self.sent_bytes += len(chunk)
                i += 1
            self.sock.shutdown(socket.SHUT_WR)
        except BaseException as e:
            self.error = e

    def _read(self) -> None:
        buf = bytearray(1 << 20)
        view = memoryview(buf)
        try:
            while n := self.sock.recv_into(buf):
                self.got.update(view[:n])
                self.got_bytes += n
        except BaseException as e:
            self.error = self.error or e

    def finish(self, timeout: float = 60.0) -> tuple[int, str, str]:
        """Stops writing, reads the echo to its end; returns (bytes, sent sha256, got sha256)."""
        self._stop.set()
        self._writer.join(timeout)
        self._reader.join(timeout)
        self.sock.close()
        if self.error is not None:
            raise AssertionError(f"the bystander stream failed: {self.error!r}")
        if self._writer.is_alive() or self._reader.is_alive():
            raise AssertionError("the bystander stream hung")
        return self.sent_bytes, self.sent.hexdigest(), self.got.hexdigest()

    def __enter__(self) -> Bystander:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stops and closes (idempotent): after a failure that came before check(), so that
        nothing leaks into later tests."""
        self._stop.set()
        self.sock.close()

    def check(self) -> int:
        """finish() and assert that every byte came back intact; returns the byte count."""
        n, sent, got = self.finish()
        assert self.got_bytes == n, f"the bystander sent {n} bytes and got {self.got_bytes} back"
        assert sent == got, "the bystander's data came back corrupted"
        assert n > 0
        return n


def proc_status(pid: int, key: str) -> int:
    """Returns a ``/proc/PID/status`` value in kB (VmRSS...)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def read_log(path: str | os.PathLike[str], offset: int = 0) -> str:
    """Returns the daemon's log from byte ``offset`` on."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""


def log_size(path: str | os.PathLike[str]) -> int:
    try:
        return os.path.getsize(path)
    except FileNotFoundError:
        return 0


def record_lines(text: str) -> list[str]:
    """The log's records (lines starting with ``xsockd[``), not continuation lines."""
    return [ln for ln in text.split("\n") if ln.startswith("xsockd[")]


def warning_lines(text: str) -> list[str]:
    return [ln for ln in record_lines(text) if " WARNING " in ln or " ERROR " in ln]


@dataclass(frozen=True)
class ChannelTable:
    """What a daemon's SIGUSR1 dump says: its channel count and each row's peer."""

    count: int
    peers: list[int]
    text: str
    # From its "tables:" line: channels + being admitted, and streams in the C tables.
    python_streams: int = -1
    core_streams: int = -1


def channel_table(pid: int, log_path: str | os.PathLike[str],
                  timeout: float = 10.0) -> ChannelTable:
    """Asks the daemon for its channel table (``kill -USR1``) and parses it from the log.

    Asks twice, the second time once the first dump began, and parses the first dump: the
    second's header proves the first one is completely written.  (Two signals sent at once
    would merge into one.)
    """
    start = log_size(log_path)
    deadline = time.monotonic() + timeout
    for want in (1, 2):
        os.kill(pid, signal.SIGUSR1)
        while True:
            text = read_log(log_path, start)
            heads = [i for i, ln in enumerate(text.split("\n")) if "channel table (" in ln]
            if len(heads) >= want:
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"no channel table from pid {pid} in {timeout:g} s:\n"
                                     f"{text[-2000:]}")
            time.sleep(0.02)
    lines = text.split("\n")
    head = lines[heads[0]]
    count = int(head.split("channel table (", 1)[1].split()[0])
    peers = []
    for ln in lines[heads[0] + 1:]:
        if ln.startswith("xsockd["):
            break
        words = ln.split()
        if len(words) >= 2 and words[0].isdigit() and words[1].isdigit():
            peers.append(int(words[1]))
    python_streams = core_streams = -1
    for ln in lines[heads[0] + 1:heads[1]]:
        if ln.startswith("tables: "):
            words = ln.split()
            python_streams = int(words[1]) + int(words[3])
            core_streams = int(words[6])
    return ChannelTable(count, peers, "\n".join(lines[heads[0]:heads[1]]), python_streams,
                        core_streams)


class Arena:
    """A SimWorld set up for attacks: domain 1's daemon is the victim (peers 2 and 3, its
    default service ``count`` a CountingService that echoes), domain 3's daemon is a bystander
    (peer 1, an echo service), domain 2 runs no daemon: it is the hostile domain.
    """

    VICTIM, HOSTILE, THIRD = 1, 2, 3
    SERVICE = "count"

    def __init__(self, work: Path, max_streams: int | None = None,
                 ring_size: str = "256KiB") -> None:
        self.work = work
        self.world = SimWorld(work, peers={1: [2, 3], 3: [1]}, echo_on=(3,),
                              ring_size=ring_size)
        self.service = CountingService(work / "count.sock", echo=True)
        text = config_text(rundir=self.world.rundir(1), sim_dir=self.world.sim_dir, peers=[2, 3],
                           services={self.SERVICE: work / "count.sock"}, default=self.SERVICE,
                           ring_size=ring_size)
        if max_streams is not None:  # config_text has no knob for it: one line in [link]
            text = text.replace("[link]\n", f"[link]\nmax_streams = {max_streams}\n", 1)
        self.world.daemons[1].config.write_text(text)
        self.restarts = 0
        try:
            self.world.start(1, 3)
        except BaseException:
            self.service.close()
            self.world.close()
            raise
        # The echo service prints a line per connection into a pipe nobody else reads: drain
        # it, or a long run fills the pipe and freezes the echo (and the bystander with it).
        echo = self.world.echo
        assert echo is not None and echo.proc.stdout is not None
        out = echo.proc.stdout
        self._drain = threading.Thread(target=lambda: [None for _ in out], daemon=True)
        self._drain.start()

    @property
    def daemon(self) -> DaemonProcess:
        return self.world.daemons[self.VICTIM]

    @property
    def pid(self) -> int:
        assert self.daemon.proc is not None
        return self.daemon.proc.pid

    @property
    def log_path(self) -> Path:
        return self.daemon.log_path

    def alive(self) -> bool:
        return self.daemon.proc is not None and self.daemon.proc.poll() is None

    def restart_if_dead(self) -> bool:
        """Restarts a crashed victim (so that later examples test something); True if it had
        to."""
        if self.alive():
            return False
        self.daemon.stop()
        self.daemon.start()
        self.restarts += 1
        return True

    def offer_nodes(self) -> list[str]:
        return self.world.xs_tree(f"/local/domain/{self.VICTIM}/{XS_ROOT}/link/{self.HOSTILE}")

    def wait_link_gone(self, timeout: float = 15.0) -> bool:
        """Waits until the victim dropped its link to the hostile domain (its offer is gone)
        or died.  Returns False on timeout."""
        deadline = time.monotonic() + timeout
        while self.offer_nodes() and self.alive():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def attack_link(self, timeout: float = 10.0) -> tuple[HostileDomain, socket.socket]:
        """Returns a hostile domain attached to a fresh link of the victim's, and the
        application socket whose connection made the victim offer it."""
        assert self.wait_link_gone(), "the victim still holds an old link to the hostile domain"
        h = HostileDomain(self.world.sim_dir, self.HOSTILE, self.VICTIM)
        try:
            app = h.establish(lambda: self.world.connect(self.VICTIM, self.HOSTILE, 10),
                              timeout)
        except BaseException:
            h.close()
            raise
        return h, app

    def bystander(self) -> Bystander:
        return Bystander(self.world.connect(self.VICTIM, self.THIRD, timeout=60))

    def close(self) -> None:
        echo = self.world.echo
        if echo is not None:
            echo.proc.kill()
            echo.proc.wait()
            self._drain.join(5)
        self.world.close()
        self.service.close()
