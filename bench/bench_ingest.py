"""A worker's HTTP batch ingest, from the body to the readings it logs
(gw/ingest.py `Ingest.batch`): msgspec's typed decoding, then the checks and
each reading's published JSON written in C (gw_ext/telemetry_json.pyx).

* pytest-benchmark benchmarks report readings/s in ``extra_info``: 100-reading
  bodies as `bench/wrk/ingest_batch.lua` posts them (2 metrics and a tag each, no
  ts: the server's time), through `Ingest.batch`, and through the Python path
  it replaced (`Ingestor.batch`, a `Telemetry` per reading, one encode each);
* ``test_gate_compiled_vs_python_path`` is the gate: the Python path's time
  over `Ingest.batch`'s for the same bodies, same run, alternately: a ratio,
  never an absolute time. The baseline is the previous implementation, which
  stays in the code as the reference and the error path.
"""

from __future__ import annotations

import msgspec

from gw.ingest import Ingest, Ingestor
from gw.stats import N_COUNTERS
from benchutil import Gate, best_time, check_gate, paired_ratio

READINGS = 100              # per body, as bench/store_sustained.py's http-batch load sends them
BODIES = 50
GATE_RATIO = 1.4            # Python path time / Ingest.batch time; measured 1.95-1.97 (BENCHMARKS.md, Speed gates)


def body(first: int) -> bytes:
    parts = []
    for n in range(first, first + READINGS):
        d = (n * 7919) % 20_000
        parts.append('{"device_id":"dev-%05d","seq":%d,"metrics":{"temp_c":%.1f,"humidity_pct":%d},'
                     '"tags":{"site":"AAL"}}' % (d, n, 20 + (n % 50) / 10, 40 + n % 20))
    return ("[" + ",".join(parts) + "]").encode()


BODY_LIST = [body(k * READINGS) for k in range(BODIES)]
INGEST = Ingest(1000, [0] * N_COUNTERS)
INGESTOR = Ingestor(1000)
ENCODE = msgspec.json.Encoder().encode


def compiled():
    for b in BODY_LIST:
        INGEST.batch(b)


def python_path():
    for b in BODY_LIST:
        [(t.device_id.encode(), t.seq, ENCODE(t)) for t in INGESTOR.batch(b)]


def record_rate(benchmark, fn):
    stats = getattr(benchmark, "stats", None)
    seconds = stats.stats.min if stats is not None else best_time(fn, 5)
    benchmark.extra_info["readings"] = READINGS * BODIES
    benchmark.extra_info["readings_per_s"] = round(READINGS * BODIES / seconds)


def test_batch_compiled(benchmark):
    benchmark.pedantic(compiled, rounds=20, iterations=1)
    record_rate(benchmark, compiled)


def test_batch_python_path(benchmark):
    benchmark.pedantic(python_path, rounds=10, iterations=1)
    record_rate(benchmark, python_path)


def test_both_give_the_same_readings():
    """The two paths time the same work: the same readings but for the server's time."""
    fast = INGEST.batch(BODY_LIST[0]).records
    slow = [(t.device_id.encode(), t.seq, ENCODE(t)) for t in INGESTOR.batch(BODY_LIST[0])]
    assert [(d, s) for d, s, _ in fast] == [(d, s) for d, s, _ in slow]
    strip = [msgspec.json.decode(j) for _, _, j in fast], [msgspec.json.decode(j) for _, _, j in slow]
    for a, b in zip(*strip):
        a.pop("ts")
        b.pop("ts")
        assert a == b


def ingest_ratio() -> tuple[float, dict]:
    ratio, ours, base = paired_ratio(compiled, python_path, repeat=7)
    n = READINGS * BODIES
    return ratio, {"compiled_us_per_reading": round(ours / n * 1e6, 3),
                   "python_us_per_reading": round(base / n * 1e6, 3)}


GATE = Gate("ingest_json", ingest_ratio, GATE_RATIO,
            "HTTP batch ingest with the JSON written in C vs the Python path")


def test_gate_compiled_vs_python_path(request):
    check_gate(GATE, request)
