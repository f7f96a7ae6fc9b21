"""Text for people: numbers in messages as a person writes them ("1 peer", "3 peers",
"256KiB"), and docstrings shown by --help without their reST markup."""

from __future__ import annotations

__all__ = ["count", "plain", "size_text"]

KiB = 1024
MiB = 1 << 20
_UNIT_BYTES = {"K": KiB, "KiB": KiB, "M": MiB, "MiB": MiB}


def count(n: int, noun: str, plural: str | None = None) -> str:
    """Returns "1 peer" or "2 peers" (``plural`` for nouns that take more than an s)."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def size_text(n: int, unit: str | None = None) -> str:
    """Returns ``n`` bytes in ``unit`` (K, KiB, M, MiB) when it is a whole number of them.

    Without a unit, or when ``n`` is not a whole number of that unit, the largest of MiB and
    KiB that divides ``n``, else plain bytes: 262144 -> "256KiB".
    """
    if unit in _UNIT_BYTES and n % _UNIT_BYTES[unit] == 0:
        return f"{n // _UNIT_BYTES[unit]}{unit}"
    if n and n % MiB == 0:
        return f"{n // MiB}MiB"
    if n and n % KiB == 0:
        return f"{n // KiB}KiB"
    return str(n)


def plain(doc: str | None) -> str:
    """Returns a docstring as --help shows it: without the double backquotes that mark
    literals in reST (docstrings and man/*.rst use them; a terminal shows them as noise)."""
    return (doc or "").replace("``", "")
