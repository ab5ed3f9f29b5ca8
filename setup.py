"""Builds the Cython extensions in gw_ext/: one module per concern, each a .pyx with its .pxd."""
import os
from pathlib import Path

from Cython.Build import cythonize
from setuptools import Extension, setup

HERE = Path(__file__).parent
# Modules that call OpenSSL directly (the TLS layer and whatever drives it).
OPENSSL = {"tls", "loop", "benchclient", "benchtls"}

# GW_SANITIZE=address,undefined: the sanitizer build (`./dev sanitize`), compiled
# for AddressSanitizer and UndefinedBehaviorSanitizer (every UB report fatal),
# with frame pointers and debug info so reports name the lines. Its generated C
# goes to GW_BUILD_DIR (not next to the .pyx), so it never touches the normal build.
SANITIZERS = {"address", "undefined"}


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
    # GW_ONLY=codec,loop limits an in-place development build to some modules.
    only = set(filter(None, os.environ.get("GW_ONLY", "").split(",")))
    sanitize_compile, sanitize_link = sanitizer_flags()
    # -O1 after -O3: the last -O wins, so a sanitizer build is not optimised past its reports.
    compile_args = ["-O3", "-Wno-unused-function", "-Wno-unreachable-code"] + sanitize_compile
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


setup(ext_modules=extensions())
