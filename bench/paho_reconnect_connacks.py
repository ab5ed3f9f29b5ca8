"""How long a CONNECT waits for its CONNACK when an interoperability suite's
pattern repeats: paho-mqtt clients open a persistent session (clean session
0) that subscribes at QoS 2 and receives its own QoS 1 and 2 messages without
acknowledging them, reconnect it (the messages are sent again), and moments
later CONNECT the same client id with clean session 1. On gw each CONNECT
goes to a chosen worker (tests/placement.py), alternating, so the session
moves between workers at every step.

Reports, per broker, the CONNECTs made and the CONNACK times (max, p99), and
every CONNECT whose CONNACK took longer than --bound (default 2 s) or never
came. Exit status 1 if there was one.

    python bench/paho_reconnect_connacks.py --port 1883 --workers-of-pid PID
    python bench/paho_reconnect_connacks.py --port 1884          # Mosquitto
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import threading
import time

import paho.mqtt.client as mqtt
import psutil

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from placement import connect_on  # noqa: E402


class Placed(mqtt.Client):
    """A paho client whose next TCP connection is one given (placed on a worker)."""
    next_sock: socket.socket | None = None

    def _create_socket_connection(self):
        sock, self.next_sock = self.next_sock, None
        return sock if sock is not None else super()._create_socket_connection()


class Run:
    def __init__(self, port: int, pids: list[int], bound: float):
        self.port, self.pids, self.bound = port, pids, bound
        self.lock = threading.Lock()
        self.times: list[float] = []
        self.late: list[str] = []
        self.present = 0        # persistent reconnects that found their session
        self.resent = 0         # messages the session sent again on those reconnects

    def connect(self, client: Placed, worker: int | None, what: str) -> bool:
        if self.pids:
            client.next_sock = connect_on(self.port, self.pids, worker)[0]
        done = threading.Event()
        client.present = False

        def on_connect(c, userdata, flags, rc, props=None):
            c.present = flags.session_present
            done.set()
        client.on_connect = on_connect
        t0 = time.monotonic()
        client.connect("127.0.0.1", self.port, keepalive=60)
        while not done.is_set() and time.monotonic() - t0 < self.bound + 3:
            client.loop(0.01)
        took = time.monotonic() - t0
        with self.lock:
            self.times.append(took)
            if not done.is_set() or took > self.bound:
                self.late.append(f"{what} on worker {worker}: "
                                 + (f"CONNACK after {took:.3f} s" if done.is_set() else "no CONNACK"))
        return done.is_set()

    def pump(self, client: Placed, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            client.loop(0.01)

    def cycle(self, cid: str, n: int) -> None:
        topic = f"reconnect/{cid}"
        w = n % 2 if self.pids else None
        other = (1 - w) if self.pids else None
        persistent = Placed(mqtt.CallbackAPIVersion.VERSION2, client_id=cid, clean_session=False,
                            manual_ack=True)
        if not self.connect(persistent, w, f"{cid} #{n} persistent"):
            return
        persistent.subscribe(topic, qos=2)
        persistent.publish(topic, b"q1", qos=1)
        persistent.publish(topic, b"q2", qos=2)
        self.pump(persistent, 0.02)             # received, never acknowledged
        if n % 3 == 0:
            persistent.socket().close()         # an abrupt end, sometimes
        else:
            persistent.disconnect()
        again = Placed(mqtt.CallbackAPIVersion.VERSION2, client_id=cid, clean_session=False, manual_ack=True)
        got = []
        again.on_message = lambda c, u, m: got.append(m.payload)
        if self.connect(again, other, f"{cid} #{n} persistent again"):
            self.pump(again, 0.02)              # the session's messages, sent again
            again.disconnect()
            with self.lock:
                self.present += again.present
                self.resent += len(got)
        clean = Placed(mqtt.CallbackAPIVersion.VERSION2, client_id=cid, clean_session=True)
        if self.connect(clean, w, f"{cid} #{n} clean"):
            clean.disconnect()


def worker_pids(master: int, port: int) -> list[int]:
    """gw's workers: the master's children listening on the MQTT port (the pipeline does not)."""
    return sorted(k.pid for k in psutil.Process(master).children()
                  if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port
                         for c in k.net_connections(kind="tcp")))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--workers-of-pid", type=int, help="gw master's pid: each CONNECT placed on a worker")
    ap.add_argument("--cycles", type=int, default=500, help="cycles per client id (3 CONNECTs each)")
    ap.add_argument("--ids", type=int, default=4, help="client ids, one thread each")
    ap.add_argument("--bound", type=float, default=2.0)
    args = ap.parse_args()
    pids = worker_pids(args.workers_of_pid, args.port) if args.workers_of_pid else []
    run = Run(args.port, pids, args.bound)
    tag = os.urandom(3).hex()

    def thread(i: int) -> None:
        for n in range(args.cycles):
            run.cycle(f"paho-{tag}-{i}", n)

    threads = [threading.Thread(target=thread, args=(i,)) for i in range(args.ids)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    times = sorted(run.times)
    p99 = times[int(len(times) * 0.99)] if times else 0
    print(f"{len(times)} CONNECTs in {time.monotonic() - t0:.1f} s ({len(pids) or 'any'} workers): "
          f"CONNACK max {times[-1]:.3f} s, p99 {p99:.3f} s; over {args.bound} s or missing: {len(run.late)}; "
          f"persistent reconnects with their session {run.present}, messages sent again {run.resent}")
    for line in run.late[:20]:
        print("  " + line)
    return 1 if run.late else 0


if __name__ == "__main__":
    sys.exit(main())
