"""The dashboard's weight and first render with 10,000 devices in the store, in the
browser the tests use (Debian's headless Chromium, driven by playwright).

    python bench/dashboard_render.py [--devices 10000] [--rounds 7] [--out DIR]

Starts `gw serve --workers 2` (mqtt, http and ws listeners on free loopback
ports, through the tests' harness), fills its store through the real HTTP
ingest API (batches of 1,000: every device gets 3 metrics and 6 readings a
minute apart over the last minutes, so its sparklines have points), waits until
the store holds every device, then loads the page `--rounds` times:

* cold: a new browser context each time (empty cache), and
* warm: the same page loaded again in that context (the vendored files and the
  page's own, named by their SHA-256, come from the cache),

and reports per load, median and worst: the first contentful paint, the time
until the page has drawn its first stats, the first page of devices and the
alerts (`body[data-ready]`, the page's own mark), until every sparkline of that
page is drawn, and the bytes transferred (navigation and resources, as the
browser counts them: headers included) and their decoded size. Also the size of
a full stats series answer (900 points). The result is a Markdown table for
BENCHMARKS.md. Loopback only; the server is stopped by pid at the end.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))

from benchutil import gw_harness  # noqa: E402

CHROMIUM = "/usr/bin/chromium"


def http(port: int, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        head = f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        s.sendall(head.encode() + b"\r\n" + (body or b""))
        data = b""
        while True:
            chunk = s.recv(1 << 16)
            if not chunk:
                break
            data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), rest


def fill(port: int, devices: int) -> None:
    now = time.time()
    batch = []
    for d in range(devices):
        for k in range(6):
            batch.append({"device_id": f"dev-{d:05d}", "ts": now - 360 + 60 * k, "seq": k,
                          "metrics": {"temp_c": 20 + (d % 7) + k * 0.1, "rh": 40 + k, "rssi": -60 - (d % 20)}})
        if len(batch) >= 996:
            status, body = http(port, "POST", "/v1/ingest", json.dumps(batch).encode())
            assert status in (200, 202), (status, body[:200])
            batch = []
    if batch:
        status, body = http(port, "POST", "/v1/ingest", json.dumps(batch).encode())
        assert status in (200, 202), (status, body[:200])


def stored_devices(data_dir: Path) -> int:
    import sqlite3
    try:
        conn = sqlite3.connect(f"file:{data_dir / 'store.sqlite'}?mode=ro", uri=True, timeout=1)
        try:
            return conn.execute("SELECT count(*) FROM devices").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.Error:
        return 0


MEASURE = """() => {
  const nav = performance.getEntriesByType('navigation')[0];
  const res = performance.getEntriesByType('resource');
  const paint = performance.getEntriesByName('first-contentful-paint')[0];
  const ready = performance.getEntriesByName('gw-ready')[0];
  const all = [nav, ...res];
  return {fcp: paint ? paint.startTime : null, ready: ready ? ready.startTime : null,
          transfer: all.reduce((a, e) => a + (e.transferSize || 0), 0),
          decoded: all.reduce((a, e) => a + (e.decodedBodySize || 0), 0),
          requests: all.length,
          biggest: res.map(e => [e.name.replace(location.origin, ''), e.transferSize])
                      .sort((a, b) => b[1] - a[1]).slice(0, 4)};
}"""
SPARKS_DONE = """() => {
  const c = document.querySelectorAll('#devices canvas');
  return c.length > 0 && Array.from(c).every(x => x.dataset.points !== undefined);
}"""


def load(page, url: str) -> dict:
    t0 = time.perf_counter()
    page.goto(url)
    page.wait_for_selector("body[data-ready='1']", timeout=60_000)
    ready_wall = (time.perf_counter() - t0) * 1000
    page.wait_for_function(SPARKS_DONE, timeout=60_000)
    sparks = (time.perf_counter() - t0) * 1000
    m = page.evaluate(MEASURE)
    m["ready_wall"] = ready_wall
    m["sparks_wall"] = sparks
    m["rows"] = page.locator("#devices tbody tr").count()
    return m


def full_series_bytes() -> int:
    """The size of GET /v1/stats/series once the ring is full (900 points, 2 workers, busy figures)."""
    import os

    import msgspec
    import numpy as np

    from gw.series import SeriesRecorder, SeriesRing, series_answer
    from gw.stats import StatsBlock, Counter
    block = StatsBlock.create(2, os.getpid())
    ring = SeriesRing.create(2)
    rec = SeriesRecorder(block, ring)
    rng = np.random.default_rng(1)
    for _ in range(ring.capacity):
        for w in range(2):
            block.rows[w, Counter.MSGS_IN] += int(rng.integers(1000, 50000))
            block.rows[w, Counter.CONNS_CURRENT] = int(rng.integers(1000, 5000))
            block.rows[w, Counter.BYTES_IN] += int(rng.integers(100000, 5000000))
        rec.tick()
    size = len(msgspec.json.encode(series_answer(ring, block, -1)))
    block.close(unlink=True)
    return size


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", default=None, help="directory for the screenshots and the server's log")
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    harness = gw_harness()
    out = Path(args.out or tempfile.mkdtemp(prefix="gw-dash-bench-"))
    server = harness.GwServer(out / "server", workers=2, listeners=("mqtt", "http", "ws"),
                              args=["--log-level", "warning"], fragment=False).start()
    try:
        t0 = time.monotonic()
        fill(server.ports["http"], args.devices)
        harness.wait_for(lambda: stored_devices(server.data_dir) >= args.devices, 300, 0.5, "the store")
        print(f"store: {args.devices} devices, {6 * args.devices} readings, filled in "
              f"{time.monotonic() - t0:.1f} s", flush=True)
        url = f"http://127.0.0.1:{server.ports['http']}/"
        cold, warm = [], []
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                        args=["--no-sandbox", "--disable-dev-shm-usage"])
            for r in range(args.rounds):
                context = browser.new_context(viewport={"width": 1400, "height": 1000})
                page = context.new_page()
                cold.append(load(page, url))
                warm.append(load(page, url))
                if r == 0:
                    page.screenshot(path=str(out / "dashboard-10k.png"), full_page=True)
                context.close()
            browser.close()
    finally:
        server.stop()
    series = full_series_bytes()

    def row(name, runs, key, unit, scale=1.0):
        vals = [x[key] * scale for x in runs if x[key] is not None]
        return f"| {name} | {statistics.median(vals):.0f} {unit} | {max(vals):.0f} {unit} |"

    print(f"\ndevices in the store: {args.devices}; rows on the first page: {cold[0]['rows']}; "
          f"requests (cold): {cold[0]['requests']}; largest (cold): {cold[0]['biggest']}")
    print(f"GET /v1/stats/series with a full ring (900 points, 2 workers): {series / 1024:.0f} KiB\n")
    print(f"| {args.rounds} loads | median | worst |")
    print("|---|---|---|")
    for label, runs in (("cold", cold), ("warm", warm)):
        print(row(f"{label}: first contentful paint", runs, "fcp", "ms"))
        print(row(f"{label}: stats, devices and alerts drawn", runs, "ready", "ms"))
        print(row(f"{label}: ... measured from the test (goto to ready)", runs, "ready_wall", "ms"))
        print(row(f"{label}: every sparkline of the page drawn", runs, "sparks_wall", "ms"))
        print(row(f"{label}: bytes transferred", runs, "transfer", "KiB", 1 / 1024))
        print(row(f"{label}: bytes decoded", runs, "decoded", "KiB", 1 / 1024))
    print(f"\nscreenshot and log: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
