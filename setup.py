# cffi_modules cannot be declared in pyproject.toml; this one line builds xsockd/_ring_core.
from setuptools import setup

setup(cffi_modules=["xsockd/_build.py:ffibuilder"])
