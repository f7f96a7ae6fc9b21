"""What an operator should do about a stream or link that failed: the text of our log lines.

An application sees only the end of its stream (a plain socket carries no reason), so the
daemon's log line is the one place that can say why and what to change.  These are pure
functions of what we know; the manager logs what they return.  Text the peer wrote must be
escaped by the caller before it comes here.
"""

from __future__ import annotations

from xsockd.ring import Reason

__all__ = ["link_refused", "no_such_domain", "stream_refused"]


def _service(name: str) -> str:
    return f"service {name!r}" if name else "its default service"


def no_such_domain(peer: int) -> str:
    return (f"domain {peer} does not exist (xenstored does not know it): start that domain, "
            f"or remove {peer} from [daemon] peers")


def stream_refused(peer: int, me: int, name: str, reason: Reason) -> str:
    """Why domain ``peer`` ended our stream to ``name`` before it opened, and what to do.

    The wire carries only the reason code; the peer's log has the exact cause.
    """
    what = _service(name)
    if reason == Reason.REFUSED:
        table = f"[services.{name}]" if name else "[daemon] default_service"
        return (f"domain {peer} refused {what}: it has no {table}, does not list {me} in that "
                f"service's allow, or is stopping (its log says which)")
    if reason == Reason.NO_SERVICE:
        svc = f"service {name!r}" if name else "default service"  # not "its its"
        return (f"domain {peer} could not reach its {svc}: nothing listens on the service's "
                "socket there; start the service")
    if reason == Reason.TOO_MANY:
        return (f"domain {peer} is busy: too many streams on the link or opens at once "
                "([link] max_streams, open_rate, max_connecting there); try again")
    return f"domain {peer} ended the stream to {what} ({reason.name.lower()})"


# The words an acceptor answers a refused link offer with (docs/PROTOCOL.md), and what to do.
_LINK_ANSWERS = {
    "not-allowed": "it does not list domain {me} in [daemon] peers: add {me} there",
    "busy": "it takes at most 5 link offers in 5 s from one domain; the next stream retries",
    "stopping": "its xsockd is stopping",
    "malformed-offer": "it could not read our offer (its log says why)",
}


def link_refused(peer: int, me: int, answer: str) -> str:
    """Returns why domain ``peer`` refused our link offer, from its (escaped) ``answer``."""
    word = answer.split(" ")[0]
    if word in _LINK_ANSWERS:
        hint = _LINK_ANSWERS[word].format(me=me)
    elif word == "version":
        hint = f"it speaks another link protocol ({answer}): run the same xsockd version on both"
    elif word.startswith("attach-failed"):
        hint = "it could not map our pages or bind our event channel (its log says why)"
    else:
        hint = "its log says why"
    return f"domain {peer} refused our link ({answer}): {hint}"
