"""Real MQTT clients against `gw serve`: paho-mqtt (v2 API) and Mosquitto's
mosquitto_pub / mosquitto_sub, over TCP and over TLS trusting the generated CA.
Routing is not built yet, so nothing is expected to be delivered: connection,
keepalive, acknowledgement flows and SUBACK are."""

from __future__ import annotations

import re
import shutil
import subprocess
import time

import pytest

from conftest import HOST, PahoClient, counter_delta, wait_for

pytestmark = pytest.mark.skipif(shutil.which("mosquitto_pub") is None, reason="mosquitto clients")


@pytest.fixture(params=["tcp", "tls"])
def transport(request, gw_server):
    """(port, CA file or None) of the MQTT listener to use."""
    if request.param == "tcp":
        return gw_server.ports["mqtt"], None
    return gw_server.ports["mqtts"], gw_server.ca


def test_paho_connect_disconnect(gw_server, transport):
    port, ca = transport
    before = gw_server.counters()
    client = PahoClient(port, ca=ca, keepalive=30)
    assert client.is_connected
    wait_for(lambda: gw_server.counters()["sessions_current"] >= before["sessions_current"] + 1, 10,
             what="a session")
    client.close()
    after = gw_server.wait_counter("closed_client", before["closed_client"] + 1)
    assert counter_delta(before, after, "mqtt_connected") == 1
    assert counter_delta(before, after, "packets_in.disconnect") == 1
    wait_for(lambda: gw_server.counters()["sessions_current"] == before["sessions_current"], 10,
             what="the session to end")


def test_paho_keepalive_pings_keep_it_connected(gw_server):
    """keepalive 2 s (the server closes after 3 s of silence, MQTT-3.1.2-24): both a
    TCP and a TLS client stay connected for 7 s, i.e. past three keepalive periods,
    which they can only do because each PINGREQ got its PINGRESP (paho drops the
    connection when a PINGRESP does not come within the keepalive)."""
    before = gw_server.counters()
    clients = [PahoClient(gw_server.ports["mqtt"], keepalive=2),
               PahoClient(gw_server.ports["mqtts"], ca=gw_server.ca, keepalive=2)]
    try:
        time.sleep(7)
        for c in clients:
            assert c.is_connected
            assert c.pingresps >= 2, c.pingresps
        after = gw_server.counters()
        assert counter_delta(before, after, "packets_out.pingresp") >= 4
        assert counter_delta(before, after, "closed_timeout") == 0
    finally:
        for c in clients:
            c.close()


def test_paho_publish_qos_1_and_2_acknowledged(gw_server, transport):
    port, ca = transport
    before = gw_server.counters()
    with PahoClient(port, ca=ca) as client:
        for qos in (1, 2):
            info = client.client.publish("sensors/a", b"x" * 100, qos=qos)
            info.wait_for_publish(10)
            assert info.is_published(), qos
        client.ping()
    after = gw_server.counters()
    assert counter_delta(before, after, "packets_out.puback") == 1
    assert counter_delta(before, after, "packets_out.pubrec") == 1
    assert counter_delta(before, after, "packets_out.pubcomp") == 1
    assert counter_delta(before, after, "msgs_in") == 2


def test_paho_subscribe_gets_granted_qos(gw_server, transport):
    port, ca = transport
    with PahoClient(port, ca=ca) as client:
        assert client.subscribe("sensors/+/temp", 1) == [1]
        assert client.subscribe("alerts/#", 2) == [2]
        client.ping()
        assert client.is_connected


def _mosquitto(tool, port, ca, *args, timeout=30):
    cmd = [tool, "-h", HOST, "-p", str(port), "-d", *args]
    if ca is not None:
        cmd += ["--cafile", str(ca)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("qos", [0, 1, 2])
def test_mosquitto_pub(gw_server, transport, qos):
    port, ca = transport
    before = gw_server.counters()
    res = _mosquitto("mosquitto_pub", port, ca, "-t", "gw/test", "-m", "hello", "-q", str(qos),
                     "-i", f"pub-{qos}")
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert "received CONNACK (0)" in out
    if qos == 1:
        assert "received PUBACK" in out
    if qos == 2:
        assert "received PUBREC" in out and "received PUBCOMP" in out
    after = gw_server.wait_counter("closed_client", before["closed_client"] + 1)
    assert counter_delta(before, after, "packets_in.publish") == 1
    assert counter_delta(before, after, "closed_malformed") == 0


def test_mosquitto_sub_connects_and_gets_suback(gw_server, transport):
    port, ca = transport
    before = gw_server.counters()
    res = _mosquitto("mosquitto_sub", port, ca, "-t", "gw/#", "-q", "1", "-C", "1", "-W", "2",
                     "-i", "sub-1")
    out = res.stdout + res.stderr
    # Nothing is routed yet, so it times out (-W) after a successful subscription.
    assert "received CONNACK (0)" in out, out
    assert "received SUBACK" in out, out
    assert re.search(r"Subscribed \(mid: \d+\): 1\b", out), out
    assert res.returncode in (0, 27), out
    after = gw_server.counters()
    assert counter_delta(before, after, "packets_in.subscribe") == 1
    assert counter_delta(before, after, "packets_out.suback") == 1
