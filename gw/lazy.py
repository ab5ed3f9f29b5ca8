"""A module imported at its first use, for what a process may never need.

    np = LazyModule("numpy", globals(), "np")

stands in the module's globals for numpy until code reads an attribute of it:
that read imports numpy and puts it in the globals in its own place, so every
later read finds numpy itself (no indirection left on any path). The
pipeline's store imports numpy this way: an idle server (no reading yet)
never loads it, and a busy one pays for it once, in the process that uses it.
"""

from __future__ import annotations

import importlib


class LazyModule:
    __slots__ = ("_name", "_namespace", "_alias")

    def __init__(self, name: str, namespace: dict, alias: str):
        self._name = name
        self._namespace = namespace
        self._alias = alias

    def load(self):
        """The module, imported (the import system's lock makes concurrent firsts one import)."""
        module = importlib.import_module(self._name)
        if self._namespace.get(self._alias) is self:
            self._namespace[self._alias] = module
        return module

    def __getattr__(self, attr: str):
        return getattr(self.load(), attr)

    def __repr__(self) -> str:
        return f"<module {self._name!r}, imported at its first use>"
