"""The `gw` command's entry point (`gw`, `python -m gw.cli`).

`gw serve` whose flags need no conversion (each `--setting VALUE` or
`--setting=VALUE` of gw serve with a value click takes as it is written, and
`--config FILE`) starts the server here, without importing click: whatever
the master imports, every worker and the pipeline inherit. Anything else
(another command, `--help`, a value click would convert, refuse or ask about)
goes to the click command line, gw/commands.py, which answers as always.
"""

from __future__ import annotations

import logging
import os
import re
import sys

# click.BOOL's words (it strips and lowercases first: a value written otherwise goes to click).
_BOOL_WORDS = {"1": True, "true": True, "t": True, "yes": True, "y": True, "on": True,
               "0": False, "false": False, "f": False, "no": False, "n": False, "off": False}
_INT = re.compile(r"[0-9]+\Z")
_FLOAT = re.compile(r"([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?\Z")


def fail(message: str, code: int = 2) -> None:
    """One line on stderr ("gw: error: ..."), then exit with `code`."""
    sys.stderr.write(f"gw: error: {message}\n")
    sys.stderr.flush()
    sys.exit(code)


def setting_kind(f) -> str:
    """A setting's type name: "int", "float", "bool" or "str" (its flag's click type)."""
    return f.type if isinstance(f.type, str) else f.type.__name__


def serve_flags(args: list[str]) -> tuple[str | None, dict] | None:
    """(config path, overrides) of `gw serve ARGS` when every flag is one this
    reads as click would, with the same result; None for anything else."""
    from gw.config import SETTINGS

    flags = {f"--{name.replace('_', '-')}": (name, setting_kind(f)) for name, f in SETTINGS.items()}
    config_path, overrides = None, {}
    i = 0
    while i < len(args):
        flag, eq, value = args[i].partition("=")
        if eq:
            i += 1
        elif i + 1 < len(args) and not args[i + 1].startswith("-"):
            value = args[i + 1]
            i += 2
        else:
            return None
        if flag == "--config":
            if os.path.isdir(value):
                return None                     # click.Path(dir_okay=False) says why
            config_path = value
            continue
        if flag not in flags:
            return None
        name, kind = flags[flag]
        if kind == "int" and _INT.match(value):
            overrides[name] = int(value)
        elif kind == "float" and _FLOAT.match(value):
            overrides[name] = float(value)
        elif kind == "bool" and value in _BOOL_WORDS:
            overrides[name] = _BOOL_WORDS[value]
        elif kind not in ("int", "float", "bool"):
            overrides[name] = value
        else:
            return None
    return config_path, overrides


def run_serve(config_path: str | None, overrides: dict) -> None:
    """`gw serve`: the settings loaded, then the master runs until it stops; exits."""
    from gw.config import ConfigError, load_config

    try:
        cfg = load_config(config_path, overrides)
    except ConfigError as exc:
        fail(str(exc))
    logging.basicConfig(level=cfg.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from gw.master import Master, StartupError

    try:
        code = Master(cfg, config_path, overrides).run()
    except StartupError as exc:
        fail(str(exc), 1)
    sys.exit(code)


def main() -> None:
    args = sys.argv[1:]
    if args[:1] == ["serve"]:
        parsed = serve_flags(args[1:])
        if parsed is not None:
            run_serve(*parsed)
    from gw.commands import main as command_line

    command_line()


def __getattr__(name: str):
    # The click command line's names (main_group, serve, ...), as before it had its own module.
    import gw.commands

    try:
        return getattr(gw.commands, name)
    except AttributeError:
        raise AttributeError(f"module 'gw.cli' has no attribute {name!r}") from None


if __name__ == "__main__":
    main()
