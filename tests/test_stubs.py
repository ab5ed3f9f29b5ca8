"""The .pyi stubs of the compiled modules say what the modules have.

Every compiled module (each top-level .pyx of gw_ext/ and gwbench/_ext/) has
a stub beside it; everything a stub names (module-level names, classes, their
methods, properties and attributes) exists on the module; and every public
name the Python code imports from a compiled module, or reads off it as an
attribute, is in its stub. Editors and type checkers read the stubs, so a
name missing from one is an error they report where there is none, and a
name a stub keeps after the module dropped it hides a real one.
"""

from __future__ import annotations

import ast
import functools
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXTENSION_DIRS = {"gw_ext": "gw_ext", "gwbench/_ext": "gwbench._ext"}
PYTHON_DIRS = ("gw", "gwbench", "bench", "tests", "fuzz")


def compiled_modules() -> list[tuple[str, Path]]:
    """(module name, its .pyx) for every extension module setup.py builds."""
    found = []
    for directory, package in EXTENSION_DIRS.items():
        for pyx in sorted((ROOT / directory).glob("*.pyx")):
            found.append((f"{package}.{pyx.stem}", pyx))
    return found


MODULES = compiled_modules()
MODULE_NAMES = {name for name, _ in MODULES}


def stub_path(pyx: Path) -> Path:
    return pyx.with_suffix(".pyi")


def stub_tree(pyx: Path) -> ast.Module:
    path = stub_path(pyx)
    return ast.parse(path.read_text(), str(path))


def top_level_names(tree: ast.Module) -> dict[str, ast.stmt]:
    """What the stub says the module has: its functions, classes, annotated
    and assigned names, and the names it re-exports (`import X as X`)."""
    names: dict[str, ast.stmt] = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names[node.name] = node
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if not node.target.id.startswith("_"):      # a stub's own type aliases
                names[node.target.id] = node
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name) and not target.id.startswith("_"):
                    names[target.id] = node
        elif isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if alias.asname is not None and alias.asname == alias.name:
                    names[alias.name] = node
    return names


def class_members(node: ast.ClassDef) -> tuple[list[str], list[str]]:
    """(methods and properties, annotated attributes) a stub's class declares."""
    methods, attributes = [], []
    for item in node.body:
        if isinstance(item, ast.FunctionDef):
            methods.append(item.name)
        elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
            attributes.append(item.target.id)
    return methods, attributes


def init_arity(node: ast.ClassDef) -> int:
    for item in node.body:
        if isinstance(item, ast.FunctionDef) and item.name == "__init__":
            return len(item.args.args) - 1
    return 0


@pytest.mark.parametrize("name,pyx", MODULES, ids=[name for name, _ in MODULES])
def test_every_compiled_module_has_a_stub(name, pyx):
    assert stub_path(pyx).is_file(), f"{name} has no stub: write {stub_path(pyx).relative_to(ROOT)}"


@pytest.mark.parametrize("name,pyx", MODULES, ids=[name for name, _ in MODULES])
def test_stub_names_only_what_the_module_has(name, pyx):
    module = importlib.import_module(name)
    names = top_level_names(stub_tree(pyx))
    assert names, f"{stub_path(pyx).name} names nothing"
    missing = [n for n in names if not hasattr(module, n)]
    assert not missing, f"{stub_path(pyx).name} names what {name} lacks: {missing}"
    for class_name, node in names.items():
        if not isinstance(node, ast.ClassDef):
            continue
        cls = getattr(module, class_name)
        assert isinstance(cls, type), f"{name}.{class_name} is a {type(cls).__name__}, the stub says a class"
        methods, attributes = class_members(node)
        lacking = [m for m in methods if not hasattr(cls, m)]
        if issubclass(cls, BaseException):
            # An exception's attributes are set by its __init__: look on an instance.
            instance = cls(*["x"] * init_arity(node))
            lacking += [a for a in attributes if not hasattr(instance, a)]
        else:
            lacking += [a for a in attributes if not hasattr(cls, a)]
        assert not lacking, f"{stub_path(pyx).name}: {class_name} has no {lacking}"


@functools.cache
def names_the_code_uses() -> dict[str, set[str]]:
    """{compiled module: public names the Python code imports from it or reads
    off it as an attribute (`from gw_ext.wal import Wal`, `codec.decode`,
    `import gw_ext.stats as s; s.observe`)}."""
    used: dict[str, set[str]] = {name: set() for name in MODULE_NAMES}
    for directory in PYTHON_DIRS:
        for path in sorted((ROOT / directory).rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            aliases: dict[str, str] = {}
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.module:
                    for alias in node.names:
                        if node.module in MODULE_NAMES:
                            used[node.module].add(alias.name)
                        elif f"{node.module}.{alias.name}" in MODULE_NAMES:
                            aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
                elif isinstance(node, ast.Import):
                    for alias in node.names:
                        if alias.name in MODULE_NAMES:
                            aliases[alias.asname or alias.name] = alias.name
            for node in ast.walk(tree):
                if not isinstance(node, ast.Attribute):
                    continue
                parts, value = [], node.value
                while isinstance(value, ast.Attribute):
                    parts.append(value.attr)
                    value = value.value
                if isinstance(value, ast.Name):
                    dotted = ".".join([value.id, *reversed(parts)])
                    if dotted in aliases:
                        used[aliases[dotted]].add(node.attr)
    return {m: {n for n in names if not n.startswith("_")} for m, names in used.items()}


def test_the_collector_sees_the_imports():
    """The scan below finds what the code is known to use (else it checks nothing)."""
    used = names_the_code_uses()
    assert {"Wal", "WalReader", "crc32c"} <= used["gw_ext.wal"]
    assert {"decode", "encode", "allow_control_characters"} <= used["gw_ext.codec"]
    assert "observe" in used["gw_ext.stats"]                    # import gw_ext.stats as _consts
    assert "epoll_wait" in used["gwbench._ext.tls_clients"]     # from gwbench._ext import tls_clients


@pytest.mark.parametrize("name,pyx", MODULES, ids=[name for name, _ in MODULES])
def test_stub_names_what_the_code_uses(name, pyx):
    used = names_the_code_uses()[name]
    names = top_level_names(stub_tree(pyx))
    missing = sorted(used - set(names))
    assert not missing, f"the code uses {name}.{missing}, which {stub_path(pyx).name} does not name"


def test_stats_stub_names_every_constant():
    """gw/stats.py turns every upper-case int of gw_ext.stats into its Counter
    and Layout enums (by dir()), so the stub names each one."""
    import gw_ext.stats as stats

    names = top_level_names(stub_tree(ROOT / "gw_ext" / "stats.pyx"))
    constants = {k for k in dir(stats) if k.isupper() and type(getattr(stats, k)) is int}
    assert constants and not constants - set(names), sorted(constants - set(names))


def test_stubs_are_installed_with_the_package():
    """pyproject's package-data ships the stubs beside the compiled modules."""
    import tomllib

    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    for package in EXTENSION_DIRS.values():
        assert "*.pyi" in data[package], package
