"""What subscriptions cost in memory: the RSS of the worker holding them and of
its peer (which keeps every filter as peer interest).

    python bench/subscribe_memory.py [--scenario deep|wide|fleet|all]

Starts `gw serve --workers 2`, connects one raw MQTT client and measures both
workers' RSS (VmRSS, /proc) before and after its SUBSCRIBEs were answered:

* deep:  one SUBSCRIBE of max_packet_size (1 MiB) holding one filter `a/a/...`;
* wide:  one SUBSCRIBE of 1 MiB holding as many distinct 8-byte filters as fit;
* fleet: 10,000 filters of 128 levels (distinct from the sixth level on), in
  SUBSCRIBE packets of 100 filters.

The worker that received the connection is the one whose RSS grew most; the
other is its peer. A filter the server refuses (SUBACK 0x80) is counted and
costs nothing. The figures are for comparing two builds on the same machine.
"""

from __future__ import annotations

import argparse
import socket
import struct
import sys
import time
from pathlib import Path

from benchutil import mqtt_only_gw

REPO = Path(__file__).resolve().parent.parent
MAX_PACKET = 1 << 20
sys.path.append(str(REPO / "tests"))      # MQTT bytes built by hand (tests/mqtt_bytes.py)

from mqtt_bytes import packet, read_packet  # noqa: E402


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def connect_packet(client_id: bytes) -> bytes:
    body = b"\x00\x04MQTT\x04\x02\x00\x3c" + struct.pack("!H", len(client_id)) + client_id
    return packet(0x10, body)


def subscribe_packet(packet_id: int, filters: list[bytes]) -> bytes:
    body = struct.pack("!H", packet_id) + b"".join(struct.pack("!H", len(f)) + f + b"\x01" for f in filters)
    return packet(0x82, body)


def deep_packets() -> list[list[bytes]]:
    # The largest single filter a 1 MiB packet carries: a filter length is a
    # 16-bit field, so a longer one cannot exist; repeat it under distinct
    # first levels to fill the packet.
    levels = (65535 - 1) // 2
    filters = []
    room = MAX_PACKET - 5 - 2
    i = 0
    while True:
        f = (b"%d/" % i) + b"/".join([b"a"] * levels)
        f = f[:65535]
        if room < len(f) + 3:
            break
        filters.append(f)
        room -= len(f) + 3
        i += 1
    return [filters]


def wide_packets() -> list[list[bytes]]:
    count = (MAX_PACKET - 5 - 2) // (2 + 8 + 1)
    return [[b"w%07d" % i for i in range(count)]]


def fleet_packets() -> list[list[bytes]]:
    filters = [b"/".join((b"d%d" % k) if j == 5 else (b"x%d" % j) for j in range(128)) for k in range(10_000)]
    return [filters[i:i + 100] for i in range(0, len(filters), 100)]


SCENARIOS = {"deep": deep_packets, "wide": wide_packets, "fleet": fleet_packets}


def run(scenario: str) -> None:
    import psutil

    with mqtt_only_gw(2, "--persist-interval", "0") as (server, port, tmp):
        time.sleep(1)
        workers = sorted(c.pid for c in psutil.Process(server.pid).children()
                         if "pipeline" not in " ".join(c.cmdline()))[:2]
        packets = SCENARIOS[scenario]()
        before = [rss(w) for w in workers]
        granted = refused = 0
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(connect_packet(b"subscribe-memory"))
            first, body = read_packet(sock)
            assert first >> 4 == 2 and body[1] == 0, f"CONNACK {body!r}"
            for i, filters in enumerate(packets):
                sock.sendall(subscribe_packet(i + 1, filters))
                first, body = read_packet(sock)
                assert first >> 4 == 9, f"expected SUBACK, got type {first >> 4}"
                codes = body[2:]
                refused += codes.count(0x80)
                granted += len(codes) - codes.count(0x80)
            time.sleep(1)        # the peer has added the filters before the SUBACK; let it settle
            after = [rss(w) for w in workers]
        grown = [a - b for a, b in zip(after, before)]
        local = 0 if grown[0] >= grown[1] else 1
        nbytes = sum(len(f) for p in packets for f in p)
        print(f"{scenario}: {granted} filters granted, {refused} refused, {nbytes / 1e6:.2f} MB of filters; "
              f"RSS grew {grown[local] / 1e6:.1f} MB in the subscriber's worker, "
              f"{grown[1 - local] / 1e6:.1f} MB in its peer", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", choices=[*SCENARIOS, "all"], default="all")
    args = ap.parse_args()
    for name in (SCENARIOS if args.scenario == "all" else [args.scenario]):
        run(name)


if __name__ == "__main__":
    main()
