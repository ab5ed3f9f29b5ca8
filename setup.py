"""Builds the Cython extensions: the server's in gw_ext/ and the load
generator's engines in gwbench/_ext/; one module per concern, each a .pyx (with
its .pxd where others cimport it). The load generator's engines cimport the
server's codec and I/O declarations (gw_ext/*.pxd), so both build together.

GW_SANITIZE selects an instrumented build, always into a directory of its own
(never over the in-place build):
- address,undefined: the sanitizer build (`./dev sanitize`): AddressSanitizer
  and UndefinedBehaviorSanitizer, every UB report fatal; the generated C goes
  to GW_BUILD_DIR.
- address,fuzzer-no-link (with CC=clang): the fuzzing build (fuzz/, `./dev fuzz`).
Both compile with frame pointers, debug information and -O1, so reports name
the source lines.
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
    "gw_ext.loop": ["gw_ext/tls_records.c"],
    "gwbench._ext.tls_clients": ["gwbench/_ext/legacy_ec_keys.c", "gwbench/_ext/epoll_wait_ns.c"],
}
# Our own C files get more warnings than Cython's output (which warns about
# itself); tests/test_c_sources.py compiles them with -Werror.
OWN_C_WARNINGS = ["-Wall", "-Wextra"]
# Every extension is rebuilt when a header changes (a .pxd may include one).
HEADERS = sorted(str(h.relative_to(HERE)) for d in SOURCE_DIRS for h in (HERE / d).glob("*.h"))
# Modules that call OpenSSL directly (the TLS layer and whatever drives it).
OPENSSL = {"gw_ext.tls", "gw_ext.loop", "gw_ext.wsframe", "gwbench._ext.pubsub_engine", "gwbench._ext.tls_clients"}
# Modules that call SQLite directly (the same libsqlite3 as Python's sqlite3 module).
SQLITE = {"gw_ext.sqlitebulk"}
SANITIZERS = {"address", "undefined", "fuzzer-no-link"}


def sanitizer_flags() -> tuple[list[str], list[str]]:
    """(compile args, link args) for GW_SANITIZE; ([], []) when unset."""
    wanted = [s for s in os.environ.get("GW_SANITIZE", "").replace(" ", "").split(",") if s]
    unknown = set(wanted) - SANITIZERS
    if unknown:
        raise SystemExit(f"GW_SANITIZE: unknown sanitizer(s) {', '.join(sorted(unknown))} "
                         f"(known: {', '.join(sorted(SANITIZERS))})")
    if not wanted:
        return [], []
    flag = "-fsanitize=" + ",".join(wanted)
    compile_args = [flag, "-fno-omit-frame-pointer", "-g", "-O1"]
    if "undefined" in wanted:
        compile_args.append("-fno-sanitize-recover=undefined")
    return compile_args, [flag]


DIRECTIVES = {
    "language_level": 3,
    "boundscheck": False,
    "wraparound": False,
    "cdivision": True,
    "initializedcheck": False,
    "embedsignature": True,
}


def extensions():
    # GW_ONLY=codec,loop limits an in-place development build to some modules
    # (by file stem, or by full module name such as gwbench._ext.tls_clients).
    only = set(filter(None, os.environ.get("GW_ONLY", "").split(",")))
    sanitize_compile, sanitize_link = sanitizer_flags()
    # -O1 after -O3: the last -O wins, so an instrumented build is not optimised past its reports.
    compile_args = ["-O3", "-Wno-unused-function", "-Wno-unreachable-code"] + sanitize_compile
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
                    libraries=(["ssl", "crypto"] if name in OPENSSL else []) + (["sqlite3"] if name in SQLITE else []),
                    extra_compile_args=compile_args,
                    extra_link_args=sanitize_link,
                )
            )
    return cythonize(
        exts,
        compiler_directives=DIRECTIVES,
        annotate=bool(os.environ.get("GW_ANNOTATE")),
        nthreads=os.cpu_count() or 1,
        build_dir=os.environ.get("GW_BUILD_DIR") or None,
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
