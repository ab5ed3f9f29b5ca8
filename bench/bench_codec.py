"""Speed of the MQTT codecs: Cython (gw_ext.codec, gw_ext.codec5) against the pure-Python references.

The server never builds Python objects per packet, so decoding is timed with
``decode_count``: header, body decoder and full validation of every packet
(SUBSCRIBE entries and their filters included), through the C functions.

* pytest-benchmark benchmarks report packets/s in ``extra_info``;
* ``test_gate_cython_codec_vs_reference`` is the gate: both decoders on
  the same buffer in the same run, best of several repetitions, the Cython
  codec at least GATE_RATIO times the reference (a ratio, never an absolute time);
* ``test_small_publish_decode_rate`` records the one-core rate of small QoS 0
  PUBLISH (target >= 1,000,000 packets/s) without asserting it;
* the same for MQTT 5.0 (``*_v5``): a mix of 5.0 packets with the properties
  clients send (topic aliases, message expiry, user properties, subscription
  options), gw_ext.codec5 against tests/mqtt5_ref.py, gated by
  ``test_gate_cython_codec5_vs_reference``.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))   # the reference codec, a test oracle

import mqtt5_ref as ref5                                            # noqa: E402
import mqtt_ref as ref                                              # noqa: E402
from benchutil import Gate, best_time, check_gate, paired_ratio      # noqa: E402
from gw import packets5 as p5                                       # noqa: E402
from gw.packets import Connect, Pingreq, Puback, Publish, Subscribe  # noqa: E402
from gw_ext import codec, codec5                                    # noqa: E402

SMALL_PUBLISH_TARGET = 1_000_000   # packets/s on one core (recorded, not asserted)
GATE_RATIO = 47             # measured 47-119 (BENCHMARKS.md, Speed gates)
GATE5_RATIO = 140           # measured 222-271 (BENCHMARKS.md, Speed gates; busy machine only so far)


def realistic_mix(count: int = 20_000, seed: int = 1) -> tuple[bytes, int]:
    """What a gateway reads: mostly small QoS 0/1 PUBLISH of 16-64 byte payloads
    from many devices, their PUBACKs, keepalive PINGREQs, a few SUBSCRIBE/CONNECT."""
    rng = random.Random(seed)
    metrics = ["temp", "humidity", "pressure", "battery", "co2"]
    parts = []
    for i in range(count):
        r = rng.random()
        device = rng.randrange(100_000)
        if r < 0.70:
            p = Publish(f"sensors/dev{device}/{rng.choice(metrics)}", rng.randbytes(rng.randint(16, 64)))
        elif r < 0.85:
            p = Publish(f"sensors/dev{device}/{rng.choice(metrics)}", rng.randbytes(rng.randint(16, 64)),
                        1, packet_id=rng.randint(1, 65535))
        elif r < 0.95:
            p = Puback(rng.randint(1, 65535))
        elif r < 0.98:
            p = Pingreq()
        elif r < 0.99:
            p = Subscribe(rng.randint(1, 65535), [(f"commands/dev{device}/#", 1), ("config/+/all", 0)])
        else:
            p = Connect(f"dev{device}", True, 60, username="device", password=b"secret-token")
        parts.append(codec.encode(p))
    return b"".join(parts), count


def small_publishes(count: int = 100_000) -> tuple[bytes, int]:
    payload = b'{"t":21.5,"u":"C","ts":1700000000}'       # 34 bytes
    return b"".join(codec.encode(Publish(f"sensors/dev{i % 1000}/temp", payload)) for i in range(count)), count


def realistic_mix_v5(count: int = 20_000, seed: int = 1) -> tuple[bytes, int]:
    """The same traffic from MQTT 5.0 clients: PUBLISH with a topic alias (the
    first of each device with its topic, then the alias alone), some with a
    message expiry or a user property, PUBACKs in their short form, PINGREQ, a
    few SUBSCRIBE with options and a subscription identifier, CONNECT with
    session expiry and receive maximum."""
    rng = random.Random(seed)
    metrics = ["temp", "humidity", "pressure", "battery", "co2"]
    aliased = set()
    parts = []
    for i in range(count):
        r = rng.random()
        device = rng.randrange(1000)
        if r < 0.85:
            qos = 0 if r < 0.70 else 1
            alias = device % 100 + 1
            extra = {}
            if rng.random() < 0.2:
                extra["message_expiry_interval"] = 3600
            if rng.random() < 0.1:
                extra["user_properties"] = (("site", "AAL"),)
            topic = "" if alias in aliased else f"sensors/dev{device}/{rng.choice(metrics)}"
            aliased.add(alias)
            p = p5.Publish(topic, rng.randbytes(rng.randint(16, 64)), qos,
                           packet_id=rng.randint(1, 65535) if qos else 0,
                           properties=p5.Properties(topic_alias=alias, **extra))
        elif r < 0.95:
            p = p5.Puback(rng.randint(1, 65535))
        elif r < 0.98:
            p = p5.Pingreq()
        elif r < 0.99:
            p = p5.Subscribe(rng.randint(1, 65535), [(f"commands/dev{device}/#", 0x21), ("config/+/all", 0x00)],
                             p5.Properties(subscription_identifiers=(device + 1,)))
        else:
            p = p5.Connect(f"dev{device}", True, 60, p5.Properties(session_expiry_interval=3600, receive_maximum=20),
                           username="device", password=b"secret-token")
        parts.append(codec5.encode(p))
    return b"".join(parts), count


MIX, MIX_COUNT = realistic_mix()
MIX5, MIX5_COUNT = realistic_mix_v5()
PUBLISHES5 = [p5.Publish(f"sensors/dev{i}/temp", bytes(range(32)), i % 2, packet_id=(i % 2) * (i + 1),
                         properties=p5.Properties(message_expiry_interval=60, user_properties=(("k", "v"),)))
              for i in range(1000)]
SMALL, SMALL_COUNT = small_publishes()
PUBLISHES = [Publish(f"sensors/dev{i}/temp", bytes(range(32)), i % 2, packet_id=(i % 2) * (i + 1))
             for i in range(1000)]


def record_rate(benchmark, fn, packets: int, repeat: int = 5):
    """packets/s into extra_info, from the benchmark's best round when it ran
    (not under --benchmark-disable), else from our own best of `repeat`."""
    stats = getattr(benchmark, "stats", None)
    seconds = stats.stats.min if stats is not None else best_time(fn, repeat)
    benchmark.extra_info["packets"] = packets
    benchmark.extra_info["packets_per_s"] = round(packets / seconds)
    return packets / seconds


def _encode_all(encode, packets=PUBLISHES):
    for p in packets:
        encode(p)


# --- pytest-benchmark benchmarks ---------------------------------------------------

def test_decode_count_mix_cython(benchmark):
    assert benchmark(codec.decode_count, MIX) == MIX_COUNT
    record_rate(benchmark, lambda: codec.decode_count(MIX), MIX_COUNT)


def test_decode_count_mix_reference(benchmark):
    assert benchmark.pedantic(ref.decode_count, (MIX,), rounds=5, iterations=1) == MIX_COUNT
    record_rate(benchmark, lambda: ref.decode_count(MIX), MIX_COUNT, repeat=2)


def test_encode_publish_cython(benchmark):
    benchmark(_encode_all, codec.encode)
    record_rate(benchmark, lambda: _encode_all(codec.encode), len(PUBLISHES))


def test_encode_publish_reference(benchmark):
    benchmark(_encode_all, ref.encode)
    record_rate(benchmark, lambda: _encode_all(ref.encode), len(PUBLISHES))


def test_small_publish_decode_rate(benchmark):
    """Small QoS 0 PUBLISH decoded and validated on one core; recorded, not asserted."""
    assert benchmark(codec.decode_count, SMALL) == SMALL_COUNT
    rate = record_rate(benchmark, lambda: codec.decode_count(SMALL), SMALL_COUNT)
    benchmark.extra_info["target_packets_per_s"] = SMALL_PUBLISH_TARGET
    benchmark.extra_info["meets_target"] = rate >= SMALL_PUBLISH_TARGET


def test_decode_count_mix_cython_v5(benchmark):
    assert benchmark(codec5.decode_count, MIX5) == MIX5_COUNT
    record_rate(benchmark, lambda: codec5.decode_count(MIX5), MIX5_COUNT)


def test_decode_count_mix_reference_v5(benchmark):
    assert benchmark.pedantic(ref5.decode_count, (MIX5,), rounds=5, iterations=1) == MIX5_COUNT
    record_rate(benchmark, lambda: ref5.decode_count(MIX5), MIX5_COUNT, repeat=2)


def test_decode_mix_cython_v5(benchmark):
    """decode() builds the Python objects (what a client library would)."""
    assert len(benchmark(codec5.decode, MIX5)[0]) == MIX5_COUNT
    record_rate(benchmark, lambda: codec5.decode(MIX5), MIX5_COUNT)


def test_encode_publish_cython_v5(benchmark):
    benchmark(_encode_all, codec5.encode, PUBLISHES5)
    record_rate(benchmark, lambda: _encode_all(codec5.encode, PUBLISHES5), len(PUBLISHES5))


def test_encode_publish_reference_v5(benchmark):
    benchmark(_encode_all, ref5.encode, PUBLISHES5)
    record_rate(benchmark, lambda: _encode_all(ref5.encode, PUBLISHES5), len(PUBLISHES5))


# --- the gate ----------------------------------------------------------------------

def codec_ratio() -> tuple[float, dict]:
    """decode_count of the same realistic buffer by both decoders, best of several."""
    assert codec.decode_count(MIX) == ref.decode_count(MIX) == MIX_COUNT
    ratio, fast, slow = paired_ratio(lambda: codec.decode_count(MIX), lambda: ref.decode_count(MIX), 5)
    return ratio, {"cython_packets_per_s": round(MIX_COUNT / fast),
                         "reference_packets_per_s": round(MIX_COUNT / slow)}


GATE = Gate("codec", codec_ratio, GATE_RATIO, "the Cython codec vs the pure-Python reference")


def test_gate_cython_codec_vs_reference(request):
    check_gate(GATE, request)


def codec5_ratio() -> tuple[float, dict]:
    """The same for MQTT 5.0: decode_count of the 5.0 mix by both decoders."""
    assert codec5.decode_count(MIX5) == ref5.decode_count(MIX5) == MIX5_COUNT
    ratio, fast, slow = paired_ratio(lambda: codec5.decode_count(MIX5), lambda: ref5.decode_count(MIX5), 5)
    return ratio, {"cython_packets_per_s": round(MIX5_COUNT / fast),
                   "reference_packets_per_s": round(MIX5_COUNT / slow)}


GATE5 = Gate("codec5", codec5_ratio, GATE5_RATIO, "the Cython 5.0 codec vs its pure-Python reference")


def gates() -> list[Gate]:
    return [GATE, GATE5]


def test_gate_cython_codec5_vs_reference(request):
    check_gate(GATE5, request)
