"""Server certificates: the user's own, or a development CA made with trustme.

A directory holding cert.pem (the chain) and key.pem is used as it is. When
either is missing, gw makes a development CA (ECDSA P-256) and a server
certificate for localhost, 127.0.0.1 and ::1, writes ca.pem, ca-key.pem (mode
0600: `gw certs client` issues client certificates with it), cert.pem and
key.pem (mode 0600), and says which file clients must trust. A directory made
before gw kept the CA's key has no ca-key.pem: it serves as before, and
`gw certs client` says how to make a new one.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger("gw.certs")

CERT = "cert.pem"
KEY = "key.pem"
CA = "ca.pem"
CA_KEY = "ca-key.pem"


class CertError(Exception):
    """A certificate cannot be issued; the message says why and what to do."""


class CertPaths:
    def __init__(self, directory: Path):
        self.dir = directory
        self.cert = directory / CERT
        self.key = directory / KEY
        self.ca = directory / CA
        self.ca_key = directory / CA_KEY


def server_context(paths: CertPaths, cfg):
    """The TLS context of every TLS listener: the server certificate, and with
    require_certificate the client CA and CRLs (gw_ext.tls.TLSError if a file
    does not load)."""
    from gw_ext.tls import TLSContext

    return TLSContext(str(paths.cert), str(paths.key), cfg.client_cafile, cfg.crlfile,
                      cfg.require_certificate, cfg.use_identity_as_username)


def ensure_certs(directory: str | os.PathLike) -> tuple[CertPaths, bool]:
    """Returns the paths and whether a development CA was generated just now."""
    paths = CertPaths(Path(directory))
    if paths.cert.exists() and paths.key.exists():
        return paths, False
    import trustme

    paths.dir.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA(organization_name="gw development CA")
    leaf = ca.issue_cert("localhost", "127.0.0.1", "::1", common_name="localhost")
    write_private(paths.ca_key, ca.private_key_pem.bytes())
    write_private(paths.key, leaf.private_key_pem.bytes())
    paths.cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    paths.ca.write_bytes(ca.cert_pem.bytes())
    return paths, True


def ensure_certs_apart(directory: str | os.PathLike) -> tuple[CertPaths, bool]:
    """ensure_certs, with a generation done in a child process: making the
    certificates loads trustme and cryptography (about 10 MiB), which the
    master, whose pages every worker inherits, then never maps. CertError
    saying why when the child could not make them."""
    paths = CertPaths(Path(directory))
    if paths.cert.exists() and paths.key.exists():
        return paths, False
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.close(r)
            ensure_certs(directory)
        except BaseException as exc:       # noqa: BLE001 (said to the parent, which raises it)
            code = 1
            os.write(w, f"{type(exc).__name__}: {exc}".encode(errors="replace")[:4096])
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as pipe:
        said = pipe.read().decode(errors="replace")
    _, status = os.waitpid(pid, 0)
    if status != 0 or not (paths.cert.exists() and paths.key.exists()):
        raise CertError(f"cannot make development certificates in {paths.dir}: {said or f'wait status {status}'}")
    return paths, True


def write_private(path: Path, data: bytes) -> None:
    """A key file, created with mode 0600 before anything is written to it, so it
    is never readable by others."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, 0o600)


def client_file_stem(name: str) -> str:
    """A file name for a client's certificate: its name with anything but
    letters, digits, '.', '-' and '_' replaced by '_'."""
    stem = "".join(ch if ch.isascii() and (ch.isalnum() or ch in "._-") else "_" for ch in name)
    return stem.lstrip(".") or "client"


def issue_client_cert(directory: str | os.PathLike, name: str,
                      out: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """A development client certificate (NAME as its subject's CN) and its key,
    signed by the development CA of a certs directory (made now if absent).
    Written to out (default: the certs directory) as NAME.pem and NAME-key.pem
    (0600); returns their paths."""
    if not name or len(name) > 64:
        raise CertError(f"a client name must be 1-64 characters (X.509's bound for a common name), got {name!r}")
    paths, _generated = ensure_certs(directory)
    if not paths.ca_key.exists():
        if paths.ca.exists():
            raise CertError(f"{paths.dir} holds a development CA made without its key ({CA_KEY}), so it "
                            f"cannot issue certificates: move that directory away and run gw again to make "
                            f"a new CA (clients must then trust the new {CA})")
        raise CertError(f"{paths.dir} holds certificates gw did not make (no {CA_KEY}): issue client "
                        f"certificates with the CA that made them")
    import trustme

    ca = trustme.CA.from_pem(paths.ca.read_bytes(), paths.ca_key.read_bytes())
    leaf = ca.issue_cert(common_name=name)
    target = Path(out) if out is not None else paths.dir
    target.mkdir(parents=True, exist_ok=True)
    stem = client_file_stem(name)
    cert_path, key_path = target / f"{stem}.pem", target / f"{stem}-key.pem"
    write_private(key_path, leaf.private_key_pem.bytes())
    cert_path.write_bytes(leaf.cert_chain_pems[0].bytes())
    return cert_path, key_path
