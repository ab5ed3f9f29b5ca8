"""--max-connections: the limit is server-wide (summed over the workers); a
connection over it is closed at once and counted in conns_rejected; once one
closes, a new one is accepted."""

from __future__ import annotations

import pytest

from conftest import (DISCONNECT, connect_packet, counter_delta, mqtt_client, ping, tcp_connect,
                      wait_closed, wait_for)

LIMIT = 5


@pytest.mark.parametrize("workers", [1, 2])
def test_max_connections(gw_factory, workers):
    gw = gw_factory(workers=workers, listeners=("mqtt", "json"),
                    args=["--max-connections", str(LIMIT)])
    port = gw.ports["mqtt"]
    socks = [mqtt_client(port, f"c{i}") for i in range(LIMIT)]
    try:
        assert gw.counters()["conns_current"] == LIMIT
        before = gw.counters()
        for listener in ("mqtt", "json"):      # the limit covers every listener
            with tcp_connect(gw.ports[listener]) as extra:
                try:
                    extra.sendall(connect_packet(b"one-too-many"))
                except (BrokenPipeError, ConnectionResetError):
                    pass
                assert wait_closed(extra, 10) == b""
        after = gw.counters()
        assert counter_delta(before, after, "conns_rejected") == 2
        assert counter_delta(before, after, "mqtt_connected") == 0
        assert after["conns_current"] == LIMIT
        for sock in socks:                     # the admitted ones are untouched
            ping(sock)
        # One leaves; then there is room for one more.
        socks[0].sendall(DISCONNECT)
        wait_closed(socks[0], 10)
        socks[0].close()
        wait_for(lambda: gw.counters()["conns_current"] == LIMIT - 1, 10, what="the slot to free")
        socks[0] = mqtt_client(port, "next")
        ping(socks[0])
        assert counter_delta(before, gw.counters(), "conns_rejected") == 2
    finally:
        for sock in socks:
            sock.close()
