"""Builds the Cython extensions in gw_ext/: one module per concern, each a .pyx with its .pxd."""
import os
from pathlib import Path

from Cython.Build import cythonize
from setuptools import Extension, setup

HERE = Path(__file__).parent
# Modules that call OpenSSL directly (the TLS layer and whatever drives it).
OPENSSL = {"tls", "loop", "benchclient", "benchtls"}

DIRECTIVES = {
    "language_level": 3,
    "boundscheck": False,
    "wraparound": False,
    "cdivision": True,
    "initializedcheck": False,
    "embedsignature": True,
}


def extensions():
    # GW_ONLY=codec,loop limits an in-place development build to some modules.
    only = set(filter(None, os.environ.get("GW_ONLY", "").split(",")))
    exts = []
    for pyx in sorted((HERE / "gw_ext").glob("*.pyx")):
        name = pyx.stem
        if only and name not in only:
            continue
        exts.append(
            Extension(
                f"gw_ext.{name}",
                [f"gw_ext/{pyx.name}"],
                libraries=["ssl", "crypto"] if name in OPENSSL else [],
                extra_compile_args=["-O3", "-Wno-unused-function", "-Wno-unreachable-code"],
            )
        )
    return cythonize(
        exts,
        compiler_directives=DIRECTIVES,
        annotate=bool(os.environ.get("GW_ANNOTATE")),
        nthreads=os.cpu_count() or 1,
    )


setup(ext_modules=extensions())
