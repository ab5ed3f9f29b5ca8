"""The `gw` command line (click): serve, stats, bench, config, openapi, certs,
passwd, token, export. The entry point is gw/cli.py, which starts `gw serve`
without this module when its flags need no conversion."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from gw import __version__
from gw.cli import run_serve, setting_kind
from gw.config import SETTINGS, ConfigError, describe, load_config


def _fail(message: str, code: int = 2) -> None:
    click.echo(f"gw: error: {message}", err=True)
    sys.exit(code)


def setting_options(func):
    """One flag per Config field (`max_connections` -> `--max-connections`), in
    field order; default None so the config file can supply the value."""
    for name, f in reversed(list(SETTINGS.items())):
        kind = {"int": int, "float": float, "bool": click.BOOL}.get(setting_kind(f))
        metavar = ("HOST:PORT" if f.metadata["kind"] == "address"
                   else "PATH" if f.metadata["kind"] == "path"
                   else {int: "N", float: "SECONDS", click.BOOL: "true|false"}.get(kind, "TEXT"))
        func = click.option(f"--{name.replace('_', '-')}", name, type=kind, default=None, metavar=metavar,
                            help=f"{f.metadata['doc']} [default: {f.default}]")(func)
    return func


class GwCommands(click.Group):
    """gw's commands, plus `bench`: the load generator (package gwbench), imported
    only when asked for, so `gw serve` never loads it."""

    def list_commands(self, ctx):
        return sorted([*super().list_commands(ctx), "bench"])

    def get_command(self, ctx, name):
        if name == "bench":
            from gwbench.command import bench  # noqa: PLC0415  (the load generator's own click command)

            return bench
        return super().get_command(ctx, name)


@click.group(cls=GwCommands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="gw")
def main_group():
    """gw: an IoT connection gateway (MQTT 3.1.1, JSON lines, HTTP ingest)."""


@main_group.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="TOML file; every flag below has a key of the same name with underscores")
@setting_options
def serve(config_path, **flags):
    """Run the gateway: a master and pre-forked epoll workers.

    SIGTERM or SIGINT drains (stop accepting, flush, close, exit within
    --drain-timeout); SIGHUP reloads the config file and certificates without
    dropping connections.
    """
    run_serve(config_path, {k: v for k, v in flags.items() if v is not None})


@main_group.command()
@click.option("--data-dir", default="data", show_default=True, metavar="DIR",
              help="data directory of the running gw")
@click.option("--json", "as_json", is_flag=True, help="print all counters as JSON")
@click.option("--interval", default=1.0, show_default=True, type=click.FloatRange(0.05, 60),
              help="seconds between the two samples rates are computed from")
def stats(data_dir, as_json, interval):
    """Print a running server's figures, read from its shared-memory block,
    and the memory of each of its processes (PSS beside RSS, from
    /proc/PID/smaps_rollup)."""
    from gw.stats import Aggregator, read_running

    try:
        _pid, block = read_running(data_dir)
    except LookupError as exc:
        _fail(str(exc), 1)
    aggregator = Aggregator(block, proportional=True)
    time.sleep(interval)
    snap = aggregator.tick()
    if as_json:
        click.echo(json.dumps(snap.as_dict(), indent=2))
    else:
        click.echo(snap.line())
        click.echo(snap.sinks_line())
        click.echo(snap.memory_line())
    block.close()


@main_group.group("certs")
def certs_group():
    """Development certificates (not for production: use your own CA there)."""


@certs_group.command("client")
@click.argument("name")
@click.option("--out", "out", type=click.Path(file_okay=False), default=None, metavar="DIR",
              help="directory for NAME.pem and NAME-key.pem [default: the certs directory]")
@click.option("--certs", "certs_dir", type=click.Path(file_okay=False), default=None, metavar="DIR",
              help="the certs directory whose development CA signs it [default: the config's certs]")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="TOML file naming the certs directory")
def certs_client(name, out, certs_dir, config_path):
    """Issue a client certificate with NAME as its common name, signed by the
    development CA (ca.pem in the certs directory, made when absent): for tests
    and first steps with require_certificate, not for production."""
    from gw.certs import CertError, issue_client_cert

    if certs_dir is None:
        try:
            certs_dir = load_config(config_path).certs
        except ConfigError as exc:
            _fail(str(exc))
    try:
        cert, key = issue_client_cert(certs_dir, name, out)
    except CertError as exc:
        _fail(str(exc), 1)
    except (OSError, ValueError) as exc:
        _fail(f"cannot issue a client certificate: {exc}", 1)
    click.echo(f"certificate: {cert}")
    click.echo(f"key:         {key}")
    click.echo(f"CA:          {Path(certs_dir) / 'ca.pem'}")


@main_group.command("config")
def show_config():
    """Print every setting with its default, as a TOML file."""
    click.echo(describe(), nl=False)


@main_group.command("openapi")
@click.option("--output", "-o", "output", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="write the document to FILE instead of stdout")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="TOML file whose settings (max_batch, max_body_size, ack, telemetry_topic) it reflects")
def openapi_command(output, config_path):
    """Print the HTTP API's OpenAPI 3.1 document (JSON), as served at /docs/openapi.json."""
    from gw.openapi import openapi_json

    try:
        cfg = load_config(config_path)
    except ConfigError as exc:
        _fail(str(exc))
    data = openapi_json(cfg)
    if output is None:
        click.echo(data.decode(), nl=False)
        return
    try:
        with open(output, "wb") as fh:
            fh.write(data)
    except OSError as exc:
        _fail(f"cannot write {output}: {exc.strerror or exc}", 1)


@main_group.command("passwd")
@click.option("-c", "create", is_flag=True, help="create the file (an existing one is overwritten)")
@click.option("-b", "batch", is_flag=True, help="batch: the password is the last argument (no prompt)")
@click.option("-D", "delete", is_flag=True, help="delete the user")
@click.option("--hash", "kind", type=click.Choice(["argon2id", "pbkdf2"]), default="argon2id", show_default=True,
              help="hash of new entries: argon2id, or PBKDF2-HMAC-SHA512 ($7$, Mosquitto 2.0's kind) with "
                   "210,000 iterations")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="TOML file whose password_file is used when FILE is not given")
@click.argument("args", nargs=-1)
def passwd_command(create, batch, delete, kind, config_path, args):
    """Manage a password file, as mosquitto_passwd does: FILE USER (add or
    update, prompting), -c FILE USER (create), -b FILE USER PASSWORD, -D FILE USER.

    Files are written atomically with mode 0600; Mosquitto reads them too."""
    from gw.passwords import PasswordFileError, update_file

    if delete and (create or batch):
        _fail("-D goes alone, without -c or -b")
    wanted = 3 if batch else 2
    args = list(args)
    if config_path and len(args) == wanted - 1:
        try:
            cfg = load_config(config_path)
        except ConfigError as exc:
            _fail(str(exc))
        if not cfg.password_file:
            _fail(f"{config_path} sets no password_file; give FILE")
        args.insert(0, cfg.password_file)
    if len(args) != wanted:
        _fail("usage: gw passwd [-c | -D] FILE USER | gw passwd -b [-c] FILE USER PASSWORD "
              "(FILE may come from --config)")
    path, user = args[0], args[1]
    password = None
    if batch:
        password = args[2]
    elif not delete:
        if not sys.stdin.isatty():
            _fail("no terminal to prompt for the password: use -b FILE USER PASSWORD")
        first = click.prompt("Password", hide_input=True, default="", show_default=False)
        again = click.prompt("Reenter password", hide_input=True, default="", show_default=False)
        if first != again:
            _fail("passwords do not match", 1)
        password = first
    if password is not None and not password:
        _fail("empty password", 1)
    try:
        update_file(path, user, password, create=create, kind=kind)
    except PasswordFileError as exc:
        _fail(str(exc), 1)
    except OSError as exc:
        _fail(f"cannot write {path}: {exc.strerror or exc}", 1)


@main_group.group("token")
def token_group():
    """HTTP API tokens: create, list, revoke (the tokens file: http_tokens_file,
    by default `tokens` in data_dir). A change takes effect when gw reloads
    (SIGHUP) or restarts."""


def _token_config(config_path, flags):
    try:
        return load_config(config_path, {k: v for k, v in flags.items() if v is not None})
    except ConfigError as exc:
        _fail(str(exc))


def _token_options(func):
    func = click.option("--data-dir", "data_dir", default=None, metavar="DIR",
                        help="data_dir, as gw serve's (the tokens file's default place)")(func)
    func = click.option("--http-tokens-file", "http_tokens_file", default=None, metavar="FILE",
                        help="the tokens file, as gw serve's http_tokens_file")(func)
    return click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
                        help="gw serve's TOML file: its data_dir and http_tokens_file")(func)


@token_group.command("create")
@click.argument("name")
@click.option("--scope", "scopes", multiple=True, required=True,
              type=click.Choice(["ingest", "read", "admin"]),
              help="what the token may do: ingest (POST /v1/ingest...), read (the query API, /metrics), "
                   "admin (everything); repeat for several")
@click.option("--devices", default=None, metavar="PATTERN",
              help="with --scope ingest: only device ids matching this shell-style pattern ('site1-*')")
@_token_options
def token_create(name, scopes, devices, config_path, **flags):
    """Make a token NAME: printed once, on stdout; only its SHA-256 is stored."""
    from gw.tokens import TokensError, create_token, tokens_path

    cfg = _token_config(config_path, flags)
    path = tokens_path(cfg)
    try:
        token = create_token(path, name, scopes, devices)
    except TokensError as exc:
        _fail(str(exc), 1)
    except OSError as exc:
        _fail(f"cannot write {path}: {exc.strerror or exc}", 1)
    click.echo(token)
    click.echo(f"gw: token {name!r} added to {path}; it is shown only now. It takes effect on reload "
               f"(SIGHUP) or restart of gw serve.", err=True)


@token_group.command("list")
@_token_options
def token_list(config_path, **flags):
    """Names, scopes, device patterns and creation times (never hashes)."""
    from gw.tokens import TokensError, load_tokens, tokens_path

    cfg = _token_config(config_path, flags)
    try:
        tokens = load_tokens(tokens_path(cfg))
    except TokensError as exc:
        _fail(str(exc), 1)
    rows = [(t.name, ",".join(sorted(t.scopes)), t.devices or "*", t.created) for t in tokens.values()]
    header = ("NAME", "SCOPES", "DEVICES", "CREATED")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
    for row in [header, *rows]:
        click.echo("  ".join(cell.ljust(widths[i]) if i < 3 else cell for i, cell in enumerate(row)).rstrip())


@token_group.command("revoke")
@click.argument("name")
@_token_options
def token_revoke(name, config_path, **flags):
    """Remove the token NAME from the tokens file."""
    from gw.tokens import TokensError, revoke_token, tokens_path

    cfg = _token_config(config_path, flags)
    path = tokens_path(cfg)
    try:
        revoke_token(path, name)
    except TokensError as exc:
        _fail(str(exc), 1)
    except OSError as exc:
        _fail(f"cannot write {path}: {exc.strerror or exc}", 1)
    click.echo(f"gw: token {name!r} revoked in {path}; this takes effect on reload (SIGHUP) or restart "
               f"of gw serve.")


@main_group.command("export")
@click.option("--from", "start", default=None, metavar="TIME",
              help="start of the range, included: RFC 3339 with a time zone (2026-01-31T00:00:00Z) or Unix "
                   "seconds [default: 24 hours before --to]")
@click.option("--to", "end", default=None, metavar="TIME",
              help="end of the range, excluded: RFC 3339 or Unix seconds [default: now]")
@click.option("--device", default=None, metavar="ID|PATTERN",
              help="only this device, or the devices matching a pattern with * and ? ('site1-*')")
@click.option("--window", default="raw", show_default=True, type=click.Choice(["raw", "1m", "1h", "1d"]),
              help="raw readings, or the windows of a rollup whose start is in the range")
@click.option("--format", "fmt", default=None, type=click.Choice(["parquet", "csv", "ndjson"]),
              help="the output's format [default: from the output's suffix: .parquet, .csv, .ndjson or .jsonl]")
@click.option("--output", "-o", "output", required=True, type=click.Path(dir_okay=False), metavar="FILE",
              help="the file to write (replaced if it exists; written under a temporary name, then renamed; "
                   "mode 0600)")
@click.option("--quiet", "-q", is_flag=True, help="no progress bar and no summary on stderr")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="gw serve's TOML file: its data_dir and store")
@click.option("--data-dir", "data_dir", default=None, metavar="DIR", help="data_dir, as gw serve's")
@click.option("--store", "store", default=None, metavar="sqlite|URL",
              help="the store, as gw serve's: sqlite (data_dir/store.sqlite) or postgresql://USER@HOST:PORT/DBNAME")
def export_command(start, end, device, window, fmt, output, quiet, config_path, data_dir, store):
    """Write readings (or a rollup window) from the store to a Parquet, CSV or
    NDJSON file, one consistent snapshot of the store, while gw serve runs or not.

    Readings come in time order (then device id). Parquet and CSV have one
    column per metric present in the range (metric_NAME, float64, empty where a
    reading lacks it), tags (a map in Parquet, JSON text in CSV) and payload
    (JSON text); NDJSON keeps each reading's metrics and tags objects. Rollup
    windows have window, bucket, device_id, metric, count, min, max, mean and
    std, as the query API answers them. Times are UTC: a timestamp[us, tz=UTC]
    in Parquet, RFC 3339 in CSV and NDJSON."""
    from gw.export import ExportError, export, open_source, output_format, selection

    try:
        cfg = load_config(config_path, {"data_dir": data_dir, "store": store})
    except ConfigError as exc:
        _fail(str(exc))
    try:
        fmt = output_format(fmt, output)
        sel = selection(start, end, device, window, time.time())
        source = open_source(cfg)
    except ExportError as exc:
        _fail(str(exc), exc.code)
    bar = None
    show = not quiet and sys.stderr.isatty()

    def counted(total: int) -> None:
        nonlocal bar
        if show:
            bar = click.progressbar(length=total, label="exporting", file=sys.stderr, show_pos=True,
                                    show_percent=True, show_eta=True)
            bar.__enter__()

    try:
        result = export(source, sel, fmt, output, on_count=counted,
                        on_batch=lambda n: bar.update(n) if bar is not None else None)
    except ExportError as exc:
        _fail(str(exc), exc.code)
    finally:
        if bar is not None:
            bar.__exit__(None, None, None)
        source.close()
    if quiet:
        return
    what = "readings" if sel.window == "raw" else f"{sel.window} windows"
    if result.rows == 0:
        click.echo(f"gw: no {what} in the range: wrote {output} with no rows", err=True)
    else:
        extra = f", {len(result.columns)} metric columns" if result.columns else ""
        click.echo(f"gw: wrote {result.rows} {what} to {output} ({fmt}{extra})", err=True)


def main() -> None:
    """Entry point: click's errors become one line and exit code 2."""
    try:
        code = main_group.main(standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.UsageError as exc:
        _fail(exc.format_message())
    except click.ClickException as exc:
        _fail(exc.format_message(), exc.exit_code)
    sys.exit(code if isinstance(code, int) else 0)

