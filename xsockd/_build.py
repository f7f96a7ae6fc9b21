"""cffi builder for the C ring core: produces the private module ``xsockd._ring_core``.

Only ``xsockd/ring.py`` imports the result.  Paths are relative, as cffi requires.
"""

from pathlib import Path

from cffi import FFI

_HERE = Path(__file__).parent
_HEADER = (_HERE / "ring_core.h").read_text()

# The cdef is the public part of ring_core.h: everything between the two markers.
_CDEF = _HEADER.split("/* CDEF BEGIN */")[1].split("/* CDEF END */")[0]

ffibuilder = FFI()
ffibuilder.cdef(_CDEF)
ffibuilder.set_source(
    "xsockd._ring_core",
    '#include "ring_core.h"',
    sources=["xsockd/ring_core.c"],
    include_dirs=["xsockd"],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
    libraries=["pthread"],
    py_limited_api=True,
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
