"""A decoder's result as a value to compare: what the codecs' property tests
(tests/test_codec.py, tests/test_codec5.py) and fuzz targets (fuzz/fuzz_codec.py,
fuzz/fuzz_codec5.py) hold the product's decoders and the references
(tests/mqtt_ref.py, tests/mqtt5_ref.py) to agree on."""

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


def outcome5(decode, data: bytes, limit: int = MAX_REMAINING_LENGTH) -> tuple:
    """outcome() for the MQTT 5.0 decoders: a refusal of a bad packet also says
    its reason code, ("malformed", reason, 0x81) or ("malformed", reason,
    0x82) (a Protocol Error)."""
    try:
        return ("ok", decode(data, limit))
    except ConnectRefused as e:
        return ("refused", e.return_code)
    except PacketTooLarge as e:
        return ("too_large", e.remaining_length, e.limit)
    except MalformedPacket as e:
        return ("malformed", e.reason, getattr(e, "reason_code", None))
