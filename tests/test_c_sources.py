"""Our own C files (the .c and .h beside the .pyx in gw_ext/ and gwbench/_ext/;
not Cython's output) on their own, with the system's compilers:

* each compiles without a single warning under -Wall -Wextra -Werror, with gcc
  and with clang (the build itself uses -Wall -Wextra without -Werror, so a
  newer compiler's new warning never breaks an install: it fails here);
* each is compiled into its extension by setup.py, tracked by git and shipped
  with the package;
* the harnesses in tests/c/ exercise them under AddressSanitizer with
  UndefinedBehaviorSanitizer, and the threaded ones (the log's flusher, the
  idempotency table raced by threads as workers race on it, the file writer)
  under ThreadSanitizer.

clang is optional (`./dev fuzz` installs it): its cases are skipped without it.
"""

from __future__ import annotations

import ast
import fnmatch
import os
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HARNESS_DIR = ROOT / "tests" / "c"
# Folders of extensions -> their package (pyproject's package-data keys).
PACKAGE_DIRS = {"gw_ext": "gw_ext", "gwbench/_ext": "gwbench._ext"}
INCLUDES = [f"-I{ROOT / d}" for d in PACKAGE_DIRS]

# Harness (tests/c/test_NAME.c) -> the C files it links, whether it runs threads.
HARNESSES = {
    "crc32c": (["gw_ext/crc32c.c", "gw_ext/wal_records.c"], False),
    "dedup_table": (["gw_ext/dedup_table.c"], True),
    "wal_flusher": (["gw_ext/wal_flusher.c", "gw_ext/wal_records.c", "gw_ext/crc32c.c"], True),
    "filewriter_thread": (["gw_ext/filewriter_thread.c"], True),
}
SANITIZERS = {
    "asan+ubsan": ["-fsanitize=address,undefined", "-fno-sanitize-recover=all"],
    "tsan": ["-fsanitize=thread"],
}
SANITIZER_ENV = {
    "ASAN_OPTIONS": "detect_leaks=1:halt_on_error=1:abort_on_error=0",
    "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1",
    "TSAN_OPTIONS": "halt_on_error=1:second_deadlock_stack=1",
}


def own_c_files() -> list[str]:
    """Every .c in the extensions' folders that no .pyx of the same name generates."""
    return sorted(
        str(c.relative_to(ROOT))
        for d in PACKAGE_DIRS
        for c in (ROOT / d).glob("*.c")
        if not c.with_suffix(".pyx").exists()
    )


def own_headers() -> list[str]:
    return sorted(str(h.relative_to(ROOT)) for d in PACKAGE_DIRS for h in (ROOT / d).glob("*.h"))


def setup_c_sources() -> dict[str, list[str]]:
    """setup.py's C_SOURCES, read without running setup.py."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "C_SOURCES" for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py has no C_SOURCES")


def compiler(name: str):
    return pytest.param(name, marks=pytest.mark.skipif(
        shutil.which(name) is None, reason=f"{name} is not installed (./dev fuzz installs clang)"))


COMPILERS = [compiler("gcc"), compiler("clang")]


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)


def test_there_are_c_files():
    assert len(own_c_files()) >= 7, own_c_files()


@pytest.mark.parametrize("cc", COMPILERS)
@pytest.mark.parametrize("source", own_c_files())
def test_compiles_without_warnings(cc, source, tmp_path):
    # -O2: some warnings (uninitialised values, bounds) need the optimiser's analysis.
    r = run([cc, "-O2", "-fPIC", "-Wall", "-Wextra", "-Werror", *INCLUDES,
             "-c", str(ROOT / source), "-o", str(tmp_path / "out.o")])
    assert r.returncode == 0, r.stderr
    assert r.stderr == "", r.stderr


def test_every_c_file_is_built_into_its_extension():
    sources = setup_c_sources()
    listed = [c for files in sources.values() for c in files]
    assert sorted(set(listed)) == own_c_files()
    for module in sources:
        pyx = ROOT / (module.replace(".", "/") + ".pyx")
        assert pyx.exists(), f"C_SOURCES names {module}, which has no {pyx.name}"


def test_every_c_file_and_header_is_shipped():
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    for path in own_c_files() + own_headers():
        folder, name = os.path.split(path)
        patterns = package_data.get(PACKAGE_DIRS[folder], [])
        assert any(fnmatch.fnmatch(name, p) for p in patterns), f"{path} is not in package-data"


def test_no_c_file_or_header_is_ignored_by_git():
    if not (ROOT / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not a git checkout")
    paths = own_c_files() + own_headers()
    r = run(["git", "check-ignore", "--no-index", *paths], cwd=ROOT)
    assert r.stdout == "", f"ignored by .gitignore: {r.stdout}"


def harness_cases():
    for name, (_, threaded) in HARNESSES.items():
        for sanitizer in SANITIZERS:
            if sanitizer == "tsan" and not threaded:
                continue
            for cc in COMPILERS:
                yield pytest.param(name, sanitizer, *cc.values, marks=cc.marks,
                                   id=f"{name}-{sanitizer}-{cc.values[0]}")


@pytest.mark.parametrize("name,sanitizer,cc", list(harness_cases()))
def test_harness_under_sanitizer(name, sanitizer, cc, tmp_path):
    sources, _ = HARNESSES[name]
    exe = tmp_path / f"test_{name}"
    build = run([cc, "-O1", "-g", "-fno-omit-frame-pointer", "-pthread", "-Wall", "-Wextra", "-Werror",
                 *SANITIZERS[sanitizer], *INCLUDES, f"-I{HARNESS_DIR}",
                 str(HARNESS_DIR / f"test_{name}.c"), *(str(ROOT / s) for s in sources), "-o", str(exe)])
    assert build.returncode == 0, build.stderr
    work = tmp_path / "files"
    work.mkdir()
    r = run([str(exe), str(work)], env={**os.environ, **SANITIZER_ENV})
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert f"{name} ok" in r.stdout, out
    assert "Sanitizer" not in r.stderr and "runtime error" not in r.stderr, out
