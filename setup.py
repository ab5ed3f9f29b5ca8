"""Builds the Cython extensions: the server's in gw_ext/ and the load
generator's engines in gwbench/_ext/; one module per concern, each a .pyx (with
its .pxd where others cimport it). The load generator's engines cimport the
server's codec and I/O declarations (gw_ext/*.pxd), so both build together.

GW_SANITIZE=address,fuzzer-no-link (with CC=clang) makes the fuzzing build
(fuzz/, `./dev fuzz`): sanitizer and coverage instrumentation, -O1 with debug
information so reports point at source lines. It is built into its own
directory, never over the in-place build.
"""
import os
from pathlib import Path

from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).parent
# Folders of .pyx sources, each a package.
SOURCE_DIRS = ("gw_ext", "gwbench/_ext")
# C files compiled into an extension with its .pyx (their .h beside them).
C_SOURCES = {
    "gw_ext.wal": ["gw_ext/crc32c.c", "gw_ext/wal_records.c", "gw_ext/wal_flusher.c"],
    "gw_ext.dedup": ["gw_ext/dedup_table.c"],
    "gw_ext.filewriter": ["gw_ext/filewriter_thread.c"],
    "gwbench._ext.tls_clients": ["gwbench/_ext/legacy_ec_keys.c", "gwbench/_ext/epoll_wait_ns.c"],
}
# Our own C files get more warnings than Cython's output (which warns about
# itself); tests/test_c_sources.py compiles them with -Werror.
OWN_C_WARNINGS = ["-Wall", "-Wextra"]
# Every extension is rebuilt when a header changes (a .pxd may include one).
HEADERS = sorted(str(h.relative_to(HERE)) for d in SOURCE_DIRS for h in (HERE / d).glob("*.h"))
# Modules that call OpenSSL directly (the TLS layer and whatever drives it).
OPENSSL = {"gw_ext.tls", "gw_ext.loop", "gwbench._ext.pubsub_engine", "gwbench._ext.tls_clients"}

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
    # GW_ONLY=codec,loop limits an in-place development build to some modules
    # (by file stem, or by full module name such as gwbench._ext.tls_clients).
    only = set(filter(None, os.environ.get("GW_ONLY", "").split(",")))
    exts = []
    for folder in SOURCE_DIRS:
        for pyx in sorted((HERE / folder).glob("*.pyx")):
            name = f"{folder.replace('/', '.')}.{pyx.stem}"
            if only and pyx.stem not in only and name not in only:
                continue
            exts.append(
                Extension(
                    name,
                    [f"{folder}/{pyx.name}", *C_SOURCES.get(name, ())],
                    include_dirs=[folder, "gw_ext"],
                    depends=HEADERS,
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


class BuildExt(build_ext):
    """Adds OWN_C_WARNINGS to the compilation of the files in C_SOURCES only."""

    def build_extensions(self):
        own = {str((HERE / c).resolve()) for files in C_SOURCES.values() for c in files}
        compile_one = self.compiler._compile

        def compile_with_warnings(obj, src, ext, cc_args, extra_postargs, pp_opts):
            if str(Path(src).resolve()) in own:
                extra_postargs = [*extra_postargs, *OWN_C_WARNINGS]
            compile_one(obj, src, ext, cc_args, extra_postargs, pp_opts)

        self.compiler._compile = compile_with_warnings
        super().build_extensions()


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExt})
