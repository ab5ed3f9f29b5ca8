"""Certificates and TLS policy of the MQTT-over-TLS listener: a development CA
is generated on first run, user certificates are served as they are, TLS 1.2
is the minimum and only forward-secret AEAD suites are offered."""

from __future__ import annotations

import re
import ssl
import stat
import subprocess

import pytest
import trustme

from conftest import (client_tls_context, connect_packet, counter_delta, mqtt_client, ping,
                      tcp_connect, tls_connect, wait_closed)


@pytest.fixture(scope="module")
def server(gw_module_factory):
    # The certs dir does not exist yet: the first run generates the development CA.
    return gw_module_factory(workers=2, listeners=("mqtt", "mqtts"))


def test_first_run_generates_ca_and_server_certificate(server):
    certs = server.certs_dir
    for name in ("ca.pem", "cert.pem", "key.pem"):
        assert (certs / name).is_file(), name
    assert stat.S_IMODE((certs / "key.pem").stat().st_mode) == 0o600
    assert f"clients must trust {certs / 'ca.pem'}" in server.log()     # on stderr
    assert "clients must trust" not in server.stdout()
    # The served certificate chains to that CA and names 127.0.0.1 and localhost.
    ctx = client_tls_context(server.ca)
    with tls_connect(server.ports["mqtts"], ctx) as tls:
        assert tls.version() in ("TLSv1.2", "TLSv1.3")
        names = {v for _, v in tls.getpeercert()["subjectAltName"]}
        assert {"localhost", "127.0.0.1"} <= names


def test_second_run_reuses_generated_certificates(server, gw_factory):
    before = {n: (server.certs_dir / n).read_bytes() for n in ("ca.pem", "cert.pem", "key.pem")}
    again = gw_factory(workers=1, listeners=("mqtts",), certs=server.certs_dir)
    assert "generated a development CA" not in again.log()
    for name, data in before.items():
        assert (server.certs_dir / name).read_bytes() == data, name
    with tls_connect(again.ports["mqtts"], client_tls_context(server.ca)):
        pass


def test_user_certificates_are_served_as_is(tmp_path, gw_factory):
    ca = trustme.CA(organization_name="user CA", key_type=trustme.KeyType.RSA)
    leaf = ca.issue_cert("localhost", "127.0.0.1", key_type=trustme.KeyType.RSA)
    certs = tmp_path / "mycerts"
    certs.mkdir()
    (certs / "cert.pem").write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
    (certs / "key.pem").write_bytes(leaf.private_key_pem.bytes())
    gw = gw_factory(workers=1, listeners=("mqtt", "mqtts"), certs=certs)
    assert "generated a development CA" not in gw.log()
    assert not (certs / "ca.pem").exists()
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    with tls_connect(gw.ports["mqtts"], ctx) as tls:
        served = tls.getpeercert(binary_form=True)
    assert served == ssl.PEM_cert_to_DER_cert(leaf.cert_chain_pems[0].bytes().decode())
    # ...and MQTT works over it.
    with mqtt_client(gw.ports["mqtts"], "user-cert", tls=ctx) as sock:
        ping(sock)


def _refused(server, ctx):
    """The handshake fails, and the server counted a failed handshake (so it was
    the server that refused, not the client that could not even offer it)."""
    before = server.counters()
    raw = tcp_connect(server.ports["mqtts"])
    with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)) as info:
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.recv(1)
    raw.close()
    after = server.wait_counter("tls_failures", before["tls_failures"] + 1)
    assert counter_delta(before, after, "tls_failures") == 1
    assert counter_delta(before, after, "tls_handshakes") == 0
    return info.value


@pytest.fixture(autouse=True)
def _old_tls_is_the_point(recwarn):
    yield     # ssl.TLSVersion.TLSv1/TLSv1_1 are deprecated: offering them is the test


def _permissive_client(max_version, ciphers):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1
    ctx.maximum_version = max_version
    ctx.set_ciphers(ciphers)
    return ctx


def test_tls_1_1_client_refused(server):
    # SECLEVEL=0 lets this client really offer TLS 1.1 (OpenSSL 3 would not otherwise).
    err = _refused(server, _permissive_client(ssl.TLSVersion.TLSv1_1, "DEFAULT:@SECLEVEL=0"))
    assert "PROTOCOL_VERSION" in str(err).upper(), err  # the server's alert


def test_tls_1_2_without_forward_secrecy_refused(server):
    _refused(server, _permissive_client(ssl.TLSVersion.TLSv1_2, "AES128-SHA256"))


def test_tls_1_2_ecdhe_ecdsa_aes128_gcm_accepted(server):
    ctx = client_tls_context(server.ca)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers("ECDHE-ECDSA-AES128-GCM-SHA256")
    before = server.counters()
    with mqtt_client(server.ports["mqtts"], "tls12", tls=ctx) as sock:
        assert sock.version() == "TLSv1.2"
        assert sock.cipher()[0] == "ECDHE-ECDSA-AES128-GCM-SHA256"
        ping(sock)
    assert counter_delta(before, server.counters(), "tls_handshakes") == 1


def test_tls_1_3_accepted(server):
    ctx = client_tls_context(server.ca)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    with mqtt_client(server.ports["mqtts"], "tls13", tls=ctx) as sock:
        assert sock.version() == "TLSv1.3"
        ping(sock)


def test_plain_mqtt_on_the_tls_port_is_a_tls_failure(server):
    before = server.counters()
    with tcp_connect(server.ports["mqtts"]) as sock:
        sock.sendall(connect_packet(b"plain"))
        wait_closed(sock)
    after = server.wait_counter("tls_failures", before["tls_failures"] + 1)
    assert counter_delta(before, after, "mqtt_connected") == 0


def _served_chain(port, client_cert, client_key):
    """The certificates the server sends, in order, as DER (openssl s_client
    -showcerts, with a client certificate)."""
    res = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost",
                          "-showcerts", "-cert", str(client_cert), "-key", str(client_key)],
                         input=b"", capture_output=True, timeout=60)
    pems = re.findall(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", res.stdout, re.S)
    assert pems, res.stdout.decode(errors="replace") + res.stderr.decode(errors="replace")
    return [ssl.PEM_cert_to_DER_cert(p.decode()) for p in pems]


@pytest.mark.parametrize("file_holds_chain", [False, True])
def test_served_chain_from_the_store_or_the_file(tmp_path, gw_factory, file_holds_chain):
    """A cert.pem holding only the server's certificate is sent with the chain
    built from the CAs of client_cafile (built once, when the context is made:
    what OpenSSL built again in every handshake before), so a client trusting
    only the root verifies it; one holding a chain is sent as it is."""
    root = trustme.CA(organization_name="root CA")
    inter = root.create_child_ca()
    leaf = inter.issue_cert("localhost", "127.0.0.1")
    device = inter.issue_cert("device-1")
    certs = tmp_path / "certs"
    certs.mkdir()
    pems = leaf.cert_chain_pems if file_holds_chain else leaf.cert_chain_pems[:1]
    (certs / "cert.pem").write_bytes(b"".join(p.bytes() for p in pems))
    (certs / "key.pem").write_bytes(leaf.private_key_pem.bytes())
    (tmp_path / "client-ca.pem").write_bytes(inter.cert_pem.bytes() + root.cert_pem.bytes())
    device.cert_chain_pems[0].write_to_path(str(tmp_path / "device.pem"))
    device.private_key_pem.write_to_path(str(tmp_path / "device-key.pem"))
    gw = gw_factory(workers=1, listeners=("mqtts",), certs=certs,
                    args=["--require-certificate", "true", "--client-cafile", tmp_path / "client-ca.pem"])
    der = [ssl.PEM_cert_to_DER_cert(p.bytes().decode()) for p in (leaf.cert_chain_pems[0], inter.cert_pem,
                                                                   root.cert_pem)]
    for _ in range(2):      # the same in every handshake
        served = _served_chain(gw.ports["mqtts"], tmp_path / "device.pem", tmp_path / "device-key.pem")
        assert served == (der[:2] if file_holds_chain else der)
    ctx = ssl.create_default_context()
    root.configure_trust(ctx)
    ctx.load_cert_chain(tmp_path / "device.pem", tmp_path / "device-key.pem")
    with mqtt_client(gw.ports["mqtts"], "chain-1", tls=ctx) as sock:
        ping(sock)
