"""MQTT 3.1.1 control packets as plain Python values, shared by both codecs.

``gw_ext.codec`` (Cython) and the tests' reference codec (tests/mqtt_ref.py,
pure Python) decode bytes into these structs and encode them back. Field
types follow the standard: topic names, topic filters, client ids and user
names are ``str`` (UTF-8 on the wire); payloads, will messages and passwords
are ``bytes``.

Conventions:

* ``Publish.packet_id`` is 0 for QoS 0 (no identifier on the wire).
* ``Connect``: the will is present iff ``will_topic is not None`` (then
  ``will_message`` is bytes); user name / password are present iff not None.
  ``protocol_level`` 4 is sent with the name "MQTT", 3 with "MQIsdp".
"""

from __future__ import annotations

from typing import ClassVar, Union

import msgspec

# The control packet types (section 2.2.1), defined once for the compiled codec
# and Python: gw_ext/packet_types.pxd.
from gw_ext.packet_types import (
    CONNACK, CONNECT, DISCONNECT, PINGREQ, PINGRESP, PUBACK, PUBCOMP, PUBLISH, PUBREC, PUBREL,
    SUBACK, SUBSCRIBE, UNSUBACK, UNSUBSCRIBE,
)

__all__ = [
    "CONNECT", "CONNACK", "PUBLISH", "PUBACK", "PUBREC", "PUBREL", "PUBCOMP",
    "SUBSCRIBE", "SUBACK", "UNSUBSCRIBE", "UNSUBACK", "PINGREQ", "PINGRESP",
    "DISCONNECT", "MAX_REMAINING_LENGTH", "MALFORMED_REASONS",
    "Connect", "Connack", "Publish", "Puback", "Pubrec", "Pubrel", "Pubcomp",
    "Subscribe", "Suback", "Unsubscribe", "Unsuback", "Pingreq", "Pingresp",
    "Disconnect", "Packet",
    "ProtocolError", "MalformedPacket", "PacketTooLarge", "ConnectRefused",
]

# Largest value the 4-byte Remaining Length field can carry (section 2.2.3).
MAX_REMAINING_LENGTH = 268_435_455

# MalformedPacket.reason values, indexed by the MAL_* codes of gw_ext/codec.pxd.
MALFORMED_REASONS = {
    1: "header",      # reserved type, bad fixed-header flags
    2: "length",      # remaining length over 4 bytes, truncated or trailing bytes
    3: "utf8",        # ill-formed UTF-8, U+0000 or a surrogate
    4: "protocol",    # bad protocol name, reserved connect flag, will flags
    5: "topic",       # empty topic or filter, wildcard in a topic name, bad filter (a/#/b, a+)
    6: "qos",         # QoS 3 / reserved QoS bits
    7: "packet_id",   # packet identifier 0 where one is required
    8: "empty",       # SUBSCRIBE/UNSUBSCRIBE/SUBACK without entries
    9: "control",     # a control character in a client id, user name, topic or filter
    # Reported by the server's handlers, never by the decoders:
    10: "server_packet",  # a client sending CONNACK, SUBACK, UNSUBACK or PINGRESP
    11: "ack",            # an acknowledgement of the wrong kind for its flow
}


class _Packet(msgspec.Struct, frozen=True, eq=True):
    type: ClassVar[int] = 0


class _PacketIdOnly(_Packet, frozen=True, eq=True):
    """The acknowledgements that are a packet identifier alone."""
    packet_id: int


class Connect(_Packet, frozen=True, eq=True):
    type: ClassVar[int] = CONNECT
    client_id: str
    clean_session: bool = True
    keepalive: int = 60
    will_topic: str | None = None
    will_message: bytes | None = None
    will_qos: int = 0
    will_retain: bool = False
    username: str | None = None
    password: bytes | None = None
    protocol_level: int = 4


class Connack(_Packet, frozen=True, eq=True):
    type: ClassVar[int] = CONNACK
    session_present: bool = False
    return_code: int = 0


class Publish(_Packet, frozen=True, eq=True):
    type: ClassVar[int] = PUBLISH
    topic: str
    payload: bytes = b""
    qos: int = 0
    retain: bool = False
    dup: bool = False
    packet_id: int = 0


class Puback(_PacketIdOnly, frozen=True, eq=True):
    type: ClassVar[int] = PUBACK


class Pubrec(_PacketIdOnly, frozen=True, eq=True):
    type: ClassVar[int] = PUBREC


class Pubrel(_PacketIdOnly, frozen=True, eq=True):
    type: ClassVar[int] = PUBREL


class Pubcomp(_PacketIdOnly, frozen=True, eq=True):
    type: ClassVar[int] = PUBCOMP


class Subscribe(_Packet, frozen=True, eq=True):
    type: ClassVar[int] = SUBSCRIBE
    packet_id: int
    topics: list[tuple[str, int]]   # (topic filter, requested QoS)


class Suback(_Packet, frozen=True, eq=True):
    type: ClassVar[int] = SUBACK
    packet_id: int
    return_codes: list[int]          # 0, 1, 2 or 0x80 per filter


class Unsubscribe(_Packet, frozen=True, eq=True):
    type: ClassVar[int] = UNSUBSCRIBE
    packet_id: int
    topics: list[str]


class Unsuback(_PacketIdOnly, frozen=True, eq=True):
    type: ClassVar[int] = UNSUBACK


class Pingreq(_Packet, frozen=True, eq=True):
    type: ClassVar[int] = PINGREQ


class Pingresp(_Packet, frozen=True, eq=True):
    type: ClassVar[int] = PINGRESP


class Disconnect(_Packet, frozen=True, eq=True):
    type: ClassVar[int] = DISCONNECT


Packet = Union[
    Connect, Connack, Publish, Puback, Pubrec, Pubrel, Pubcomp, Subscribe,
    Suback, Unsubscribe, Unsuback, Pingreq, Pingresp, Disconnect,
]


class ProtocolError(ValueError):
    """Base of the decode errors: the connection cannot go on as it is."""


class MalformedPacket(ProtocolError):
    """A protocol violation: close the connection (no CONNACK)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class PacketTooLarge(ProtocolError):
    """The remaining length is above the caller's limit."""

    reason = "too_large"

    def __init__(self, remaining_length: int, limit: int):
        super().__init__(f"remaining length {remaining_length} exceeds {limit}")
        self.remaining_length = remaining_length
        self.limit = limit


class ConnectRefused(ProtocolError):
    """A well-formed CONNECT the server answers with a non-zero CONNACK.

    return_code is 1 (unacceptable protocol level) or 2 (identifier rejected).
    """

    def __init__(self, return_code: int):
        super().__init__(f"CONNACK return code {return_code}")
        self.return_code = return_code
        self.reason = "refused"
