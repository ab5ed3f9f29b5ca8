"""HTTP API tokens: the tokens file, `gw token`, and the check a request passes.

A token is 32 random bytes (256 bits) from the OS, shown once as `gw_` and
their URL-safe base64. The file keeps only its SHA-256: a token is random, not
a password a person chose, so there is no dictionary to guess from and a slow,
salted hash would buy nothing; one SHA-256 per request keeps the check cheap.
A request's token is hashed once and looked up in a dict by its digest, then
the digests are compared in constant time.

The file is JSON lines, one token per line:

    {"name": "site1", "sha256": "<64 hex>", "scopes": ["ingest"], "devices": "site1-*",
     "created": "2026-01-02T03:04:05Z"}

JSON lines rather than TOML: each token is one line (so a parse error names
the line of the token at fault), and Python writes it with the standard
library (tomllib only reads). The file is written whole, atomically
(temporary file, fsync, rename, directory fsync), mode 0600.

Scopes: `ingest` (POST /v1/ingest..., limited to the device ids matching
`devices`, a shell-style glob, when it is set), `read` (the query API's GETs,
/metrics), `admin` (every route, every device: acknowledging alerts needs it).
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
import time
from fnmatch import translate
from pathlib import Path

from gw.config import LISTENER_KEYS, Config, is_loopback_host, parse_address
from gw.private_files import replace_private_file

SCOPES = ("ingest", "read", "admin")
TOKEN_PREFIX = "gw_"
TOKEN_BYTES = 32
TOKENS_FILE = "tokens"
NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
# A device pattern: the characters of a device id and the glob's own.
DEVICES_RE = re.compile(r"^[A-Za-z0-9_\-*?\[\]!]{1,128}$")
# The longest Authorization value worth hashing: a token is 46 characters.
MAX_PRESENTED = 256


class TokensError(Exception):
    """A tokens file that does not parse (the message names the file and line),
    or a `gw token` request that cannot be done."""


class Token:
    """One token's entry (never the token itself)."""

    __slots__ = ("name", "digest", "scopes", "devices", "created", "device_match")

    def __init__(self, name: str, digest: bytes, scopes: frozenset, devices: str | None, created: str):
        self.name = name
        self.digest = digest
        self.scopes = scopes
        self.devices = devices
        self.created = created
        # None: any device; else a compiled glob matching a whole device id.
        self.device_match = re.compile(translate(devices)).match if devices else None

    def allows(self, scope: str) -> bool:
        return scope in self.scopes or "admin" in self.scopes

    def allows_device(self, device_id: str) -> bool:
        """Whether this token may ingest for device_id (admin: any device)."""
        if self.device_match is None or "admin" in self.scopes:
            return True
        return self.device_match(device_id) is not None

    def as_json(self) -> dict:
        out = {"name": self.name, "sha256": self.digest.hex(), "scopes": sorted(self.scopes)}
        if self.devices:
            out["devices"] = self.devices
        out["created"] = self.created
        return out


def tokens_path(cfg: Config, get=getattr) -> Path:
    """http_tokens_file, or `tokens` in data_dir."""
    explicit = get(cfg, "http_tokens_file")
    return Path(explicit) if explicit else Path(get(cfg, "data_dir")) / TOKENS_FILE


_required_for: list = [None, False]     # the Config last answered for, and the answer


def http_tokens_required(cfg: Config, get=getattr) -> bool:
    """Whether the HTTP API asks for tokens: http_auth = token, or auto with a
    listener (any protocol) off loopback. `get(cfg, name)` reads a setting.
    The answer for a Config (immutable: every setting is there, so `get` reads
    what getattr does) is kept for the next call with it: the master asks before
    forking, and a worker's start finds the answer instead of parsing every
    listener's address again (ipaddress) in its own pages."""
    if type(cfg) is Config:
        if _required_for[0] is not cfg:
            _required_for[:] = [cfg, _tokens_required(cfg, getattr)]
        return _required_for[1]
    return _tokens_required(cfg, get)


def _tokens_required(cfg: Config, get) -> bool:
    mode = get(cfg, "http_auth")
    if mode == "token":
        return True
    if mode == "none":
        return False
    for key in LISTENER_KEYS:
        addr = parse_address(key, get(cfg, key))
        if addr is not None and not is_loopback_host(addr.host):
            return True
    return False


def _check_names(name: str) -> None:
    if not NAME_RE.match(name):
        raise TokensError(f"token name {name!r}: 1 to 64 letters, digits, '_', '-' or '.'")


def _check_devices(devices: str) -> None:
    if not DEVICES_RE.match(devices):
        raise TokensError(f"device pattern {devices!r}: 1 to 128 characters of a device id "
                          "(letters, digits, '_', '-') and the glob's '*', '?', '[', ']', '!'")


def parse_tokens(text: str, path: str) -> dict[bytes, Token]:
    """The tokens of a file's text, by digest. TokensError names the line at fault."""
    tokens: dict[bytes, Token] = {}
    names: set[str] = set()
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        where = f"{path}, line {lineno}"
        try:
            entry = json.loads(line)
        except ValueError as exc:
            raise TokensError(f"{where}: not JSON: {exc}") from None
        if not isinstance(entry, dict):
            raise TokensError(f"{where}: not a JSON object")
        unknown = set(entry) - {"name", "sha256", "scopes", "devices", "created"}
        if unknown:
            raise TokensError(f"{where}: unknown field {sorted(unknown)[0]!r}")
        name, digest, scopes = entry.get("name"), entry.get("sha256"), entry.get("scopes")
        devices, created = entry.get("devices"), entry.get("created", "")
        if not isinstance(name, str):
            raise TokensError(f"{where}: 'name' must be a string")
        try:
            _check_names(name)
            if devices is not None:
                if not isinstance(devices, str):
                    raise TokensError("'devices' must be a string")
                _check_devices(devices)
        except TokensError as exc:
            raise TokensError(f"{where}: {exc}") from None
        if name in names:
            raise TokensError(f"{where}: a second token named {name!r}")
        if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise TokensError(f"{where}: 'sha256' must be 64 lowercase hex digits")
        if (not isinstance(scopes, list) or not scopes
                or any(not isinstance(s, str) or s not in SCOPES for s in scopes)):
            raise TokensError(f"{where}: 'scopes' must be a non-empty list of {', '.join(SCOPES)}")
        if not isinstance(created, str):
            raise TokensError(f"{where}: 'created' must be a string")
        raw = bytes.fromhex(digest)
        if raw in tokens:
            raise TokensError(f"{where}: the same token as {tokens[raw].name!r}")
        names.add(name)
        tokens[raw] = Token(name, raw, frozenset(scopes), devices, created)
    return tokens


def load_tokens(path: Path) -> dict[bytes, Token]:
    """The file's tokens; none when it does not exist (then every request needing
    one is refused). TokensError when it does not parse or cannot be read."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        raise TokensError(f"{path}: cannot be read: {getattr(exc, 'strerror', None) or exc}") from None
    return parse_tokens(text, str(path))


def write_tokens(path: Path, tokens) -> None:
    """The whole file, atomically: a temporary file (mode 0600) beside it, fsync,
    rename, directory fsync."""
    text = "".join(json.dumps(t.as_json(), separators=(", ", ": ")) + "\n" for t in tokens)
    replace_private_file(path, text)


class _Locked:
    """`gw token` changes the file under an exclusive lock on its directory, so two
    at once do not lose each other's change."""

    def __init__(self, path: Path):
        self.path = path
        self.fd = -1

    def __enter__(self):
        directory = self.path.parent if str(self.path.parent) else Path(".")
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise TokensError(f"cannot create {directory}: {exc.strerror}") from None
        self.fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        os.close(self.fd)


def digest_of(token: str | bytes) -> bytes:
    return hashlib.sha256(token.encode() if isinstance(token, str) else token).digest()


def create_token(path: Path, name: str, scopes, devices: str | None) -> str:
    """Adds a token named `name`; returns the token (it is stored only hashed)."""
    _check_names(name)
    scopes = list(dict.fromkeys(scopes))
    if not scopes or any(s not in SCOPES for s in scopes):
        raise TokensError(f"scopes must be among {', '.join(SCOPES)}")
    if devices is not None:
        _check_devices(devices)
        if "ingest" not in scopes:
            raise TokensError("--devices limits the ingest scope: give --scope ingest too")
    with _Locked(path):
        tokens = load_tokens(path)
        if any(t.name == name for t in tokens.values()):
            raise TokensError(f"a token named {name!r} exists already (gw token revoke {name} first)")
        token = TOKEN_PREFIX + base64.urlsafe_b64encode(secrets.token_bytes(TOKEN_BYTES)).rstrip(b"=").decode()
        created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        entry = Token(name, digest_of(token), frozenset(scopes), devices, created)
        write_tokens(path, [*tokens.values(), entry])
    return token


def revoke_token(path: Path, name: str) -> None:
    with _Locked(path):
        tokens = load_tokens(path)
        kept = [t for t in tokens.values() if t.name != name]
        if len(kept) == len(tokens):
            raise TokensError(f"no token named {name!r} in {path}")
        write_tokens(path, kept)


class TokenTable:
    """The tokens a worker checks requests against (a dict by digest)."""

    __slots__ = ("tokens",)

    def __init__(self, tokens: dict[bytes, Token]):
        self.tokens = tokens

    def verify(self, authorization: bytes | None) -> Token | None:
        """The token of an `Authorization: Bearer TOKEN` value, or None."""
        if authorization is None or len(authorization) > MAX_PRESENTED:
            return None
        scheme, _, presented = authorization.partition(b" ")
        if scheme.lower() != b"bearer":
            return None
        presented = presented.strip(b" \t")
        if not presented:
            return None
        digest = hashlib.sha256(presented).digest()
        entry = self.tokens.get(digest)
        if entry is None or not hmac.compare_digest(entry.digest, digest):
            return None
        return entry
