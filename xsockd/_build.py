"""cffi builder for the C ring core: produces the private module ``xsockd._ring_core``.

Only ``xsockd/ring.py`` imports the result.  Paths are relative, as cffi requires.
``make_builder`` also serves tests/test_ring_sanitizers.py, which builds the same source under
another module name with sanitizers, into a directory of its own.
"""

from __future__ import annotations

from pathlib import Path

from cffi import FFI

_HERE = Path(__file__).parent
_HEADER = (_HERE / "ring_core.h").read_text()

# The cdef is the public part of ring_core.h: everything between the two markers.
_CDEF = _HEADER.split("/* CDEF BEGIN */")[1].split("/* CDEF END */")[0]

CFLAGS = ["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter"]


def make_builder(module: str = "xsockd._ring_core", *, source_dir: str = "xsockd",
                 extra_cflags: tuple[str, ...] = (), extra_ldflags: tuple[str, ...] = (),
                 extra_cdef: str = "", macros: tuple[tuple[str, str], ...] = ()) -> FFI:
    """Returns an FFI builder of the ring core as ``module``; source_dir holds ring_core.c/.h."""
    builder = FFI()
    builder.cdef(_CDEF + extra_cdef)
    builder.set_source(
        module,
        '#include "ring_core.h"',
        sources=[f"{source_dir}/ring_core.c"],
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
