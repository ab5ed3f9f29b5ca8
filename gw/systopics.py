"""$SYS/broker/... topics, as Mosquitto publishes them (retained, every
sys_interval seconds), computed from the shared-memory counters of all workers.
Worker 0 publishes them; they reach subscribers on every worker like any
message (wildcards starting at the first level do not match them, MQTT-4.7.2-1).
"""

from __future__ import annotations

import time

from gw import __version__
from gw.stats import Counter, Layout, StatsBlock


def sys_messages(block: StatsBlock, retained: int) -> list[tuple[str, str]]:
    t = block.totals()
    header = block.header
    started = int(header[Layout.H_STARTED])

    def c(name):
        return int(t[Counter[name]])

    packets_in = sum(t[Counter.PKT_IN:Counter.PKT_IN + 16])
    packets_out = sum(t[Counter.PKT_OUT:Counter.PKT_OUT + 16])
    connected = c("SESSIONS_CURRENT")
    away = c("SESSIONS_AWAY")
    dropped = (c("DROPPED_SLOW_QOS0") + c("DROPPED_QUEUE_FULL") + c("DROPPED_NOMEM")
               + c("CHANNEL_DROPS"))
    return [
        ("$SYS/broker/version", f"gw version {__version__}"),
        ("$SYS/broker/uptime", f"{int(time.time()) - started} seconds"),
        ("$SYS/broker/clients/connected", str(connected)),
        ("$SYS/broker/clients/active", str(connected)),
        ("$SYS/broker/clients/disconnected", str(away)),
        ("$SYS/broker/clients/total", str(connected + away)),
        ("$SYS/broker/clients/maximum", str(max(int(header[Layout.H_PEAK]), c("CONNS_CURRENT")))),
        ("$SYS/broker/messages/received", str(packets_in)),
        ("$SYS/broker/messages/sent", str(packets_out)),
        ("$SYS/broker/publish/messages/received", str(c("MSGS_IN"))),
        ("$SYS/broker/publish/messages/sent", str(c("MSGS_OUT"))),
        ("$SYS/broker/publish/messages/dropped", str(dropped)),
        ("$SYS/broker/bytes/received", str(c("BYTES_IN"))),
        ("$SYS/broker/bytes/sent", str(c("BYTES_OUT"))),
        ("$SYS/broker/subscriptions/count", str(c("SUBSCRIPTIONS_CURRENT"))),
        ("$SYS/broker/retained messages/count", str(retained)),
    ]
