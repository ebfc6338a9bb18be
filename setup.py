# The metadata lives in pyproject.toml; this stub only adds the cffi extension.
import sys

from setuptools import setup

if sys.platform.startswith("linux"):
    # Builds proactor._uring_cffi, linked against liburing.
    setup(cffi_modules=["_build/build_uring.py:ffibuilder"])
else:
    # No io_uring here: install the pure-Python fallback only.
    setup()
