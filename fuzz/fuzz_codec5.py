"""Fuzz target `codec5`: the MQTT 5.0 codec's decoders (gw_ext/codec5.pyx, the
C functions a worker will call, through their Python API) against the
pure-Python reference (tests/mqtt5_ref.py, the tests' oracle): for any bytes
and packet-size limit both accept the same packets or both refuse, for the
same reason and with the same reason code (0x81 Malformed Packet, 0x82
Protocol Error), with control characters refused or allowed (the first byte's
top bit); decode_count agrees; what was decoded encodes to the same bytes
with both encoders and decodes back to itself. With the first byte's bit 6
set, the rest is wrapped in a fixed header (its first byte, then the length
of what follows) so that most inputs reach a body decoder.

    ./dev fuzz codec5 60
"""

from __future__ import annotations

import sys

import common  # the import path of the instrumented build first; the fuzzing loop

sys.path.insert(1, str(common.REPO / "tests"))     # the reference codecs, test oracles; decode_outcome

LIMITS = (268435455, 0, 2, 16, 127, 128, 16383, 16384)


def TestOneInput(data: bytes) -> None:
    # Imported here, after common.fuzz() imported gw.packets5 instrumented.
    import mqtt5_ref as ref
    import mqtt_ref as ref3
    from decode_outcome import outcome5
    from gw_ext import codec, codec5

    mode = data[0] if data else 0
    limit = LIMITS[mode % len(LIMITS)]
    allow_control = bool(mode & 0x80)
    data = data[1:]
    if mode & 0x40 and data:
        data = data[:1] + common.varint(len(data) - 1) + data[1:]
    codec.allow_control_characters(allow_control)
    ref3.allow_control_characters(allow_control)
    got = outcome5(codec5.decode, data, limit)
    want = outcome5(ref.decode, data, limit)
    if got != want:
        raise AssertionError(f"decode: codec5 {got!r}, reference {want!r}")
    counted = outcome5(codec5.decode_count, data, limit)
    if counted != outcome5(ref.decode_count, data, limit):
        raise AssertionError(f"decode_count: codec5 {counted!r}, reference {outcome5(ref.decode_count, data, limit)!r}")
    if got[0] != "ok":
        if counted != got:
            raise AssertionError(f"decode refused {got!r}, decode_count {counted!r}")
        return
    packets, consumed = got[1]
    if counted != ("ok", len(packets)):
        raise AssertionError(f"decode found {len(packets)} packets, decode_count {counted!r}")
    for p in packets:
        wire = codec5.encode(p)
        if wire != ref.encode(p):
            raise AssertionError(f"encoders differ for {p!r}: {wire!r} / {ref.encode(p)!r}")
        again = codec5.decode(wire)
        if again != ([p], len(wire)):
            raise AssertionError(f"{p!r} encodes to {wire!r}, which decodes to {again!r}")


def main() -> None:
    common.fuzz(TestOneInput, instrumented=("mqtt5_ref", "gw.packets5"))


if __name__ == "__main__":
    main()
