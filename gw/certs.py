"""Server certificates: the user's own, or a development CA made with trustme.

A directory holding cert.pem (the chain) and key.pem is used as it is. When
either is missing, gw makes a development CA (ECDSA P-256) and a server
certificate for localhost, 127.0.0.1 and ::1, writes ca.pem, cert.pem and
key.pem (mode 0600), and says which file clients must trust.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger("gw.certs")

CERT = "cert.pem"
KEY = "key.pem"
CA = "ca.pem"


class CertPaths:
    def __init__(self, directory: Path):
        self.dir = directory
        self.cert = directory / CERT
        self.key = directory / KEY
        self.ca = directory / CA


def ensure_certs(directory: str | os.PathLike) -> tuple[CertPaths, bool]:
    """Returns the paths and whether a development CA was generated just now."""
    paths = CertPaths(Path(directory))
    if paths.cert.exists() and paths.key.exists():
        return paths, False
    import trustme

    paths.dir.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA(organization_name="gw development CA")
    leaf = ca.issue_cert("localhost", "127.0.0.1", "::1", common_name="localhost")
    # Write the key first with its final mode, so it is never readable by others.
    fd = os.open(paths.key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(leaf.private_key_pem.bytes())
    os.chmod(paths.key, 0o600)
    paths.cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    paths.ca.write_bytes(ca.cert_pem.bytes())
    return paths, True
