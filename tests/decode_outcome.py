"""A decoder's result as a value to compare: what the codec's property tests
(tests/test_codec.py) and its fuzz target (fuzz/fuzz_codec.py) hold the
product's decoders and the reference (tests/mqtt_ref.py) to agree on."""

from __future__ import annotations

from gw.packets import MAX_REMAINING_LENGTH, ConnectRefused, MalformedPacket, PacketTooLarge


def outcome(decode, data: bytes, limit: int = MAX_REMAINING_LENGTH) -> tuple:
    """("ok", what decode returned), or the refusal with what says why:
    ("refused", return code), ("too_large", remaining length, limit) or
    ("malformed", reason)."""
    try:
        return ("ok", decode(data, limit))
    except ConnectRefused as e:
        return ("refused", e.return_code)
    except PacketTooLarge as e:
        return ("too_large", e.remaining_length, e.limit)
    except MalformedPacket as e:
        return ("malformed", e.reason)
