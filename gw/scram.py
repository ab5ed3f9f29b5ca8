"""SCRAM-SHA-512 (RFC 5802, RFC 7677's shape with SHA-512), the server side,
for MQTT 5.0 enhanced authentication (gw_ext/worker/enhanced_auth.pyx).

The password file's `$7$` entries are PBKDF2-HMAC-SHA512(password, salt,
iterations, 64 bytes), which is SCRAM's SaltedPassword = Hi(password, salt, i)
for SHA-512: the server runs SCRAM from the stored entry without ever
knowing the password, and without any PBKDF2 of its own (the client does the
iterations). What it computes is two HMACs and a hash per exchange, cheap
enough for the worker's event loop.

The exchange:

    client-first  n,,n=<user>,r=<client nonce>
    server-first  r=<client nonce><server nonce>,s=<salt b64>,i=<iterations>
    client-final  c=<b64 of the GS2 header>,r=<both nonces>,p=<ClientProof b64>
    server-final  v=<ServerSignature b64>

A user who is not in the file, or whose entry is not `$7$` ($6$ and argon2id
hashes cannot give SaltedPassword), gets a server-first of the same shape as
a known user's, with a salt derived from a secret of this server and the user
name (the same every time: it says nothing about who exists) and the file's
usual iteration count, and fails at the proof like a wrong password (RFC
5802, section 9). The secret is made when this module is first imported, in
the master, before the workers are forked: every worker answers alike.

No channel binding (a client-first of `p=...` fails), no authorization
identity other than the user itself, no SASLprep of the user name (its UTF-8
bytes are the password file's user name as they are).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from collections import Counter

METHOD = b"SCRAM-SHA-512"
# The longest SCRAM message taken (client-first or client-final): a user name
# of the password file, a nonce and a proof fit in far less.
MAX_MESSAGE = 1024
NONCE_BYTES = 18
FAKE_SALT_BYTES = 12            # as mosquitto_passwd and `gw passwd` make them

_SECRET = secrets.token_bytes(32)


class ScramError(Exception):
    """A SCRAM message that does not parse or does not belong to this exchange.
    The message says why (for the log, never to the client)."""


def _h(data: bytes) -> bytes:
    return hashlib.sha512(data).digest()


def _hmac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha512).digest()


def _text(data: bytes) -> str:
    if len(data) > MAX_MESSAGE:
        raise ScramError("message longer than %d bytes" % MAX_MESSAGE)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ScramError("not UTF-8") from None
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in text):
        raise ScramError("control character")
    return text


def _saslname(value: str) -> str:
    """A user name as SCRAM writes it: ',' as '=2C', '=' as '=3D'."""
    out = []
    i = 0
    while i < len(value):
        ch = value[i]
        if ch == ",":
            raise ScramError("',' in a user name")
        if ch == "=":
            esc = value[i:i + 3]
            if esc == "=2C":
                out.append(",")
            elif esc == "=3D":
                out.append("=")
            else:
                raise ScramError("bad escape in a user name")
            i += 3
            continue
        out.append(ch)
        i += 1
    return "".join(out)


def _printable_nonce(value: str) -> bool:
    return bool(value) and all(0x21 <= ord(ch) <= 0x7E and ch != "," for ch in value)


def fake_iterations(users: dict) -> int:
    """The iteration count given to a user without a `$7$` entry: the most
    common of the file's `$7$` entries (a file of one kind shows one count)."""
    counts = Counter(e.iterations for e in users.values() if e.kind == "7")
    if not counts:
        from gw.passwords import PBKDF2_ITERATIONS

        return PBKDF2_ITERATIONS
    return counts.most_common(1)[0][0]


class ScramExchange:
    """One exchange, from a client-first message to the proof's check."""

    __slots__ = ("user", "gs2_header", "nonce", "client_first_bare", "server_first", "stored_key",
                 "server_key", "usable", "other_kind")

    def __init__(self, users: dict, client_first: bytes, iterations_for_unknown: int):
        text = _text(client_first)
        # gs2-header: n|y|p=..., then an optional a=authzid, each followed by ','.
        parts = text.split(",", 2)
        if len(parts) != 3:
            raise ScramError("client-first without a GS2 header")
        flag, authzid, bare = parts
        if flag.startswith("p="):
            raise ScramError("channel binding asked for (not supported)")
        if flag not in ("n", "y"):
            raise ScramError("bad GS2 channel binding flag")
        if authzid and not authzid.startswith("a="):
            raise ScramError("bad authorization identity")
        self.gs2_header = flag + "," + authzid + ","
        fields = bare.split(",")
        if len(fields) < 2 or fields[0].startswith("m="):
            raise ScramError("client-first-bare is not n=...,r=...")
        if not fields[0].startswith("n=") or not fields[1].startswith("r="):
            raise ScramError("client-first-bare is not n=...,r=...")
        user = _saslname(fields[0][2:])
        if not user:
            raise ScramError("empty user name")
        if authzid and _saslname(authzid[2:]) != user:
            raise ScramError("authorization identity other than the user")
        cnonce = fields[1][2:]
        if not _printable_nonce(cnonce):
            raise ScramError("bad client nonce")
        self.user = user.encode("utf-8")
        self.client_first_bare = bare
        self.nonce = cnonce + base64.b64encode(secrets.token_bytes(NONCE_BYTES)).decode()
        entry = users.get(self.user)
        self.usable = entry is not None and entry.kind == "7"
        self.other_kind = "" if entry is None or self.usable else entry.kind    # for the server's log only
        if self.usable:
            salt, iterations, salted = entry.salt, entry.iterations, entry.digest
        else:
            # Keys from a SaltedPassword nobody has (the same work as for a real one).
            salt = _hmac(_SECRET, b"salt\0" + self.user)[:FAKE_SALT_BYTES]
            iterations = iterations_for_unknown
            salted = _hmac(_SECRET, b"key\0" + secrets.token_bytes(16))
        self.stored_key = _h(_hmac(salted, b"Client Key"))
        self.server_key = _hmac(salted, b"Server Key")
        self.server_first = "r=%s,s=%s,i=%d" % (self.nonce, base64.b64encode(salt).decode(), iterations)

    def server_first_message(self) -> bytes:
        return self.server_first.encode()

    def finish(self, client_final: bytes) -> bytes | None:
        """The server-final message (v=...) if the proof holds, None if not;
        ScramError for a message that is not this exchange's client-final."""
        text = _text(client_final)
        head, sep, proof_b64 = text.rpartition(",p=")
        if not sep or "," in proof_b64:
            raise ScramError("client-final without a proof at its end")
        fields = head.split(",")
        if len(fields) < 2 or not fields[0].startswith("c=") or not fields[1].startswith("r="):
            raise ScramError("client-final is not c=...,r=...,p=...")
        try:
            binding = base64.b64decode(fields[0][2:], validate=True)
            proof = base64.b64decode(proof_b64, validate=True)
        except (binascii.Error, ValueError):
            raise ScramError("not base64") from None
        if binding != self.gs2_header.encode():
            raise ScramError("channel binding data other than the GS2 header")
        if fields[1][2:] != self.nonce:
            raise ScramError("nonce other than the exchange's")
        if len(proof) != 64:
            raise ScramError("proof not 64 bytes")
        auth_message = (self.client_first_bare + "," + self.server_first + "," + head).encode()
        # The same work for a user without a $7$ entry (keys nothing matches):
        # the time of the refusal tells nothing either.
        signature = _hmac(self.stored_key, auth_message)
        client_key = bytes(a ^ b for a, b in zip(proof, signature))
        server_final = b"v=" + base64.b64encode(_hmac(self.server_key, auth_message))
        if not hmac.compare_digest(_h(client_key), self.stored_key) or not self.usable:
            return None
        return server_final


def start(authenticator, client_first: bytes) -> ScramExchange:
    """An exchange for a client-first message, against the password file in
    force now (authenticator: gw/auth.py's, or None: no password file)."""
    if authenticator is None:
        raise ScramError("no password file")
    users = authenticator.users
    return ScramExchange(users, client_first, authenticator.scram_iterations())
