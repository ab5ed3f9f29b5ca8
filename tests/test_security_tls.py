"""Client certificates on the TLS listeners (mqtts, jsons, https):
require_certificate with client_cafile, revocation with crlfile (and its
reload on SIGHUP, fail-closed), use_identity_as_username, and the development
client certificates of `gw certs client`. Real clients (the ssl module,
paho-mqtt, mosquitto_pub), real certificates (the gw command, trustme, a CRL
signed with the cryptography package)."""

from __future__ import annotations

import datetime
import shutil
import signal
import socket
import ssl
import stat
import struct
import subprocess
import threading
import uuid
import warnings

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from conftest import (CONNACK_OK, HOST, connect_packet, counter_delta, paho_client_class, ping,
                      read_packet, run_gw, start_paho_thread, stop_paho_thread, tcp_connect,
                      wait_closed, wait_for)
from http_client import HttpConn

NO_CERT, BAD_CERT, REVOKED = "tls_refused_no_cert", "tls_refused_bad_cert", "tls_refused_revoked"


# --- certificates -----------------------------------------------------------------------

def issue(certs_dir, name, out=None):
    """`gw certs client NAME`: (certificate, key) paths, as printed."""
    args = ["certs", "client", name, "--certs", certs_dir] + (["--out", out] if out else [])
    res = run_gw(*args)
    assert res.returncode == 0, res.stderr
    lines = dict(line.split(":", 1) for line in res.stdout.splitlines())
    return lines["certificate"].strip(), lines["key"].strip()


def make_crl(certs_dir, revoked_pems, path):
    """A CRL signed by the development CA (its ca-key.pem) revoking those certificates."""
    ca_cert = x509.load_pem_x509_certificate((certs_dir / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((certs_dir / "ca-key.pem").read_bytes(), None)
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateRevocationListBuilder().issuer_name(ca_cert.subject)
               .last_update(now - datetime.timedelta(minutes=5))
               .next_update(now + datetime.timedelta(days=1)))
    for pem in revoked_pems:
        serial = x509.load_pem_x509_certificate(pem).serial_number
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial)
            .revocation_date(now - datetime.timedelta(minutes=1)).build())
    path.write_bytes(builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    return path


def self_signed(common_name: str, validate: bool = True) -> bytes:
    """A PEM certificate whose subject is just that CN (NUL bytes or any length allowed)."""
    key = ec.generate_private_key(ec.SECP256R1())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)     # past X.509's 64-character bound, on purpose
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name, _validate=validate)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM)


def tls_context(ca, cert=None, key=None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


def foreign_client(tmp_path):
    """A client certificate (CN "intruder") from a CA the server does not trust."""
    other = trustme.CA(organization_name="another CA")
    leaf = other.issue_cert(common_name="intruder")
    cert, key = tmp_path / "intruder.pem", tmp_path / "intruder-key.pem"
    cert.write_bytes(leaf.cert_chain_pems[0].bytes())
    key.write_bytes(leaf.private_key_pem.bytes())
    return cert, key


# --- what a client sees -----------------------------------------------------------------

def mqtt_over_tls(port, ctx, client_id="c"):
    """CONNECT over TLS: the CONNACK (first byte, body), or None when the server
    refused the handshake (TLS 1.3 lets the client finish first: the refusal
    then comes as an alert and a close instead of the CONNACK)."""
    raw = tcp_connect(port)
    try:
        tls = ctx.wrap_socket(raw, server_hostname="localhost")
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
        raw.close()
        return None
    try:
        try:
            tls.sendall(connect_packet(client_id))
            return read_packet(tls)
        except (ssl.SSLError, ConnectionResetError, BrokenPipeError, EOFError):
            return None
    finally:
        tls.close()


def refused(server, port, ctx, counter):
    """The handshake is refused, and counted under `counter` (so the server
    refused it for the certificate, not for anything else)."""
    before = server.counters()
    assert mqtt_over_tls(port, ctx) is None
    after = server.wait_counter(counter, before[counter] + 1)
    assert counter_delta(before, after, counter) == 1
    assert counter_delta(before, after, "tls_handshakes") == 0


def paho_session(port, ca, cert=None, key=None, timeout=10.0):
    """paho-mqtt connects with (or without) a client certificate and, when
    accepted, publishes one QoS 1 message. The CONNACK's code, or None if the
    connection ended without one."""
    mqtt, client_class = paho_client_class()
    client = client_class(mqtt.CallbackAPIVersion.VERSION2, client_id=f"paho-{uuid.uuid4().hex[:8]}",
                          protocol=mqtt.MQTTv311, reconnect_on_failure=False)
    client.tls_set(ca_certs=str(ca), certfile=cert and str(cert), keyfile=key and str(key))
    done = threading.Event()
    result = {}

    def on_connect(client, userdata, flags, reason_code, properties):
        result["rc"] = reason_code.value if hasattr(reason_code, "value") else int(reason_code)
        done.set()

    client.on_connect = on_connect
    client.on_disconnect = lambda *args: done.set()
    try:
        client.connect(HOST, port, 30)
    except (ssl.SSLError, OSError):
        return None
    thread = start_paho_thread(client)
    try:
        done.wait(timeout)
        if result.get("rc") == 0:
            info = client.publish("tls/paho", b"signed", qos=1)
            info.wait_for_publish(timeout)
            assert info.is_published()
            client.disconnect()
        return result.get("rc")
    finally:
        if thread is not None:
            stop_paho_thread(client, thread, timeout)
        elif client.socket() is not None:
            client.socket().close()     # its thread ended already (the server closed)


# --- a server requiring certificates ------------------------------------------------------

@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """A certs directory made by `gw certs client` (the development CA with its
    key, the server certificate) and two client certificates."""
    directory = tmp_path_factory.mktemp("tlscerts") / "certs"
    issue(directory, "sensor-1")
    issue(directory, "sensor-2")
    return directory


@pytest.fixture(scope="module")
def secured(gw_module_factory, certs):
    return gw_module_factory(workers=2, listeners=("mqtts", "jsons", "https"), certs=certs,
                             args=["--require-certificate", "true", "--client-cafile", certs / "ca.pem"])


def test_gw_certs_client_issues_a_certificate_of_the_development_ca(certs, tmp_path):
    cert_path, key_path = issue(certs, "device/7", out=tmp_path / "out")
    assert cert_path == str(tmp_path / "out" / "device_7.pem")
    assert stat.S_IMODE((tmp_path / "out" / "device_7-key.pem").stat().st_mode) == 0o600
    assert stat.S_IMODE((certs / "ca-key.pem").stat().st_mode) == 0o600
    cert = x509.load_pem_x509_certificate((tmp_path / "out" / "device_7.pem").read_bytes())
    ca = x509.load_pem_x509_certificate((certs / "ca.pem").read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "device/7"
    assert cert.issuer == ca.subject
    cert.verify_directly_issued_by(ca)
    usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH in usages


def test_gw_certs_client_refuses_a_directory_without_the_ca_key(certs, tmp_path):
    """A certs directory made before gw kept its CA's key: one line saying what to do."""
    old = tmp_path / "oldcerts"
    shutil.copytree(certs, old)
    (old / "ca-key.pem").unlink()
    res = run_gw("certs", "client", "x", "--certs", old)
    assert res.returncode == 1
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "ca-key.pem" in res.stderr and "move that directory away" in res.stderr
    assert not (old / "x.pem").exists()


def test_client_with_certificate_connects_on_both_workers(secured, certs):
    """A client certificate of the development CA is accepted, by each worker."""
    ctx = tls_context(certs / "ca.pem", certs / "sensor-1.pem", certs / "sensor-1-key.pem")
    workers = set()
    for i in range(40):
        raw = tcp_connect(secured.ports["mqtts"])
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(connect_packet(f"cert-{i}"))
            assert read_packet(tls) == CONNACK_OK
            ping(tls)
            workers.add(secured.which_worker(tls.getsockname()[1]))
        if len(workers) == 2:
            break
    assert len(workers) == 2


def test_resumed_session_with_certificate(secured, certs):
    """A client resuming its TLS session (a ticket from its first connection)
    gets in again: the verifying context has a session id context."""
    ctx = tls_context(certs / "ca.pem", certs / "sensor-1.pem", certs / "sensor-1-key.pem")
    with ctx.wrap_socket(tcp_connect(secured.ports["mqtts"]), server_hostname="localhost") as tls:
        tls.sendall(connect_packet("resume-1"))
        assert read_packet(tls) == CONNACK_OK
        ping(tls)       # the ticket came with the first records after the handshake
        session = tls.session
        issuer = secured.which_worker(tls.getsockname()[1])
    assert session is not None and session.has_ticket
    # Every worker opens the ticket (keys from the master's secret): resume on
    # the other one. Connections that land on the issuer are reset before the handshake.
    for _ in range(60):
        raw = tcp_connect(secured.ports["mqtts"])
        if secured.which_worker(raw.getsockname()[1]) != issuer:
            break
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        raw.close()
    else:
        raise AssertionError("no connection landed on the other worker")
    with ctx.wrap_socket(raw, server_hostname="localhost", session=session) as tls:
        tls.sendall(connect_packet("resume-2"))
        assert read_packet(tls) == CONNACK_OK
        assert tls.session_reused


def test_client_without_certificate_refused_by_every_worker(secured, certs):
    """No certificate: each worker refuses the handshake and counts it in its own row."""
    from gw.stats import Counter

    ctx = tls_context(certs / "ca.pem")
    for _ in range(40):
        refused(secured, secured.ports["mqtts"], ctx, NO_CERT)
        rows = secured.block().rows[:, Counter.TLS_REFUSED_NO_CERT]
        if (rows > 0).all():
            break
    assert (secured.block().rows[:, Counter.TLS_REFUSED_NO_CERT] > 0).all()
    log = secured.log()
    assert "TLS handshake refused: no client certificate (client 127.0.0.1:" in log


def test_certificate_of_another_ca_refused(secured, certs, tmp_path):
    cert, key = foreign_client(tmp_path)
    refused(secured, secured.ports["mqtts"], tls_context(certs / "ca.pem", cert, key), BAD_CERT)
    secured.wait_log("TLS handshake refused: client certificate not valid")


def test_paho_with_and_without_certificate(secured, certs, tmp_path):
    port, ca = secured.ports["mqtts"], certs / "ca.pem"
    before = secured.counters()
    assert paho_session(port, ca, certs / "sensor-2.pem", certs / "sensor-2-key.pem") == 0
    assert paho_session(port, ca) is None
    cert, key = foreign_client(tmp_path)
    assert paho_session(port, ca, cert, key) is None
    after = secured.wait_counter(BAD_CERT, before[BAD_CERT] + 1)
    assert counter_delta(before, after, "mqtt_connected") == 1
    assert counter_delta(before, after, NO_CERT) == 1
    assert counter_delta(before, after, BAD_CERT) == 1


@pytest.mark.skipif(shutil.which("mosquitto_pub") is None, reason="mosquitto clients")
def test_mosquitto_pub_with_and_without_certificate(secured, certs):
    base = ["mosquitto_pub", "-h", HOST, "-p", str(secured.ports["mqtts"]), "-t", "tls/mosq", "-m", "hi",
            "-q", "1", "--cafile", str(certs / "ca.pem")]
    before = secured.counters()
    ok = subprocess.run(base + ["--cert", str(certs / "sensor-1.pem"), "--key", str(certs / "sensor-1-key.pem")],
                        capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run(base, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert bad.returncode != 0
    after = secured.wait_counter(NO_CERT, before[NO_CERT] + 1)
    assert counter_delta(before, after, "mqtt_connected") == 1
    assert counter_delta(before, after, "packets_out.puback") == 1


def test_json_lines_and_https_refuse_a_client_without_certificate(secured, certs):
    with_cert = tls_context(certs / "ca.pem", certs / "sensor-1.pem", certs / "sensor-1-key.pem")
    without = tls_context(certs / "ca.pem")
    # JSON lines over TLS.
    raw = tcp_connect(secured.ports["jsons"])
    with with_cert.wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(b'{"message_type": "Connect", "client_id": "json-cert"}\n')
        tls.settimeout(10)
        assert b'"Connected"' in tls.recv(4096)
    before = secured.counters()
    raw = tcp_connect(secured.ports["jsons"])
    try:
        tls = without.wrap_socket(raw, server_hostname="localhost")
        tls.sendall(b'{"message_type": "Connect", "client_id": "json-none"}\n')
        assert wait_closed(tls) == b""
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
        pass
    finally:
        raw.close()
    secured.wait_counter(NO_CERT, before[NO_CERT] + 1)
    # HTTPS.
    with HttpConn(secured.ports["https"], tls_context=with_cert) as conn:
        assert conn.request("GET", "/healthz").status == 200
    before = secured.counters()
    try:
        conn = HttpConn(secured.ports["https"], tls_context=without)
        conn.request("GET", "/healthz", send_only=True)
        assert conn.wait_closed() == b""
        conn.close()
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
        pass
    after = secured.wait_counter(NO_CERT, before[NO_CERT] + 1)
    assert counter_delta(before, after, "http_requests.200") == 0


def test_refusals_in_stats_and_metrics(secured, certs):
    refused(secured, secured.ports["mqtts"], tls_context(certs / "ca.pem"), NO_CERT)
    stats = secured.stats()
    assert stats["counters"][NO_CERT] >= 1
    with HttpConn(secured.ports["https"],
                  tls_context=tls_context(certs / "ca.pem", certs / "sensor-1.pem",
                                          certs / "sensor-1-key.pem")) as conn:
        body = conn.request("GET", "/metrics").body.decode()
    line = next(l for l in body.splitlines()
                if l.startswith('gw_tls_client_certificates_refused_total{reason="no_certificate"}'))
    assert int(float(line.split()[-1])) >= 1


def test_handshake_through_fragmenting_proxy(gw_factory, certs):
    """Every handshake byte re-cut at random points: the certificate is still
    verified, and a client without one still refused."""
    gw = gw_factory(workers=1, listeners=("mqtts",), certs=certs, fragment=True,
                    args=["--require-certificate", "true", "--client-cafile", certs / "ca.pem"])
    ctx = tls_context(certs / "ca.pem", certs / "sensor-1.pem", certs / "sensor-1-key.pem")
    assert mqtt_over_tls(gw.ports["mqtts"], ctx) == CONNACK_OK
    refused(gw, gw.ports["mqtts"], tls_context(certs / "ca.pem"), NO_CERT)


# --- revocation ------------------------------------------------------------------------

def test_revoked_certificate_refused(gw_factory, certs, tmp_path):
    revoked_cert, revoked_key = issue(certs, "revoked-1", out=tmp_path)
    crl = make_crl(certs, [open(revoked_cert, "rb").read()], tmp_path / "crl.pem")
    gw = gw_factory(workers=2, listeners=("mqtts",), certs=certs,
                    args=["--require-certificate", "true", "--client-cafile", certs / "ca.pem",
                          "--crlfile", crl])
    port = gw.ports["mqtts"]
    refused(gw, port, tls_context(certs / "ca.pem", revoked_cert, revoked_key), REVOKED)
    gw.wait_log("TLS handshake refused: client certificate revoked")
    good = tls_context(certs / "ca.pem", certs / "sensor-1.pem", certs / "sensor-1-key.pem")
    assert mqtt_over_tls(port, good) == CONNACK_OK


def _write_config(path, certs, crl=None):
    lines = ["require_certificate = true", f'client_cafile = "{certs / "ca.pem"}"', 'log_level = "debug"']
    if crl is not None:
        lines.append(f'crlfile = "{crl}"')
    path.write_text("\n".join(lines) + "\n")


def _reload(gw):
    counts = [gw.log().count(f"worker {i}: reloaded") for i in range(gw.workers)]
    gw.signal(signal.SIGHUP)
    wait_for(lambda: all(gw.log().count(f"worker {i}: reloaded") > counts[i] for i in range(gw.workers)),
             10, what="both workers to reload")


def test_reload_adds_a_crl_and_a_broken_one_keeps_it(gw_factory, certs, tmp_path):
    """SIGHUP with a CRL now in the config: new handshakes of the revoked
    certificate are refused on both workers, established connections stay. Then a
    CRL file that does not parse: the reload is refused, and the CRL in force
    stays in force (never back to allowing everyone)."""
    from gw.stats import Counter

    cert, key = issue(certs, "soon-revoked", out=tmp_path)
    config = tmp_path / "gw.toml"
    _write_config(config, certs)
    gw = gw_factory(workers=2, listeners=("mqtts",), certs=certs, config=config)
    port = gw.ports["mqtts"]
    ctx = tls_context(certs / "ca.pem", cert, key)
    established = ctx.wrap_socket(tcp_connect(port), server_hostname="localhost")
    try:
        established.sendall(connect_packet("established"))
        assert read_packet(established) == CONNACK_OK
        ping(established)       # the session ticket came before the PINGRESP
        ticket = established.session
        assert ticket is not None and ticket.has_ticket
        crl = make_crl(certs, [open(cert, "rb").read()], tmp_path / "crl.pem")
        _write_config(config, certs, crl)
        _reload(gw)
        for _ in range(40):     # new handshakes, until each worker refused one
            refused(gw, port, ctx, REVOKED)
            if (gw.block().rows[:, Counter.TLS_REFUSED_REVOKED] > 0).all():
                break
        assert (gw.block().rows[:, Counter.TLS_REFUSED_REVOKED] > 0).all()
        ping(established)       # kept its context
        # A ticket from before the reload (the certificate was valid then) does
        # not resume past it: the CRL changed the keys, the handshake is a full
        # one, and the certificate is refused.
        for _ in range(6):
            before = gw.counters()
            with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError, EOFError)):
                with ctx.wrap_socket(tcp_connect(port), server_hostname="localhost", session=ticket) as tls:
                    tls.sendall(connect_packet("with-old-ticket"))
                    read_packet(tls)
            after = gw.wait_counter(REVOKED, before[REVOKED] + 1)
            assert counter_delta(before, after, "tls_resumed") == 0
        # A CRL file that does not parse: refused by the master, the old CRL stays.
        (tmp_path / "crl.pem").write_text("-----BEGIN X509 CRL-----\nnot base64\n-----END X509 CRL-----\n")
        mark = len(gw.log())
        gw.signal(signal.SIGHUP)
        wait_for(lambda: "reload refused, certificates do not load" in gw.log()[mark:], 10,
                 what="the reload to be refused")
        for _ in range(4):
            refused(gw, port, ctx, REVOKED)
        ping(established)
    finally:
        established.close()


# --- use_identity_as_username ------------------------------------------------------------

def test_identity_as_username(gw_factory, certs, tmp_path):
    """With use_identity_as_username the certificate's CN is the user name: a
    certificate whose subject has no CN gives none, and the CONNECT is refused
    with CONNACK 4 (bad user name or password) and counted."""
    gw = gw_factory(workers=1, listeners=("mqtts",), certs=certs,
                    args=["--require-certificate", "true", "--client-cafile", certs / "ca.pem",
                          "--use-identity-as-username", "true"])
    port = gw.ports["mqtts"]
    good = tls_context(certs / "ca.pem", certs / "sensor-1.pem", certs / "sensor-1-key.pem")
    assert mqtt_over_tls(port, good) == CONNACK_OK
    # The development CA's key issues one without a CN (a DNS name only).
    ca = trustme.CA.from_pem((certs / "ca.pem").read_bytes(), (certs / "ca-key.pem").read_bytes())
    leaf = ca.issue_cert("no-cn.example")
    (tmp_path / "nocn.pem").write_bytes(leaf.cert_chain_pems[0].bytes())
    (tmp_path / "nocn-key.pem").write_bytes(leaf.private_key_pem.bytes())
    before = gw.counters()
    nocn = tls_context(certs / "ca.pem", tmp_path / "nocn.pem", tmp_path / "nocn-key.pem")
    assert mqtt_over_tls(port, nocn) == (0x20, b"\x00\x04")
    after = gw.counters()
    assert counter_delta(before, after, BAD_CERT) == 1
    assert counter_delta(before, after, "tls_handshakes") == 1
    gw.wait_log("no common name in the certificate's subject")


def test_common_name_checks():
    """The worker's CN check: the subject's CN as bytes; refused when absent,
    with a NUL byte or a control character (mqtt_control_characters' default),
    or over 65,535 bytes."""
    from gw_ext.tls import certificate_common_name

    assert certificate_common_name(self_signed("sensor-9")) == b"sensor-9"
    assert certificate_common_name(self_signed("caf\u00e9")) == "caf\u00e9".encode()
    with pytest.raises(ValueError, match="NUL"):
        certificate_common_name(self_signed("evil\x00admin", validate=False))
    from gw_ext import codec

    was = codec.control_characters_allowed()
    try:
        codec.allow_control_characters(False)
        with pytest.raises(ValueError, match="control character"):
            certificate_common_name(self_signed("bell\x07"))
        codec.allow_control_characters(True)        # mqtt_control_characters = "accept"
        assert certificate_common_name(self_signed("bell\x07")) == b"bell\x07"
    finally:
        codec.allow_control_characters(was)
    with pytest.raises(ValueError, match="65,535"):
        certificate_common_name(self_signed("x" * 65536, validate=False))
    assert len(certificate_common_name(self_signed("y" * 65535, validate=False))) == 65535
    leaf = trustme.CA().issue_cert("host.example")       # no CN in its subject
    with pytest.raises(ValueError, match="no common name"):
        certificate_common_name(leaf.cert_chain_pems[0].bytes())
    with pytest.raises(ValueError, match="not a PEM certificate"):
        certificate_common_name(b"garbage")


# --- start-up ---------------------------------------------------------------------------

def test_require_certificate_without_client_cafile_stops_at_start(tmp_path):
    res = run_gw("serve", "--require-certificate", "true", "--mqtt", "off", "--mqtts", f"{HOST}:0",
                 "--json", "off", "--jsons", "off", "--http", "off", "--https", "off", "--ws", "off", "--wss", "off",
                 "--data-dir", tmp_path / "data", "--certs", tmp_path / "certs", cwd=tmp_path, timeout=60)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "client_cafile" in lines[0] and "require_certificate" in lines[0], res.stderr


def test_crlfile_with_a_bad_crl_after_a_good_one_stops_at_start(certs, tmp_path):
    """Every CRL of the file loads, or none is in force: a damaged second one
    (its revocations would be left out) stops gw serve, naming its line."""
    good = make_crl(certs, [], tmp_path / "good.pem").read_text()
    lines = good.splitlines()
    damaged = "\n".join(lines[:1] + ["A" * 64] + lines[2:]) + "\n"
    (tmp_path / "crl.pem").write_text(good + damaged)
    res = run_gw("serve", "--require-certificate", "true", "--client-cafile", certs / "ca.pem",
                 "--crlfile", tmp_path / "crl.pem", "--mqtt", "off", "--mqtts", f"{HOST}:0",
                 "--json", "off", "--jsons", "off", "--http", "off", "--https", "off", "--ws", "off", "--wss", "off",
                 "--data-dir", tmp_path / "data", "--certs", certs, cwd=tmp_path, timeout=60)
    assert res.returncode == 1
    out = res.stderr.strip().splitlines()
    assert len(out) == 1, res.stderr
    assert f"beginning on line {len(good.splitlines()) + 1}" in out[0]


def test_client_cafile_that_does_not_load_stops_at_start(tmp_path):
    (tmp_path / "ca.pem").write_text("not a certificate\n")
    res = run_gw("serve", "--require-certificate", "true", "--client-cafile", tmp_path / "ca.pem",
                 "--mqtt", "off", "--mqtts", f"{HOST}:0", "--json", "off", "--jsons", "off",
                 "--http", "off", "--https", "off", "--ws", "off", "--wss", "off", "--data-dir", tmp_path / "data",
                 "--certs", tmp_path / "certs", cwd=tmp_path, timeout=60)
    assert res.returncode == 1
    lines = [l for l in res.stderr.strip().splitlines() if "generated a development CA" not in l]
    assert len(lines) == 1 and "client_cafile" in lines[0], res.stderr


@pytest.mark.parametrize("args, needles", [
    (["--require-certificate", "maybe"], ["--require-certificate", "maybe"]),
    (["--use-identity-as-username", "true"], ["use_identity_as_username", "require_certificate"]),
    (["--crlfile", "crl.pem"], ["crlfile", "require_certificate"]),
])
def test_bad_client_certificate_settings_are_one_line_errors(tmp_path, args, needles):
    res = run_gw("serve", *args, "--data-dir", tmp_path / "data", cwd=tmp_path)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    for needle in needles:
        assert needle in lines[0]


def test_toml_booleans(tmp_path):
    from gw.config import ConfigError, load_config

    path = tmp_path / "gw.toml"
    path.write_text(f'require_certificate = true\nclient_cafile = "{tmp_path / "ca.pem"}"\n')
    cfg = load_config(str(path))
    assert cfg.require_certificate is True and cfg.use_identity_as_username is False
    path.write_text("require_certificate = 1\n")
    with pytest.raises(ConfigError, match="'require_certificate': expected true or false"):
        load_config(str(path))


def test_certificate_required_only_on_tls_listeners(tmp_path):
    """What the start-up check of listeners off loopback counts as authentication."""
    from gw.config import LISTENER_KEYS, certificate_required, load_config

    on = load_config(None, {"require_certificate": True, "client_cafile": str(tmp_path / "ca.pem")})
    off = load_config(None, {})
    assert [k for k in LISTENER_KEYS if certificate_required(on, k)] == ["mqtts", "jsons", "https", "wss"]
    assert not any(certificate_required(off, k) for k in LISTENER_KEYS)
