"""Password files in Mosquitto's format: reading, checking, writing (`gw passwd`).

One line per user, `user:HASH`, where HASH is one of the kinds Mosquitto's
`mosquitto_passwd` writes, so its files work here unchanged and the other way
round:

- `$7$<iterations>$<salt b64>$<hash b64>`: PBKDF2-HMAC-SHA512 of the password
  with the salt, 64 bytes (Mosquitto 2.0's default, with 101 iterations);
- `$6$<salt b64>$<hash b64>`: SHA-512 of the password followed by the salt
  (Mosquitto before 2.0);
- `$argon2id$v=19$m=...,t=...,p=...$<salt>$<hash>`: argon2id in the PHC string
  format (Mosquitto 2.1; argon2-cffi here).

Empty lines and lines starting with `#` are skipped. Any other line that is not
one of these refuses the whole file, naming its line number: a file half
understood would let the wrong people in or keep the right ones out.

Checking a password costs what the hash kind makes it cost (argon2id and
PBKDF2 with many iterations: tens of milliseconds), so the worker never does it
in its event loop: gw/auth.py runs it in the worker's auth threads.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from dataclasses import dataclass

from gw.private_files import replace_private_file

# New `$7$` entries: OWASP's 2023 figure for PBKDF2-HMAC-SHA512 (210,000
# iterations, about 0.1-0.2 s per check on one core). Mosquitto's 101 is
# cheap to brute-force from a stolen file.
PBKDF2_ITERATIONS = 210_000
MAX_ITERATIONS = 100_000_000
SALT_BYTES = 12             # as mosquitto_passwd
SHA512_BYTES = 64
HASH_KINDS = ("argon2id", "pbkdf2")


class PasswordFileError(Exception):
    """A password file that cannot be used. The message names the file and line."""


@dataclass(frozen=True)
class Entry:
    """One user's hash: kind ('6', '7', 'argon2id') and its parts."""
    kind: str
    salt: bytes = b""
    digest: bytes = b""
    iterations: int = 0
    encoded: str = ""           # argon2id: the PHC string as written

    def verify(self, password: bytes) -> bool:
        """Whether `password` matches (constant time in the comparison)."""
        if self.kind == "7":
            got = hashlib.pbkdf2_hmac("sha512", password, self.salt, self.iterations, len(self.digest))
            return hmac.compare_digest(got, self.digest)
        if self.kind == "6":
            got = hashlib.sha512(password + self.salt).digest()
            return hmac.compare_digest(got, self.digest)
        return _argon2_verify(self.encoded, password)


def _argon2_verify(encoded: str, password: bytes) -> bool:
    from argon2 import PasswordHasher
    from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

    try:
        return PasswordHasher().verify(encoded, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def _b64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not base64") from None


def parse_hash(text: str) -> Entry:
    """The Entry of one HASH field; ValueError saying what is wrong."""
    if text.startswith("$7$"):
        parts = text.split("$")
        if len(parts) != 5:
            raise ValueError("a $7$ hash is $7$<iterations>$<salt>$<hash>")
        if not parts[2].isdigit() or not 1 <= int(parts[2]) <= MAX_ITERATIONS:
            raise ValueError(f"iteration count {parts[2]!r} is not 1-{MAX_ITERATIONS}")
        salt, digest = _b64(parts[3]), _b64(parts[4])
        if not salt or len(digest) != SHA512_BYTES:
            raise ValueError("a $7$ hash needs a salt and 64 bytes of hash")
        return Entry("7", salt, digest, int(parts[2]))
    if text.startswith("$6$"):
        parts = text.split("$")
        if len(parts) != 4:
            raise ValueError("a $6$ hash is $6$<salt>$<hash>")
        salt, digest = _b64(parts[2]), _b64(parts[3])
        if not salt or len(digest) != SHA512_BYTES:
            raise ValueError("a $6$ hash needs a salt and 64 bytes of hash")
        return Entry("6", salt, digest)
    if text.startswith("$argon2id$"):
        from argon2 import extract_parameters
        from argon2.exceptions import InvalidHashError

        try:
            extract_parameters(text)
        except (InvalidHashError, ValueError):
            raise ValueError("not a valid argon2id hash") from None
        return Entry("argon2id", encoded=text)
    kind = text.split("$")[1] if text.startswith("$") and text.count("$") >= 2 else text[:12]
    raise ValueError(f"unknown hash kind {kind!r} (known: $6$, $7$, $argon2id$)")


def parse_lines(lines: list[str], source: str) -> dict[bytes, Entry]:
    """{user: Entry} of a password file's lines; PasswordFileError naming the line."""
    users: dict[bytes, Entry] = {}
    for number, raw in enumerate(lines, 1):
        line = raw.rstrip("\r\n")
        if not line.strip() or line.startswith("#"):
            continue
        user, sep, hashed = line.partition(":")
        if not sep or not user:
            raise PasswordFileError(f"{source} line {number}: expected user:hash")
        try:
            entry = parse_hash(hashed.strip())
        except ValueError as exc:
            raise PasswordFileError(f"{source} line {number} (user {user!r}): {exc}") from None
        users[user.encode()] = entry
    return users


def read_lines(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.readlines()
    except FileNotFoundError:
        raise PasswordFileError(f"password file {path!r} not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PasswordFileError(f"password file {path!r} cannot be read: {exc}") from None


def load_password_file(path: str) -> dict[bytes, Entry]:
    """The users of a password file; PasswordFileError (file and line) if any line is bad."""
    return parse_lines(read_lines(path), path)


def hash_password(password: str, kind: str = "argon2id") -> str:
    """A new HASH field for `password`: argon2id (argon2-cffi's defaults) or
    PBKDF2-HMAC-SHA512 `$7$` with PBKDF2_ITERATIONS."""
    if kind == "argon2id":
        from argon2 import PasswordHasher

        return PasswordHasher().hash(password)
    if kind == "pbkdf2":
        salt = secrets.token_bytes(SALT_BYTES)
        digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, PBKDF2_ITERATIONS, SHA512_BYTES)
        return "$7$%d$%s$%s" % (PBKDF2_ITERATIONS, base64.b64encode(salt).decode(),
                                base64.b64encode(digest).decode())
    raise ValueError(f"unknown hash kind {kind!r} (argon2id or pbkdf2)")


def check_username(user: str) -> None:
    if not user or ":" in user or any(ord(ch) < 32 or ord(ch) == 127 for ch in user):
        raise PasswordFileError(f"user name {user!r}: must be non-empty, without ':' or control characters")


def update_file(path: str, user: str, password: str | None, *, create: bool = False,
                kind: str = "argon2id") -> None:
    """Adds or replaces `user` (password given) or deletes it (None) in the file,
    written atomically with mode 0600. `create` starts from an empty file."""
    check_username(user)
    lines = [] if create else read_lines(path)
    parse_lines(lines, path)            # refuse to rewrite a file that does not parse
    prefix = user + ":"
    kept = [ln if ln.endswith("\n") else ln + "\n" for ln in lines if not ln.startswith(prefix)]
    if password is None:
        if len(kept) == len(lines):
            raise PasswordFileError(f"user {user!r} not found in {path}")
    else:
        kept.append(f"{user}:{hash_password(password, kind)}\n")
    write_atomically(path, "".join(kept))


def write_atomically(path: str, text: str) -> None:
    """The password file replaced whole, mode 0600 (gw/private_files.py)."""
    replace_private_file(path, text)
