"""The security parts together: identities proved by a password or by a
client certificate, confined by the ACL's `%u` and `%c` patterns, and the
complete example configuration of README's "Securing a deployment" served
off loopback. Real `gw serve`, real TLS with certificates issued by
`gw certs client`, a password file made by `gw passwd`, raw MQTT clients and
urllib for HTTP."""

from __future__ import annotations

import re
import ssl
import struct
import urllib.error
import urllib.request
from pathlib import Path

from conftest import HOST, free_ports, publish_packet, read_packet, run_gw, subscribe_packet, tcp_connect
from mqtt_bytes import connect_packet
from test_security_tls import issue, make_crl, tls_context

README = Path(__file__).resolve().parent.parent / "README.md"


class TlsClient:
    """An MQTT client over TLS; `code` is its CONNACK's return code, or None
    when the handshake was refused (TLS 1.3 may report that at the first read)."""

    def __init__(self, port: int, ctx: ssl.SSLContext, client_id: str, user=None, password=None):
        self.sock = None
        self.code = None
        raw = tcp_connect(port)
        try:
            self.sock = ctx.wrap_socket(raw, server_hostname="localhost")
            self.sock.sendall(connect_packet(client_id, user=user, password=password))
            first, body = read_packet(self.sock)
        except (ssl.SSLError, ConnectionResetError, BrokenPipeError, EOFError):
            raw.close()
            self.sock = None
            return
        assert first == 0x20 and len(body) == 2, (first, body)
        self.code = body[1]

    def subscribe(self, topic_filter: str) -> int:
        self.sock.sendall(subscribe_packet(1, [(topic_filter, 1)]))
        first, body = read_packet(self.sock)
        assert first == 0x90, (first, body)
        return body[2]

    def publish(self, topic: str, payload: bytes, pid: int) -> None:
        """QoS 1; returns once PUBACKed (a refused publish is acknowledged too)."""
        self.sock.sendall(publish_packet(topic, payload, qos=1, packet_id=pid))
        first, body = read_packet(self.sock)
        assert (first, body) == (0x40, struct.pack("!H", pid)), (first, body)

    def next_message(self) -> tuple[str, bytes]:
        first, body = read_packet(self.sock)
        assert first & 0xF0 == 0x30, (first, body)
        n = struct.unpack_from("!H", body)[0]
        topic = body[2:2 + n].decode()
        rest = body[2 + n:]
        if first & 0x06:
            pid = rest[:2]
            rest = rest[2:]
            self.sock.sendall(b"\x40\x02" + pid)
        return topic, rest

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()


def publish_refused(server, client: TlsClient, topic: str) -> None:
    """A publish the ACL refuses: acknowledged all the same, and counted."""
    before = server.counters()["acl_publish_denied"]
    client.publish(topic, b"forged", 1)
    server.wait_counter("acl_publish_denied", before + 1)


def readme_block(after: str, fence: str) -> str:
    """The first fenced block of that kind after a heading of README."""
    text = README.read_text()
    start = text.index(after)
    match = re.compile(r"```" + fence + r"\n(.*?)```", re.S).search(text, start)
    return match.group(1)


def test_the_readme_acl_examples_parse_as_they_say():
    """The ACL file of "Access control (ACL)" and the example's: every line
    parses, and a comment is never taken into a user name or a filter."""
    from gw.acl import parse_acl

    section = parse_acl(readme_block("### Access control (ACL)", ""))
    assert set(section.users) == {b"alice", b"bob"}
    assert [f for _, f in section.users[b"alice"]] == [b"alice/#", b"alice/secret", b"sensors/#"]
    example = parse_acl(readme_block("with `/etc/gw/acl`:", ""))
    assert set(example.users) == {b"ops"}
    assert len(example.patterns) == 3


def test_the_readme_example_serves_off_loopback(gw_factory, tmp_path):
    """README's complete example, with its paths moved into a temporary
    directory and its ports made free ones: it starts on 0.0.0.0, and each
    part of it holds at once."""
    certs = tmp_path / "certs"
    issue(certs, "sensor-1")
    issue(certs, "ops")
    crl = make_crl(certs, [], tmp_path / "clients-crl.pem")
    passwd = tmp_path / "passwd"
    for user, password in (("sensor-1", "s3cret-1"), ("ops", "ops-pass")):
        res = run_gw("passwd", "-b", *(["-c"] if user == "sensor-1" else []), str(passwd), user, password)
        assert res.returncode == 0, res.stderr
    acl = tmp_path / "acl"
    acl.write_text(readme_block("with `/etc/gw/acl`:", ""))
    ports = dict(zip(("mqtts", "jsons", "https", "http"), free_ports(4)))
    config = readme_block("## Securing a deployment", "toml")
    for path, here in (("/etc/gw/passwd", passwd), ("/etc/gw/acl", acl), ("/etc/gw/certs", certs),
                       ("/etc/gw/clients-ca.pem", certs / "ca.pem"), ("/etc/gw/clients-crl.pem", crl),
                       ("/var/lib/gw", tmp_path / "data")):
        assert f'"{path}"' in config, path
        config = config.replace(f'"{path}"', f'"{here}"')
    for name, port in ports.items():
        config, n = re.subn(rf'^{name} = "([0-9.]+):\d+"', rf'{name} = "\g<1>:{port}"', config, flags=re.M)
        assert n == 1, name
    assert f'mqtts = "0.0.0.0:{ports["mqtts"]}"' in config
    conf = tmp_path / "gw.toml"
    conf.write_text(config)
    server = gw_factory(workers=2, ports=ports, data_dir=tmp_path / "data", certs=certs,
                        argv=["--config", conf, "--workers", "2", "--stats-interval", "0"])

    ctx = tls_context(certs / "ca.pem", certs / "sensor-1.pem", certs / "sensor-1-key.pem")
    ops_ctx = tls_context(certs / "ca.pem", certs / "ops.pem", certs / "ops-key.pem")
    port = ports["mqtts"]
    # No certificate: the handshake is refused. A certificate but no user name
    # or a wrong password: the CONNECT is.
    assert TlsClient(port, tls_context(certs / "ca.pem"), "sensor-1", "sensor-1", "s3cret-1").code is None
    assert TlsClient(port, ctx, "sensor-1").code == 0x05
    assert TlsClient(port, ctx, "sensor-1", "sensor-1", "wrong").code == 0x04
    ops = TlsClient(port, ops_ctx, "dashboard", "ops", "ops-pass")
    sensor = TlsClient(port, ctx, "sensor-1", "sensor-1", "s3cret-1")
    try:
        assert (ops.code, sensor.code) == (0, 0)
        assert ops.subscribe("telemetry/#") == 1
        # The pattern lines confine the device to its own topics: another
        # device's telemetry is acknowledged and dropped.
        publish_refused(server, sensor, "telemetry/sensor-2/temp")
        sensor.publish("telemetry/sensor-1/temp", b"21.5", 2)
        assert ops.next_message() == ("telemetry/sensor-1/temp", b"21.5")
        assert sensor.subscribe("devices/sensor-1/commands/#") == 1
        assert sensor.subscribe("devices/sensor-2/commands/#") == 0x80
        ops.publish("devices/sensor-1/commands/reboot", b"now", 3)
        assert sensor.next_message() == ("devices/sensor-1/commands/reboot", b"now")
    finally:
        ops.close()
        sensor.close()
    # The HTTP API asks for a token, on loopback too (http_auth = "token").
    try:
        urllib.request.urlopen(f"http://{HOST}:{ports['http']}/metrics", timeout=10)
        raise AssertionError("/metrics answered without a token")
    except urllib.error.HTTPError as exc:
        assert exc.code == 401
        assert exc.headers["WWW-Authenticate"].startswith("Bearer")
    with urllib.request.urlopen(f"http://{HOST}:{ports['http']}/healthz", timeout=10) as r:
        assert r.status == 200


def test_certificate_identity_confined_by_user_patterns(gw_factory, tmp_path):
    """use_identity_as_username: the certificate's CN is the user the ACL's
    `%u` names, whatever user name the CONNECT claims, and no password is asked."""
    certs = tmp_path / "certs"
    issue(certs, "meter-7")
    issue(certs, "meter-8")
    acl = tmp_path / "acl"
    acl.write_text("pattern readwrite meters/%u/#\n")
    passwd = tmp_path / "passwd"
    res = run_gw("passwd", "-c", "-b", str(passwd), "someone", "else")
    assert res.returncode == 0, res.stderr
    server = gw_factory(workers=2, listeners=("mqtts",), certs=certs,
                        args=["--require-certificate", "true", "--client-cafile", certs / "ca.pem",
                              "--use-identity-as-username", "true", "--acl-file", acl,
                              "--password-file", passwd])
    port = server.ports["mqtts"]
    seven = TlsClient(port, tls_context(certs / "ca.pem", certs / "meter-7.pem", certs / "meter-7-key.pem"),
                      "m7", "meter-8")          # claims another user: the certificate wins
    eight = TlsClient(port, tls_context(certs / "ca.pem", certs / "meter-8.pem", certs / "meter-8-key.pem"),
                      "m8")
    try:
        assert (seven.code, eight.code) == (0, 0)
        assert eight.subscribe("meters/meter-7/#") == 0x80
        assert eight.subscribe("meters/meter-8/#") == 1
        assert seven.subscribe("meters/meter-7/#") == 1
        publish_refused(server, seven, "meters/meter-8/reading")
        seven.publish("meters/meter-7/reading", b"42", 2)
        assert seven.next_message() == ("meters/meter-7/reading", b"42")
    finally:
        seven.close()
        eight.close()


def test_a_certificate_is_enough_off_loopback(gw_factory, tmp_path):
    """A TLS listener off loopback that requires client certificates needs no
    password file to start, and lets in a client whose certificate verifies
    with no user name (allow_anonymous left to auto), but not one claiming a
    user name nothing checks; without a certificate, no handshake."""
    certs = tmp_path / "certs"
    issue(certs, "probe-1")
    port = free_ports(1)[0]
    server = gw_factory(workers=1, ports={"mqtts": port}, data_dir=tmp_path / "data", certs=certs,
                        argv=["--workers", "1", "--stats-interval", "0", "--data-dir", tmp_path / "data",
                              "--certs", certs, "--mqtt", "off", "--json", "off", "--jsons", "off",
                              "--http", "off", "--https", "off", "--ws", "off", "--wss", "off", "--mqtts", f"0.0.0.0:{port}",
                              "--require-certificate", "true", "--client-cafile", certs / "ca.pem"])
    ctx = tls_context(certs / "ca.pem", certs / "probe-1.pem", certs / "probe-1-key.pem")
    client = TlsClient(server.ports["mqtts"], ctx, "probe-1")
    try:
        assert client.code == 0
    finally:
        client.close()
    assert TlsClient(server.ports["mqtts"], tls_context(certs / "ca.pem"), "probe-2").code is None
    # A user name the certificate does not prove, with no password file to check
    # it: refused, or any holder of a certificate could act as any user for the ACL.
    assert TlsClient(server.ports["mqtts"], ctx, "probe-3", "admin").code == 0x05
