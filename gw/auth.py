"""Who may connect: anonymous access, the password file in force, the cache of
verified passwords.

- Anonymous access (`allow_anonymous`): `true`, `false`, or `auto` (the
  default), which is true only while every MQTT and JSON-lines listener is on
  loopback. A listener elsewhere with nothing to authenticate its clients (no
  password file, no client certificates) and anonymous access not explicitly
  allowed stops `gw serve` at start (`startup_problem`).
- The password file (gw/passwords.py) is loaded by the master first (a file
  that does not parse stops the start, or refuses the reload, naming the line)
  and then by each worker; a reload that fails keeps the previous users.
- Checking a password is a hash (tens of ms for argon2id or PBKDF2 at gw's
  iteration count), so `Authenticator.verify` runs in the worker's auth threads
  (a QueryPool), not in its loop; except for a file whose every entry is cheap
  (`$6$`, or `$7$` with at most `auth_inline_iterations`: a file made by
  `mosquitto_passwd`, 101 iterations, about 70 us a check), which the loop
  checks itself, as Mosquitto does: a hand-off to a thread and back costs
  more than such a hash (the answer waits for the loop to let the thread run),
  and an unknown user is then checked against a decoy as cheap as the file's. A successful check is remembered for `auth_cache_seconds`, keyed
  by the user and a keyed BLAKE2b digest of the password (never the password),
  so a reconnect storm with the same credentials hashes once, not once per
  connection. A reload forgets them all.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time

from gw.config import Config, certificate_required, is_loopback_host
from gw.passwords import PBKDF2_ITERATIONS, Entry, load_password_file
from gw.scram import fake_iterations  # imported by the master: its secret is the same in every worker

# Listeners whose clients the anonymous rules apply to (HTTP has its own tokens).
CLIENT_LISTENERS = ("mqtt", "mqtts", "json", "jsons", "ws", "wss")
# Checked against an unknown user's password, so it costs what a known one does.
_DECOY = Entry("7", b"\0" * 12, b"\0" * 64, PBKDF2_ITERATIONS)


def off_loopback_listeners(cfg, *, unless_certificate: bool = False) -> list[str]:
    """The client listeners on an address other than loopback; with
    unless_certificate, only those where no client certificate is required."""
    out = []
    for key in CLIENT_LISTENERS:
        addr = cfg.address(key)
        if addr is None or is_loopback_host(addr.host):
            continue
        if unless_certificate and certificate_required(cfg, key):
            continue
        out.append(f"{key} {addr}")
    return out


_anonymous_for: list = [None, False]    # the Config last answered for, and the answer


def anonymous_allowed(cfg) -> bool:
    """Whether a client without a user name may connect. The answer for a
    Config (immutable) is kept for the next call with it: the master asks before
    forking, so a worker's start finds it instead of parsing the listeners'
    addresses (ipaddress) again in its own pages."""
    if _anonymous_for[0] is not cfg:
        if cfg.allow_anonymous == "auto":
            allowed = not off_loopback_listeners(cfg)
        else:
            allowed = cfg.allow_anonymous == "true"
        if type(cfg) is not Config:
            return allowed
        _anonymous_for[:] = [cfg, allowed]
    return _anonymous_for[1]


def startup_problem(cfg) -> str | None:
    """Why `gw serve` must not start with these settings (one line), or None."""
    # A listener that requires a client certificate authenticates its clients.
    exposed = off_loopback_listeners(cfg, unless_certificate=True)
    if not exposed or cfg.allow_anonymous == "true" or cfg.password_file:
        return None
    return (f"listener {', '.join(exposed)} is off loopback with no authentication: set password_file "
            f"(make one with `gw passwd -c FILE USER`), require_certificate, or allow_anonymous = \"true\" "
            f"to let anyone connect")


class Authenticator:
    """The users of the password file in force and the cache of verified
    passwords. `verify` runs in the auth threads; `cached` and `replace` in
    the worker's loop thread."""

    def __init__(self, users: dict[bytes, Entry], cache_seconds: float, cache_entries: int,
                 inline_iterations: int = 0):
        self.users = users
        self.cache_seconds = cache_seconds
        self.cache_entries = cache_entries
        self.inline_iterations = inline_iterations
        self.inline, self._decoy = self._cost(users)
        self._scram_iterations = fake_iterations(users)
        self._key = secrets.token_bytes(32)
        self._cache: dict[bytes, float] = {}
        self._generation = 0
        self._lock = threading.Lock()

    @classmethod
    def from_file(cls, path: str, cache_seconds: float, cache_entries: int,
                  inline_iterations: int = 0) -> Authenticator:
        return cls(load_password_file(path), cache_seconds, cache_entries, inline_iterations)

    def _cost(self, users: dict[bytes, Entry]) -> tuple[bool, Entry]:
        """Whether every entry is cheap enough to check in the loop, and the
        decoy an unknown user's password is checked against: as costly as the
        file's costliest entry, so the time of a refusal tells nothing."""
        limit = self.inline_iterations
        cheap = bool(users) and limit > 0 and all(
            e.kind == "6" or (e.kind == "7" and e.iterations <= limit) for e in users.values())
        if not cheap:
            return False, _DECOY
        most = max((e.iterations for e in users.values() if e.kind == "7"), default=1)
        return True, Entry("7", b"\0" * 12, b"\0" * 64, most)

    def scram_iterations(self) -> int:
        """The iteration count SCRAM shows a user without a `$7$` entry (gw/scram.py)."""
        return self._scram_iterations

    def _cache_key(self, user: bytes, password: bytes) -> bytes:
        h = hashlib.blake2b(key=self._key, digest_size=32)
        h.update(len(user).to_bytes(4, "little"))
        h.update(user)
        h.update(password)
        return h.digest()

    def cached(self, user: bytes, password: bytes) -> bool:
        """Whether this user was verified with this password within
        auth_cache_seconds (a digest and a look-up, no hash: the loop thread
        asks before queueing a check, the auth threads again before hashing)."""
        if not self.cache_seconds or not self._cache:
            return False
        expiry = self._cache.get(self._cache_key(user, password))
        return expiry is not None and expiry > time.monotonic()

    def verify(self, user: bytes, password: bytes) -> bool:
        """Checks the password (an auth thread: the hash runs here)."""
        if self.cached(user, password):
            # A check of the same credentials queued ahead of this one succeeded
            # meanwhile: a storm of reconnects hashes once, not once per CONNECT queued.
            return True
        users, generation = self.users, self._generation
        entry = users.get(user)
        if entry is None:
            self._decoy.verify(password)    # as slow as a known user's check
            return False
        if not entry.verify(password):
            return False
        if self.cache_seconds:
            key = self._cache_key(user, password)
            now = time.monotonic()
            with self._lock:
                if generation == self._generation:      # not verified against a file since replaced
                    if len(self._cache) >= self.cache_entries:
                        self._cache = {k: v for k, v in self._cache.items() if v > now}
                        if len(self._cache) >= self.cache_entries:
                            self._cache.clear()
                    self._cache[key] = now + self.cache_seconds
        return True

    def replace(self, users: dict[bytes, Entry], cache_seconds: float, cache_entries: int,
                inline_iterations: int = 0) -> None:
        """A reloaded file: its users from now on; every cached check forgotten."""
        with self._lock:
            self._generation += 1
            self.inline_iterations = inline_iterations
            self.inline, self._decoy = self._cost(users)
            self._scram_iterations = fake_iterations(users)
            self.users = users
            self.cache_seconds = cache_seconds
            self.cache_entries = cache_entries
            self._cache = {}
