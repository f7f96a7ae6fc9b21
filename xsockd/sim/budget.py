"""The simulated host's descriptor budget: how many event-channel ports each domain may hold.

Every port costs the host two eventfds, every grant request one memfd, every connection one
socket; all of them come out of one RLIMIT_NOFILE.  Each domain gets an equal share sized for
the most domains the host may run, so that no domain can exhaust the host's descriptors for
the others (Xen bounds the ports of each domain instead: xl.cfg's max_event_channels).
"""

from __future__ import annotations

import resource

__all__ = ["XEN_MAX_EVENT_CHANNELS", "event_channel_budget", "raise_nofile"]

XEN_MAX_EVENT_CHANNELS = 1023   # xl.cfg max_event_channels' default
FDS_PER_PORT = 2                # the port's eventfd and its peer's
# The host's own: stdio, selector, listeners' slack, the control socket and its clients, the
# up to 253 descriptors a hostile request may carry in before they are closed, and spare.
HOST_RESERVE = 512


def raise_nofile() -> int:
    """Raises the soft RLIMIT_NOFILE to the hard limit; returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft == resource.RLIM_INFINITY or soft >= hard:
        return hard if soft == resource.RLIM_INFINITY else soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        return soft
    return hard


def event_channel_budget(nofile: int, domains: int, per_domain_fixed: int,
                         reserved: int = 0) -> int:
    """Returns the ports per domain that ``nofile`` descriptors cover for ``domains`` domains,
    each of which also holds up to ``per_domain_fixed`` descriptors of other kinds, once
    ``reserved`` (dom0's) are set aside; at most Xen's default, and below 1 when the limit is
    too low to run that many domains."""
    share = (nofile - HOST_RESERVE - reserved) // max(domains, 1) - per_domain_fixed
    return min(XEN_MAX_EVENT_CHANNELS, share // FDS_PER_PORT)
