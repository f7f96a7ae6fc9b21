"""cffi builder for the C core: produces the private module ``xsockd._ring_core``.

The module holds xsockd's own ring core (ring_core.c) and the libxenvchan endpoint and its
pump (vchan_core.c, vchan_pump.c); ``xsockd/ring.py`` and ``xsockd/vchan.py`` are its only
importers.  Paths are relative, as cffi requires.
``make_builder`` also serves tests/test_ring_sanitizers.py, which builds the same source under
another module name with sanitizers, into a directory of its own.
"""

from __future__ import annotations

from pathlib import Path

from cffi import FFI

_HERE = Path(__file__).parent
_PARTS = ("ring_core", "vchan_core", "vchan_pump")  # each a .c with its .h


def _cdef(header: str) -> str:
    """Returns the public part of a header: everything between its two CDEF markers."""
    return header.split("/* CDEF BEGIN */")[1].split("/* CDEF END */")[0]


_CDEF = "".join(_cdef((_HERE / f"{part}.h").read_text()) for part in _PARTS)

CFLAGS = ["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter"]


def make_builder(module: str = "xsockd._ring_core", *, source_dir: str = "xsockd",
                 extra_cflags: tuple[str, ...] = (), extra_ldflags: tuple[str, ...] = (),
                 extra_cdef: str = "", macros: tuple[tuple[str, str], ...] = ()) -> FFI:
    """Returns an FFI builder of the C core as ``module``; source_dir holds its .c/.h files."""
    builder = FFI()
    builder.cdef(_CDEF + extra_cdef)
    builder.set_source(
        module,
        "".join(f'#include "{part}.h"\n' for part in _PARTS),
        sources=[f"{source_dir}/{part}.c" for part in _PARTS],
        include_dirs=[source_dir],
        define_macros=list(macros),
        extra_compile_args=CFLAGS + list(extra_cflags),
        extra_link_args=list(extra_ldflags),
        libraries=["pthread"],
        py_limited_api=True,
    )
    return builder


ffibuilder = make_builder()

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
