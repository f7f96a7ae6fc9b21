"""What a reload changes: the old and the new configuration compared, one phrase per change.

Pure: the manager applies the change and logs these phrases, so that an operator who added
three services reads that three services were added, not "no change to peers".
"""

from __future__ import annotations

from xsockd.config import Config, ServiceConfig

__all__ = ["describe_changes"]

# [link] keys, and whom a new value reaches: the budgets apply to links already up, the
# others are fixed for a link's life and reach only links made from now on.
_LINK_KEYS = {"open_rate": "every peer now", "max_connecting": "every peer now",
              "ring_size": "new links", "stream_window": "new links",
              "max_streams": "new links", "grant_pages": "new links"}


def _domains(doms: tuple[int, ...]) -> str:
    return ", ".join(map(str, doms)) or "none"


def _service_change(old: ServiceConfig, new: ServiceConfig) -> list[str]:
    what = []
    if old.socket != new.socket:
        what.append(f"socket {new.socket}")
    if old.allow != new.allow:
        what.append(f"allow {_domains(new.allow)}")
    if old.caller_header != new.caller_header:
        what.append(f"caller_header {str(new.caller_header).lower()}")
    return what


def describe_changes(old: Config, new: Config) -> list[str]:
    """Returns what differs from ``old`` to ``new``: peers, our services, the peers' services
    we reach (each a socket in rundir), and settings; [] for no change."""
    out: list[str] = []
    old_peers, new_peers = set(old.daemon.peers), set(new.daemon.peers)
    out += [f"peer {p} added" for p in sorted(new_peers - old_peers)]
    out += [f"peer {p} removed" for p in sorted(old_peers - new_peers)]
    for name in sorted(new.services.keys() - old.services.keys()):
        out.append(f"our service {name} added (allow {_domains(new.services[name].allow)})")
    out += [f"our service {n} removed" for n in sorted(old.services.keys() - new.services.keys())]
    for name in sorted(old.services.keys() & new.services.keys()):
        if what := _service_change(old.services[name], new.services[name]):
            out.append(f"our service {name} changed: {', '.join(what)}")
    if old.daemon.default_service != new.daemon.default_service:
        out.append(f"default_service {new.daemon.default_service or 'none'}")
    old_named = {(r.domid, s) for r in old.remotes.values() for s in r.services}
    new_named = {(r.domid, s) for r in new.remotes.values() for s in r.services}
    out += [f"service {s} of domain {d} added" for d, s in sorted(new_named - old_named)]
    out += [f"service {s} of domain {d} removed" for d, s in sorted(old_named - new_named)]
    old_eager, new_eager = old.eager_peers(), new.eager_peers()
    out += [f"link with domain {d} eager" for d in sorted(new_eager - old_eager)]
    out += [f"link with domain {d} no longer eager" for d in sorted(old_eager - new_eager)]
    for key, reach in _LINK_KEYS.items():
        before, after = getattr(old.link, key), getattr(new.link, key)
        if before != after:
            out.append(f"[link] {key} {before} -> {after} (for {reach})")
    if old.daemon.stop_timeout != new.daemon.stop_timeout:
        out.append(f"stop_timeout {new.daemon.stop_timeout:g} s")
    return out
