"""Admission: pure decisions on what a peer may have (links, streams, services, rates).

Nothing here does I/O or keeps a table of links; the manager asks, passing what it knows, and
acts on the answer.  Clocks are passed in, so that every decision is testable without time
passing.
"""

from __future__ import annotations

from dataclasses import dataclass

from xsockd.config import Config, ServiceConfig
from xsockd.ring import MIN_RING_SIZE, Reason, link_pages
from xsockd.words import count

__all__ = ["GrantPlan", "OpenBudget", "RateBucket", "Refusal", "admit_link", "admit_stream",
           "caller_header", "grant_budget", "grant_plan", "reachable_services"]


def caller_header(domid: int, service: str) -> bytes:
    """Returns the line a service with ``caller_header`` receives before the caller's bytes
    (docs/PROTOCOL.md "Services and the caller header")."""
    return f"XSOCK/1 domid={domid} service={service or '-'}\n".encode()


@dataclass(frozen=True)
class Refusal:
    """Why something was refused: ``reason`` goes on the wire (RESET), ``why`` to the log."""

    reason: Reason
    why: str


class RateBucket:
    """A token bucket: ``rate`` tokens a second, holding at most ``burst``."""

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._at = now

    def retune(self, rate: float, burst: float, now: float) -> None:
        """Switches to ``rate`` and ``burst`` (a reload), keeping the tokens earned so far."""
        self._tokens = min(float(burst), self._tokens + max(0.0, now - self._at) * self.rate)
        self._at, self.rate, self.burst = now, rate, burst

    def _refill(self, now: float) -> None:
        self._tokens = min(self.burst, self._tokens + max(0.0, now - self._at) * self.rate)
        self._at = now

    def take(self, now: float) -> bool:
        """Returns True (and takes a token) if one is there at ``now``."""
        self._refill(now)
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True

    def charge(self, now: float) -> None:
        """Takes a token even if none is there (down to ``-burst``): something admitted
        elsewhere, counted against the same rate."""
        self._refill(now)
        self._tokens = max(-float(self.burst), self._tokens - 1.0)


class OpenBudget:
    """What one peer may ask of us per unit of time: opens per second, connects at once.

    A bucket of ``rate`` opens per second holding one second's worth, and a cap on local
    connects in progress (a service whose backlog is full makes them wait).  Past either, a
    peer's OPEN is answered RESET 3 (too many) at once, costing us no connect.
    """

    def __init__(self, rate: int, max_connecting: int, now: float) -> None:
        self.rate = rate
        self.max_connecting = max_connecting
        self._bucket = RateBucket(rate, rate, now)
        self.connecting = 0

    def retune(self, rate: int, max_connecting: int, now: float) -> None:
        """Applies a reloaded ``open_rate`` and ``max_connecting``; connects in progress stay."""
        self.rate, self.max_connecting = rate, max_connecting
        self._bucket.retune(rate, rate, now)

    def take(self, now: float) -> Refusal | None:
        """Returns None if one more open may start now (and counts it), else the refusal."""
        if self.connecting >= self.max_connecting:
            return Refusal(Reason.TOO_MANY, f"{count(self.connecting, 'connect')} to local "
                                            "services already in progress")
        if not self._bucket.take(now):
            return Refusal(Reason.TOO_MANY, f"more than {self.rate} stream opens a second")
        return None

    def charge(self, now: float) -> None:
        """Counts an open the C core admitted by itself (its own budget allowed it)."""
        self._bucket.charge(now)


def admit_link(config: Config, domid: int, peer: int, stopping: bool) -> Refusal | None:
    """Returns None if ``peer`` may have a link with us, else why not."""
    if stopping:
        return Refusal(Reason.REFUSED, "we are stopping")
    if peer == domid or peer not in config.daemon.peers:
        return Refusal(Reason.REFUSED, "not in [daemon] peers")
    return None


def admit_stream(config: Config, peer: int, name: str, stopping: bool
                 ) -> ServiceConfig | Refusal:
    """Returns the service ``peer``'s new stream asking for ``name`` goes to, or the refusal."""
    if stopping:
        return Refusal(Reason.REFUSED, "we are stopping")
    if peer not in config.daemon.peers:
        return Refusal(Reason.REFUSED, "no longer in [daemon] peers")
    service = config.service_for(peer, name or None)
    if service is None:
        if not (name or config.daemon.default_service):
            return Refusal(Reason.REFUSED, "we have no default service: set [daemon] "
                                           "default_service")
        if (name or config.daemon.default_service) not in config.services:
            return Refusal(Reason.REFUSED, f"no service {name or config.daemon.default_service!r}"
                                           f": add [services.{name or 'NAME'}] to this "
                                           "domain's configuration")
        return Refusal(Reason.REFUSED, f"not in that service's allow list: add {peer} to its "
                                       "allow")
    return service


def reachable_services(config: Config, peer: int, stopping: bool
                       ) -> dict[str, ServiceConfig]:
    """Returns every name ``peer``'s stream may ask for that ``admit_stream`` lets through
    ("" for the default service) and where it goes: the C core's admission table."""
    names = ["", *sorted(config.services)]
    verdicts = {name: admit_stream(config, peer, name, stopping) for name in names}
    return {name: v for name, v in verdicts.items() if isinstance(v, ServiceConfig)}


@dataclass(frozen=True)
class GrantPlan:
    """How the grant budget is divided: every configured peer gets an equal share of pages,
    and a link we initiate gets the largest ring (up to [link] ring_size) its share holds.

    Equal shares guarantee that a link we initiate to every configured peer fits at once,
    whichever peers ask first; a link a peer initiates costs us no grant (the peer grants).
    """

    grant_pages: int    # for links: [link] grant_pages less the vchan servers' pages
    peers: int
    share: int          # pages per configured peer
    ring_size: int      # bytes per direction of each link we initiate
    link_pages: int     # pages each link we initiate grants
    shrunk: bool = False  # ring_size is below [link] ring_size
    vchan_pages: int = 0  # held by [vchan.NAME] servers, off the top

    @property
    def links(self) -> int:
        """Links of ``ring_size`` that fit in the budget at once."""
        return self.grant_pages // self.link_pages

    def describe(self) -> str:
        reduced = " (reduced from [link] ring_size to fit)" if self.shrunk else ""
        vchans = (f" ({self.vchan_pages} more for vchan servers)" if self.vchan_pages else "")
        return (f"grant budget {self.grant_pages} pages{vchans} for {count(self.peers, 'peer')}: "
                f"{self.share} pages each, links we initiate get {self.ring_size // 1024} KiB "
                f"rings{reduced}, {self.link_pages} pages a link, "
                f"{self.links} such links fit in the whole budget")


def grant_plan(config: Config) -> GrantPlan:
    """Returns how ``config``'s grant budget is divided among its peers."""
    peers = max(1, len(config.daemon.peers))
    vchans = config.vchan_pages()
    budget = config.link.grant_pages - vchans
    share = budget // peers
    ring = config.link.ring_size
    while ring > MIN_RING_SIZE and link_pages(ring) > share:
        ring //= 2
    return GrantPlan(budget, peers, share, ring, link_pages(ring),
                     shrunk=ring != config.link.ring_size, vchan_pages=vchans)


def grant_budget(config: Config, granted: int) -> str | None:
    """Returns None if one more link we initiate fits the grant budget, else what to change."""
    plan = grant_plan(config)
    if granted + plan.link_pages > plan.grant_pages:
        if plan.link_pages > plan.share:
            fix = (f"{plan.peers} peers leave {plan.share} pages each, less than the smallest "
                   f"link ({plan.link_pages}): raise [link] grant_pages (and the kernel's "
                   "gntalloc limit) or list fewer [daemon] peers")
        else:
            fix = ("links made before a reload that added peers keep their larger rings until "
                   "they are re-established; raise [link] grant_pages or lower ring_size")
        return (f"grant budget exhausted: {granted} of {plan.grant_pages} pages in use, "
                f"a link needs {plan.link_pages}; {fix}")
    return None
