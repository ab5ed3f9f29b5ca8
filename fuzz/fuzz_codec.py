"""Fuzz target `codec`: the MQTT codec's decoders (gw_ext/codec.pyx, the C
functions the worker calls, through their Python API) against the pure-Python
reference (tests/mqtt_ref.py, the tests' oracle): for any bytes and packet-size limit both accept
the same packets or both refuse, for the same reason, with control characters
refused or allowed (the first byte's top bit); decode_count agrees;
what was decoded encodes to the same bytes with both encoders, and decodes
back to itself.

    ./dev fuzz codec 60
"""

from __future__ import annotations

import sys

import common  # the import path of the instrumented build first; the fuzzing loop

sys.path.insert(1, str(common.REPO / "tests"))     # the reference codec, a test oracle; decode_outcome

LIMITS = (268435455, 0, 2, 16, 127, 128, 16383, 16384)


def TestOneInput(data: bytes) -> None:
    # Imported here, after common.fuzz() imported gw.packets instrumented.
    import mqtt_ref as ref
    from decode_outcome import outcome
    from gw_ext import codec

    limit = LIMITS[data[0] % len(LIMITS)] if data else LIMITS[0]
    allow_control = bool(data[0] & 0x80) if data else False
    data = data[1:]
    codec.allow_control_characters(allow_control)
    ref.allow_control_characters(allow_control)
    got = outcome(codec.decode, data, limit)
    want = outcome(ref.decode, data, limit)
    if got != want:
        raise AssertionError(f"decode: codec {got!r}, reference {want!r}")
    counted = outcome(codec.decode_count, data, limit)
    if counted != outcome(ref.decode_count, data, limit):
        raise AssertionError(f"decode_count: codec {counted!r}, reference {outcome(ref.decode_count, data, limit)!r}")
    if got[0] != "ok":
        if counted != got:
            raise AssertionError(f"decode refused {got!r}, decode_count {counted!r}")
        return
    packets, consumed = got[1]
    if counted != ("ok", len(packets)):
        raise AssertionError(f"decode found {len(packets)} packets, decode_count {counted!r}")
    for p in packets:
        try:
            wire = codec.encode(p)
        except ValueError:
            continue            # a packet only a client sends with fields the encoder bounds
        if wire != ref.encode(p):
            raise AssertionError(f"encoders differ for {p!r}: {wire!r} / {ref.encode(p)!r}")
        again = codec.decode(wire)
        if again != ([p], len(wire)):
            raise AssertionError(f"{p!r} encodes to {wire!r}, which decodes to {again!r}")


def main() -> None:
    common.fuzz(TestOneInput, instrumented=("mqtt_ref", "gw.packets"))


if __name__ == "__main__":
    main()
