"""Builds the Cython extensions in gw_ext/: one module per concern, each a .pyx with its .pxd.

GW_SANITIZE=address,fuzzer-no-link (with CC=clang) makes the fuzzing build
(fuzz/, `./dev fuzz`): sanitizer and coverage instrumentation, -O1 with debug
information so reports point at source lines. It is built into its own
directory, never over the in-place build.
"""
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


SANITIZE = os.environ.get("GW_SANITIZE", "")


def compile_args():
    if SANITIZE:
        return ["-O1", "-g", "-fno-omit-frame-pointer", f"-fsanitize={SANITIZE}",
                "-Wno-unused-function", "-Wno-unreachable-code"]
    return ["-O3", "-Wno-unused-function", "-Wno-unreachable-code"]


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
                extra_compile_args=compile_args(),
                extra_link_args=[f"-fsanitize={SANITIZE}"] if SANITIZE else [],
            )
        )
    return cythonize(
        exts,
        compiler_directives=DIRECTIVES,
        annotate=bool(os.environ.get("GW_ANNOTATE")),
        nthreads=os.cpu_count() or 1,
    )


setup(ext_modules=extensions())
