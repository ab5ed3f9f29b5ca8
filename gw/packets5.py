"""MQTT 5.0 control packets as plain Python values, shared by both v5 codecs.

``gw_ext.codec5`` (Cython) and the tests' reference (tests/mqtt5_ref.py, pure
Python) decode bytes into these structs and encode them back. They are kept
apart from the 3.1.1 structs of gw/packets.py (a connection speaks one
version, chosen by its CONNECT): same names, different fields, every packet
but PINGREQ/PINGRESP (the same bytes in both versions) carrying
``properties``.

Conventions:

* ``Properties``: one field per property of the standard (section 2.2.2.2),
  ``None`` when absent; ``subscription_identifiers`` and ``user_properties``
  are tuples, in the order they came (MQTT-3.3.2-18). Encoders write the
  properties in ascending identifier order.
* ``Publish.packet_id`` is 0 for QoS 0; an empty ``topic`` goes with a
  Topic Alias property.
* ``Subscribe.topics``: (topic filter, subscription options byte): bits 0-1
  the maximum QoS, bit 2 No Local, bit 3 Retain As Published, bits 4-5 Retain
  Handling (section 3.8.3.1); ``subscription_options`` builds the byte.
* ``Connect``: the will is present iff ``will_topic is not None``; user name
  and password each present iff not None (a password alone is allowed in 5.0).
* The acknowledgements' ``reason_code`` defaults to 0x00 (Success).

Decode errors: ``MalformedPacket5`` (reason code 0x81) and ``ProtocolError5``
(0x82), both subclasses of gw.packets' MalformedPacket (so a handler that
closes on MalformedPacket closes on them too), each with ``reason`` (a short
name, below) and ``reason_code`` (what a v5 DISCONNECT or CONNACK says);
``ConnectRefused(0x84)`` for a CONNECT of another protocol version;
``PacketTooLarge`` as for 3.1.1.
"""

from __future__ import annotations

from typing import ClassVar, Union

import msgspec

from gw.packets import MAX_REMAINING_LENGTH, ConnectRefused, MalformedPacket, PacketTooLarge, Pingreq, Pingresp
from gw_ext.packet_types import (
    CONNACK, CONNECT, DISCONNECT, PINGREQ, PINGRESP, PUBACK, PUBCOMP, PUBLISH, PUBREC, PUBREL,
    SUBACK, SUBSCRIBE, UNSUBACK, UNSUBSCRIBE,
)

__all__ = [
    "AUTH", "MAX_REMAINING_LENGTH", "PROPERTY_NAMES", "MALFORMED", "PROTOCOL_ERROR", "REASONS",
    "Properties", "EMPTY", "Connect", "Connack", "Publish", "Puback", "Pubrec", "Pubrel", "Pubcomp",
    "Subscribe", "Suback", "Unsubscribe", "Unsuback", "Pingreq", "Pingresp", "Disconnect", "Auth",
    "Packet", "subscription_options",
    "MalformedPacket5", "ProtocolError5", "MalformedPacket", "PacketTooLarge", "ConnectRefused",
    "CONNECT", "CONNACK", "PUBLISH", "PUBACK", "PUBREC", "PUBREL", "PUBCOMP", "SUBSCRIBE", "SUBACK",
    "UNSUBSCRIBE", "UNSUBACK", "PINGREQ", "PINGRESP", "DISCONNECT",
]

AUTH = 15                     # the packet type MQTT 5.0 gives the reserved 15 (section 2.1.2)
PROTOCOL_LEVEL = 5
UNSUPPORTED_PROTOCOL_VERSION = 0x84
MALFORMED = 0x81
PROTOCOL_ERROR = 0x82

# The reason names of the decode errors, indexed by the R5_* codes of
# gw_ext/codec5.pxd, and the reason code each is answered with: 0x81
# (Malformed Packet) or 0x82 (Protocol Error), as section 4.13 and the
# statements cited in codec5.pxd classify them.
REASONS = {
    1: ("header", MALFORMED),           # reserved type or fixed-header flags (MQTT-2.1.3-1), DUP on QoS 0
    2: ("length", MALFORMED),           # a field, a property or the property block past its end; trailing bytes
    3: ("varint", MALFORMED),           # a Variable Byte Integer over 4 bytes or not minimal (MQTT-1.5.5-1)
    4: ("utf8", MALFORMED),             # ill-formed UTF-8 or U+0000 (MQTT-1.5.4-1/2, MQTT-1.5.7-1)
    5: ("control", MALFORMED),          # a control character where the policy refuses them (section 1.5.4)
    6: ("protocol", MALFORMED),         # protocol name, CONNECT/CONNACK reserved flags, will flags
    7: ("qos", MALFORMED),              # PUBLISH or will QoS 3 (MQTT-3.3.1-4, MQTT-3.1.2-12)
    8: ("topic", MALFORMED),            # empty filter, wildcard in a topic name, bad filter or share name
    9: ("property", MALFORMED),         # a property identifier unknown or not valid in the packet (2.2.2.2)
    10: ("options", MALFORMED),         # reserved bits of the subscription options (MQTT-3.8.3-5)
    11: ("duplicate_property", PROTOCOL_ERROR),  # a property twice but User Property / Subscription Identifier
    12: ("property_value", PROTOCOL_ERROR),      # Receive Maximum 0, Topic Alias 0, a flag not 0 or 1, ...
    13: ("packet_id", PROTOCOL_ERROR),           # packet identifier 0 (MQTT-2.2.1-3)
    14: ("empty", PROTOCOL_ERROR),               # SUBSCRIBE/UNSUBSCRIBE/SUBACK/UNSUBACK without entries
    15: ("reason_code", PROTOCOL_ERROR),         # a reason code the packet may not carry
    16: ("subscription", PROTOCOL_ERROR),        # options QoS 3, Retain Handling 3, No Local on a shared one
    17: ("topic_alias", PROTOCOL_ERROR),         # an empty topic name without a Topic Alias
    18: ("session_present", PROTOCOL_ERROR),     # CONNACK Session Present 1 with a refusal (MQTT-3.2.2-6)
    19: ("authentication", PROTOCOL_ERROR),      # Authentication Data without Method; AUTH without Method
}

# Property identifier -> Properties field (section 2.2.2.2, Table 2-4).
PROPERTY_NAMES = {
    0x01: "payload_format_indicator",
    0x02: "message_expiry_interval",
    0x03: "content_type",
    0x08: "response_topic",
    0x09: "correlation_data",
    0x0B: "subscription_identifiers",
    0x11: "session_expiry_interval",
    0x12: "assigned_client_identifier",
    0x13: "server_keep_alive",
    0x15: "authentication_method",
    0x16: "authentication_data",
    0x17: "request_problem_information",
    0x18: "will_delay_interval",
    0x19: "request_response_information",
    0x1A: "response_information",
    0x1C: "server_reference",
    0x1F: "reason_string",
    0x21: "receive_maximum",
    0x22: "topic_alias_maximum",
    0x23: "topic_alias",
    0x24: "maximum_qos",
    0x25: "retain_available",
    0x26: "user_properties",
    0x27: "maximum_packet_size",
    0x28: "wildcard_subscription_available",
    0x29: "subscription_identifier_available",
    0x2A: "shared_subscription_available",
}


class Properties(msgspec.Struct, frozen=True, eq=True):
    """The properties of one packet (or of a will); fields in identifier order."""
    payload_format_indicator: int | None = None
    message_expiry_interval: int | None = None
    content_type: str | None = None
    response_topic: str | None = None
    correlation_data: bytes | None = None
    subscription_identifiers: tuple[int, ...] = ()
    session_expiry_interval: int | None = None
    assigned_client_identifier: str | None = None
    server_keep_alive: int | None = None
    authentication_method: str | None = None
    authentication_data: bytes | None = None
    request_problem_information: int | None = None
    will_delay_interval: int | None = None
    request_response_information: int | None = None
    response_information: str | None = None
    server_reference: str | None = None
    reason_string: str | None = None
    receive_maximum: int | None = None
    topic_alias_maximum: int | None = None
    topic_alias: int | None = None
    maximum_qos: int | None = None
    retain_available: int | None = None
    user_properties: tuple[tuple[str, str], ...] = ()
    maximum_packet_size: int | None = None
    wildcard_subscription_available: int | None = None
    subscription_identifier_available: int | None = None
    shared_subscription_available: int | None = None


EMPTY = Properties()


def subscription_options(qos: int = 0, no_local: bool = False, retain_as_published: bool = False,
                         retain_handling: int = 0) -> int:
    """The subscription options byte (section 3.8.3.1)."""
    return qos | (4 if no_local else 0) | (8 if retain_as_published else 0) | (retain_handling << 4)


class _Packet(msgspec.Struct, frozen=True, eq=True):
    type: ClassVar[int] = 0


class Connect(_Packet, frozen=True, eq=True):
    type: ClassVar[int] = CONNECT
    client_id: str
    clean_start: bool = True
    keepalive: int = 60
    properties: Properties = EMPTY
    will_topic: str | None = None
    will_message: bytes | None = None
    will_qos: int = 0
    will_retain: bool = False
    will_properties: Properties = EMPTY
    username: str | None = None
    password: bytes | None = None


class Connack(_Packet, frozen=True, eq=True):
    type: ClassVar[int] = CONNACK
    session_present: bool = False
    reason_code: int = 0
    properties: Properties = EMPTY


class Publish(_Packet, frozen=True, eq=True):
    type: ClassVar[int] = PUBLISH
    topic: str
    payload: bytes = b""
    qos: int = 0
    retain: bool = False
    dup: bool = False
    packet_id: int = 0
    properties: Properties = EMPTY


class _Ack(_Packet, frozen=True, eq=True):
    packet_id: int
    reason_code: int = 0
    properties: Properties = EMPTY


class Puback(_Ack, frozen=True, eq=True):
    type: ClassVar[int] = PUBACK


class Pubrec(_Ack, frozen=True, eq=True):
    type: ClassVar[int] = PUBREC


class Pubrel(_Ack, frozen=True, eq=True):
    type: ClassVar[int] = PUBREL


class Pubcomp(_Ack, frozen=True, eq=True):
    type: ClassVar[int] = PUBCOMP


class Subscribe(_Packet, frozen=True, eq=True):
    type: ClassVar[int] = SUBSCRIBE
    packet_id: int
    topics: list[tuple[str, int]]      # (topic filter, subscription options byte)
    properties: Properties = EMPTY


class Suback(_Packet, frozen=True, eq=True):
    type: ClassVar[int] = SUBACK
    packet_id: int
    reason_codes: list[int]
    properties: Properties = EMPTY


class Unsubscribe(_Packet, frozen=True, eq=True):
    type: ClassVar[int] = UNSUBSCRIBE
    packet_id: int
    topics: list[str]
    properties: Properties = EMPTY


class Unsuback(_Packet, frozen=True, eq=True):
    type: ClassVar[int] = UNSUBACK
    packet_id: int
    reason_codes: list[int]
    properties: Properties = EMPTY


class Disconnect(_Packet, frozen=True, eq=True):
    type: ClassVar[int] = DISCONNECT
    reason_code: int = 0
    properties: Properties = EMPTY


class Auth(_Packet, frozen=True, eq=True):
    type: ClassVar[int] = AUTH
    reason_code: int = 0
    properties: Properties = EMPTY


Packet = Union[
    Connect, Connack, Publish, Puback, Pubrec, Pubrel, Pubcomp, Subscribe, Suback, Unsubscribe,
    Unsuback, Pingreq, Pingresp, Disconnect, Auth,
]


class _V5Error(MalformedPacket):
    reason_code: int = MALFORMED


class MalformedPacket5(_V5Error):
    """A packet that cannot be parsed as the standard says: DISCONNECT (or
    CONNACK) 0x81, then close (section 4.13)."""
    reason_code = MALFORMED


class ProtocolError5(_V5Error):
    """A packet parsed but holding what the protocol does not allow:
    DISCONNECT (or CONNACK) 0x82, then close (section 4.13)."""
    reason_code = PROTOCOL_ERROR


def decode_error(code: int) -> MalformedPacket:
    """The exception for an R5_* reason code (REASONS)."""
    name, cls = REASONS.get(code, ("unknown", MALFORMED))
    return (MalformedPacket5 if cls == MALFORMED else ProtocolError5)(name)
