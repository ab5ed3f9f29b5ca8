# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""MQTT 5.0 codec: C-level decoders/encoders (see codec5.pxd) and a small Python API.

The cdef functions are `noexcept nogil`, allocate nothing and keep decoded
fields as Slices into the caller's buffer; strings and topics are checked by
the 3.1.1 codec's functions (one control-character policy for both:
gw_ext.codec.allow_control_characters). The Python API on top of them:

* ``decode(data, max_packet_size)`` -> ``(packets, consumed)`` (gw.packets5 structs)
* ``decode_count(data, max_packet_size)``: packets decoded and validated with
  the C functions only (what the server does per packet)
* ``encode(packet)`` -> ``bytes``
* ``connect_protocol_level(body)`` and ``Decoder``: a connection's codec
  chosen by its CONNECT.

Errors: gw.packets5's MalformedPacket5 (0x81) and ProtocolError5 (0x82) with
the reason, PacketTooLarge, ConnectRefused(0x84) for a CONNECT of another
version. Check order (mirrored by tests/mqtt5_ref.py, the tests' oracle): the
fixed header (type and flags, remaining length, PINGREQ/PINGRESP size, the
limit); then the body field by field, each field's size before its content;
a property's identifier, its value's size, a duplicate, then its content;
checks of the whole packet last.
"""

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy, memcmp
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING
from cpython.unicode cimport PyUnicode_DecodeUTF8, PyUnicode_AsUTF8AndSize

from gw_ext.codec cimport (
    check_string, check_topic_name, valid_utf8, valid_topic_filter, header_size, write_header,
    decode_header, MAL_UTF8, MAL_CONTROL,
)
from gw_ext import codec as _codec3
import msgspec

from gw.packets5 import (
    Auth, Connack, Connect, Disconnect, Pingreq, Pingresp, Properties, Puback, Pubcomp, Publish, Pubrec,
    Pubrel, Suback, Subscribe, Unsuback, Unsubscribe, EMPTY, MAX_REMAINING_LENGTH, PROPERTY_NAMES,
    ConnectRefused, PacketTooLarge, decode_error,
)

cdef extern from *:
    """
    #define GW5_B(x) (1u << (x))
    #define GW5_BIT(i) (1ULL << (i))
    #define GW5_PUB_WILL (GW5_B(3) | GW5_B(0))
    #define GW5_ALL (GW5_B(0) | GW5_B(1) | GW5_B(2) | GW5_B(3) | GW5_B(4) | GW5_B(5) | GW5_B(6) | GW5_B(7) \\
                     | GW5_B(8) | GW5_B(9) | GW5_B(10) | GW5_B(11) | GW5_B(14) | GW5_B(15))
    /* Fixed-header flags (2.1.3, Table 2-2); 0xFF: reserved type 0, 0xFE: PUBLISH. */
    static const unsigned char gw5_header_flags[16] =
        {0xFF, 0, 0, 0xFE, 0, 0, 2, 0, 2, 0, 2, 0, 0, 0, 0, 0};
    /* Property value types (2.2.2.2, Table 2-4): 0 unknown, 1 byte, 2 two-byte,
       3 four-byte integer, 4 variable byte integer, 5 UTF-8 string, 6 binary, 7 string pair. */
    static const unsigned char gw5_prop_kind[64] = {
        [0x01] = 1, [0x02] = 3, [0x03] = 5, [0x08] = 5, [0x09] = 6, [0x0B] = 4, [0x11] = 3,
        [0x12] = 5, [0x13] = 2, [0x15] = 5, [0x16] = 6, [0x17] = 1, [0x18] = 3, [0x19] = 1,
        [0x1A] = 5, [0x1C] = 5, [0x1F] = 5, [0x21] = 2, [0x22] = 2, [0x23] = 2, [0x24] = 1,
        [0x25] = 1, [0x26] = 7, [0x27] = 3, [0x28] = 1, [0x29] = 1, [0x2A] = 1,
    };
    /* Where each may appear: bit (1 << packet type), bit 0 the will's properties. */
    static const unsigned short gw5_prop_ctx[64] = {
        [0x01] = GW5_PUB_WILL, [0x02] = GW5_PUB_WILL, [0x03] = GW5_PUB_WILL, [0x08] = GW5_PUB_WILL,
        [0x09] = GW5_PUB_WILL, [0x0B] = GW5_B(3) | GW5_B(8),
        [0x11] = GW5_B(1) | GW5_B(2) | GW5_B(14), [0x12] = GW5_B(2), [0x13] = GW5_B(2),
        [0x15] = GW5_B(1) | GW5_B(2) | GW5_B(15), [0x16] = GW5_B(1) | GW5_B(2) | GW5_B(15),
        [0x17] = GW5_B(1), [0x18] = GW5_B(0), [0x19] = GW5_B(1), [0x1A] = GW5_B(2),
        [0x1C] = GW5_B(2) | GW5_B(14),
        [0x1F] = GW5_B(2) | GW5_B(4) | GW5_B(5) | GW5_B(6) | GW5_B(7) | GW5_B(9) | GW5_B(11) | GW5_B(14)
                 | GW5_B(15),
        [0x21] = GW5_B(1) | GW5_B(2), [0x22] = GW5_B(1) | GW5_B(2), [0x23] = GW5_B(3),
        [0x24] = GW5_B(2), [0x25] = GW5_B(2), [0x26] = GW5_ALL, [0x27] = GW5_B(1) | GW5_B(2),
        [0x28] = GW5_B(2), [0x29] = GW5_B(2), [0x2A] = GW5_B(2),
    };
    /* The reason codes each packet type may carry (3.2.2.2, 3.4.2.1, 3.5.2.1,
       3.6.2.1, 3.7.2.1, 3.9.3, 3.11.3, 3.14.2.1, 3.15.2.1). */
    static const unsigned char gw5_reason_ok[16][256] = {
        [2] = {[0x00] = 1, [0x80] = 1, [0x81] = 1, [0x82] = 1, [0x83] = 1, [0x84] = 1, [0x85] = 1,
               [0x86] = 1, [0x87] = 1, [0x88] = 1, [0x89] = 1, [0x8A] = 1, [0x8C] = 1, [0x90] = 1,
               [0x95] = 1, [0x97] = 1, [0x99] = 1, [0x9A] = 1, [0x9B] = 1, [0x9C] = 1, [0x9D] = 1,
               [0x9F] = 1},
        [4] = {[0x00] = 1, [0x10] = 1, [0x80] = 1, [0x83] = 1, [0x87] = 1, [0x90] = 1, [0x91] = 1,
               [0x97] = 1, [0x99] = 1},
        [5] = {[0x00] = 1, [0x10] = 1, [0x80] = 1, [0x83] = 1, [0x87] = 1, [0x90] = 1, [0x91] = 1,
               [0x97] = 1, [0x99] = 1},
        [6] = {[0x00] = 1, [0x92] = 1},
        [7] = {[0x00] = 1, [0x92] = 1},
        [9] = {[0x00] = 1, [0x01] = 1, [0x02] = 1, [0x80] = 1, [0x83] = 1, [0x87] = 1, [0x8F] = 1,
               [0x91] = 1, [0x97] = 1, [0x9E] = 1, [0xA1] = 1, [0xA2] = 1},
        [11] = {[0x00] = 1, [0x11] = 1, [0x80] = 1, [0x83] = 1, [0x87] = 1, [0x8F] = 1, [0x91] = 1},
        [14] = {[0x00] = 1, [0x04] = 1, [0x80] = 1, [0x81] = 1, [0x82] = 1, [0x83] = 1, [0x87] = 1,
                [0x89] = 1, [0x8B] = 1, [0x8D] = 1, [0x8E] = 1, [0x8F] = 1, [0x90] = 1, [0x93] = 1,
                [0x94] = 1, [0x95] = 1, [0x96] = 1, [0x97] = 1, [0x98] = 1, [0x99] = 1, [0x9A] = 1,
                [0x9B] = 1, [0x9C] = 1, [0x9D] = 1, [0x9E] = 1, [0x9F] = 1, [0xA0] = 1, [0xA1] = 1,
                [0xA2] = 1},
        [15] = {[0x00] = 1, [0x18] = 1, [0x19] = 1},
    };
    """
    const uint8_t gw5_header_flags[16]
    const uint8_t gw5_prop_kind[64]
    const uint16_t gw5_prop_ctx[64]
    const uint8_t gw5_reason_ok[16][256]
    uint64_t GW5_BIT(int i) nogil

cdef enum:
    MAX_REMAINING = 268435455
    K_BYTE = 1
    K_U16 = 2
    K_U32 = 3
    K_VBI = 4
    K_STR = 5
    K_BIN = 6
    K_PAIR = 7

# Properties that are 0 or 1 (a Protocol Error otherwise): Payload Format
# Indicator (3.3.2.3.2), Request Problem / Response Information (3.1.2.11.7,
# 3.1.2.11.6), Maximum QoS (3.2.2.3.4), Retain / Wildcard Subscription /
# Subscription Identifier / Shared Subscription Available (3.2.2.3.5, 11-13).
cdef uint64_t FLAG_PROPS = ((GW5_BIT(P_PAYLOAD_FORMAT)) | (GW5_BIT(P_REQUEST_PROBLEM)) | (GW5_BIT(P_REQUEST_RESPONSE))
                            | (GW5_BIT(P_MAXIMUM_QOS)) | (GW5_BIT(P_RETAIN_AVAILABLE)) | (GW5_BIT(P_WILDCARD_AVAILABLE))
                            | (GW5_BIT(P_SUBSCRIPTION_ID_AVAILABLE)) | (GW5_BIT(P_SHARED_AVAILABLE)))
# Properties that are a Protocol Error when 0: Subscription Identifier
# (3.3.2.3.8, 3.8.2.1.2), Receive Maximum (3.1.2.11.3, 3.2.2.3.3), Topic Alias
# (MQTT-3.3.2-8), Maximum Packet Size (3.1.2.11.4, 3.2.2.3.6).
cdef uint64_t NOT_ZERO_PROPS = ((GW5_BIT(P_SUBSCRIPTION_ID)) | (GW5_BIT(P_RECEIVE_MAXIMUM)) | (GW5_BIT(P_TOPIC_ALIAS))
                                | (GW5_BIT(P_MAXIMUM_PACKET_SIZE)))


# --- small helpers -------------------------------------------------------------

cdef inline int _fail(int* reason, int why) noexcept nogil:
    reason[0] = why
    return ERR_PROTOCOL if why >= R5_DUPLICATE_PROPERTY else ERR_MALFORMED

cdef inline uint32_t _be16(const uint8_t* p) noexcept nogil:
    return (<uint32_t>p[0] << 8) | p[1]

cdef inline uint32_t _be32(const uint8_t* p) noexcept nogil:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | p[3]

cdef inline int _take(const uint8_t* body, uint32_t n, uint32_t* off, Slice* s) noexcept nogil:
    # A 2-byte length prefixed field at body[off], ending by n; -1 if it runs past.
    cdef uint32_t o = off[0]
    cdef uint32_t l
    if n - o < 2:
        return -1
    l = _be16(body + o)
    if n - o - 2 < l:
        return -1
    s.ptr = body + o + 2
    s.len = l
    off[0] = o + 2 + l
    return 0

cdef inline int _vbi(const uint8_t* p, uint32_t n, uint32_t* off, uint32_t* value, int* reason) noexcept nogil:
    # A Variable Byte Integer at p[off] ending by n (section 1.5.5): at most 4
    # bytes, the fewest that hold the value (MQTT-1.5.5-1).
    cdef uint32_t o = off[0]
    cdef uint32_t v = 0
    cdef uint32_t i = 0
    cdef uint8_t b
    while True:
        if o >= n:
            return _fail(reason, R5_LENGTH)
        b = p[o]
        o += 1
        v |= <uint32_t>(b & 0x7F) << (7 * i)
        if not (b & 0x80):
            if i and b == 0:
                return _fail(reason, R5_VARINT)
            break
        i += 1
        if i == 4:
            return _fail(reason, R5_VARINT)
    off[0] = o
    value[0] = v
    return 0

cdef inline int _string(const uint8_t* p, uint32_t n, int* reason) noexcept nogil:
    # A client id, user name, topic or filter: UTF-8 and the control policy.
    cdef int bad = check_string(p, n)
    if bad == 0:
        return 0
    return _fail(reason, R5_UTF8 if bad == MAL_UTF8 else R5_CONTROL)

cdef inline int _topic_name(const uint8_t* p, uint32_t n, int* reason) noexcept nogil:
    # A topic name: _string, then at least one character (MQTT-4.7.3-1), no
    # wildcard (MQTT-3.3.2-2, MQTT-4.7.0-1).
    cdef int bad = check_topic_name(p, n)
    if bad == 0:
        return 0
    return _fail(reason, R5_UTF8 if bad == MAL_UTF8 else R5_CONTROL if bad == MAL_CONTROL else R5_TOPIC)


cdef bint is_shared_filter(const uint8_t* p, uint32_t n) noexcept nogil:
    return n >= 7 and memcmp(p, b"$share/", 7) == 0

cdef inline bint _valid_share(const uint8_t* p, uint32_t n) noexcept nogil:
    # $share/{ShareName}/{filter}: ShareName at least one character, without
    # '/', '+', '#' (MQTT-4.8.2-1), then '/' and a filter (MQTT-4.8.2-2).
    cdef uint32_t i = 7
    while i < n and p[i] != 0x2F:
        if p[i] == 0x2B or p[i] == 0x23:
            return False
        i += 1
    return i > 7 and i < n and i + 1 < n

cdef inline int _topic_filter(const uint8_t* p, uint32_t n, int* reason) noexcept nogil:
    if _string(p, n, reason) < 0:
        return ERR_MALFORMED
    if not valid_topic_filter(p, n):
        return _fail(reason, R5_TOPIC)           # MQTT-4.7.3-1, MQTT-4.7.1-1/2
    if is_shared_filter(p, n) and not _valid_share(p, n):
        return _fail(reason, R5_TOPIC)           # MQTT-4.8.2-1/2
    return 0


# --- properties ----------------------------------------------------------------

cdef int _props(const uint8_t* body, uint32_t n, uint32_t* off, uint8_t ctx, Props5* pr,
                int* reason) noexcept nogil:
    # The Property Length and the properties after it (section 2.2.2), for the
    # packet type ctx (WILL_PROPERTIES: a will's).
    cdef uint32_t size, o, end, v = 0
    cdef uint8_t ident, kind
    cdef uint64_t bit
    cdef Slice s, s2
    cdef int bad
    pr.present = 0
    pr.subscription_id_count = 0
    pr.user_property_count = 0
    pr.raw.ptr = body
    pr.raw.len = 0
    if _vbi(body, n, off, &size, reason) < 0:
        return ERR_MALFORMED
    o = off[0]
    if n - o < size:
        return _fail(reason, R5_LENGTH)
    end = o + size
    pr.raw.ptr = body + o
    pr.raw.len = size
    off[0] = end
    while o < end:
        ident = body[o]
        o += 1
        kind = gw5_prop_kind[ident] if ident < 64 else 0
        if kind == 0 or not ((gw5_prop_ctx[ident] >> ctx) & 1):
            return _fail(reason, R5_PROPERTY)    # section 2.2.2.2
        if kind == K_BYTE:
            if end - o < 1:
                return _fail(reason, R5_LENGTH)
            v = body[o]
            o += 1
        elif kind == K_U16:
            if end - o < 2:
                return _fail(reason, R5_LENGTH)
            v = _be16(body + o)
            o += 2
        elif kind == K_U32:
            if end - o < 4:
                return _fail(reason, R5_LENGTH)
            v = _be32(body + o)
            o += 4
        elif kind == K_VBI:
            if _vbi(body, end, &o, &v, reason) < 0:
                return ERR_MALFORMED
        else:
            if _take(body, end, &o, &s) < 0:
                return _fail(reason, R5_LENGTH)
            if kind == K_PAIR and _take(body, end, &o, &s2) < 0:
                return _fail(reason, R5_LENGTH)
        bit = (<uint64_t>1) << ident
        if (pr.present & bit) and ident != P_USER_PROPERTY and not (ident == P_SUBSCRIPTION_ID and ctx == PUBLISH):
            return _fail(reason, R5_DUPLICATE_PROPERTY)
        pr.present |= bit
        if kind == K_PAIR:
            if not valid_utf8(s.ptr, s.len) or not valid_utf8(s2.ptr, s2.len):
                return _fail(reason, R5_UTF8)    # MQTT-1.5.7-1
            pr.user_property_count += 1
            continue
        if kind == K_STR:
            if ident == P_RESPONSE_TOPIC:
                if _topic_name(s.ptr, s.len, reason) < 0:
                    return ERR_MALFORMED        # MQTT-3.3.2-13/14
            elif not valid_utf8(s.ptr, s.len):
                return _fail(reason, R5_UTF8)
        elif kind != K_BIN:
            if (FLAG_PROPS & bit) and v > 1:
                return _fail(reason, R5_PROPERTY_VALUE)
            if (NOT_ZERO_PROPS & bit) and v == 0:
                return _fail(reason, R5_PROPERTY_VALUE)
        if ident == P_PAYLOAD_FORMAT:
            pr.payload_format = <uint8_t>v
        elif ident == P_MESSAGE_EXPIRY:
            pr.message_expiry = v
        elif ident == P_CONTENT_TYPE:
            pr.content_type = s
        elif ident == P_RESPONSE_TOPIC:
            pr.response_topic = s
        elif ident == P_CORRELATION_DATA:
            pr.correlation_data = s
        elif ident == P_SUBSCRIPTION_ID:
            if pr.subscription_id_count == 0:
                pr.subscription_id = v
            pr.subscription_id_count += 1
        elif ident == P_SESSION_EXPIRY:
            pr.session_expiry = v
        elif ident == P_ASSIGNED_CLIENT_ID:
            pr.assigned_client_id = s
        elif ident == P_SERVER_KEEP_ALIVE:
            pr.server_keep_alive = <uint16_t>v
        elif ident == P_AUTH_METHOD:
            pr.auth_method = s
        elif ident == P_AUTH_DATA:
            pr.auth_data = s
        elif ident == P_REQUEST_PROBLEM:
            pr.request_problem = <uint8_t>v
        elif ident == P_WILL_DELAY:
            pr.will_delay = v
        elif ident == P_REQUEST_RESPONSE:
            pr.request_response = <uint8_t>v
        elif ident == P_RESPONSE_INFO:
            pr.response_info = s
        elif ident == P_SERVER_REFERENCE:
            pr.server_reference = s
        elif ident == P_REASON_STRING:
            pr.reason_string = s
        elif ident == P_RECEIVE_MAXIMUM:
            pr.receive_maximum = <uint16_t>v
        elif ident == P_TOPIC_ALIAS_MAXIMUM:
            pr.topic_alias_maximum = <uint16_t>v
        elif ident == P_TOPIC_ALIAS:
            pr.topic_alias = <uint16_t>v
        elif ident == P_MAXIMUM_QOS:
            pr.maximum_qos = <uint8_t>v
        elif ident == P_RETAIN_AVAILABLE:
            pr.retain_available = <uint8_t>v
        elif ident == P_MAXIMUM_PACKET_SIZE:
            pr.maximum_packet_size = v
        elif ident == P_WILDCARD_AVAILABLE:
            pr.wildcard_available = <uint8_t>v
        elif ident == P_SUBSCRIPTION_ID_AVAILABLE:
            pr.subscription_id_available = <uint8_t>v
        elif ident == P_SHARED_AVAILABLE:
            pr.shared_available = <uint8_t>v
    if (pr.present & (GW5_BIT(P_AUTH_DATA))) and not (pr.present & (GW5_BIT(P_AUTH_METHOD))):
        return _fail(reason, R5_AUTHENTICATION)  # 3.1.2.11.10, 3.2.2.3.18
    return 0


cdef void prop_iter(PropIter* it, const Props5* props) noexcept nogil:
    it.p = props.raw.ptr
    it.end = props.raw.ptr + props.raw.len

cdef int prop_next(PropIter* it, uint8_t* ident, uint32_t* number, Slice* a, Slice* b) noexcept nogil:
    cdef const uint8_t* p = it.p
    cdef uint8_t kind, byte
    cdef uint32_t v = 0
    cdef uint32_t shift = 0
    if p >= it.end:
        return 0
    ident[0] = p[0]
    kind = gw5_prop_kind[p[0]]
    p += 1
    if kind == K_BYTE:
        number[0] = p[0]
        p += 1
    elif kind == K_U16:
        number[0] = _be16(p)
        p += 2
    elif kind == K_U32:
        number[0] = _be32(p)
        p += 4
    elif kind == K_VBI:
        while True:
            byte = p[0]
            p += 1
            v |= <uint32_t>(byte & 0x7F) << shift
            shift += 7
            if not (byte & 0x80):
                break
        number[0] = v
    else:
        a.len = _be16(p)
        a.ptr = p + 2
        p += 2 + a.len
        if kind == K_PAIR:
            b.len = _be16(p)
            b.ptr = p + 2
            p += 2 + b.len
    it.p = p
    return 1


# --- decoding ----------------------------------------------------------------

cdef int decode_header5(const uint8_t* buf, size_t n, uint32_t max_remaining,
                        uint8_t* first, uint32_t* remaining, int* reason) noexcept nogil:
    cdef uint8_t b0, b, t
    cdef uint32_t rem
    cdef int i
    if n == 0:
        return ERR_INCOMPLETE
    b0 = buf[0]
    t = b0 >> 4
    if t == PUBLISH:
        if (b0 & 0x06) == 0x06:
            return _fail(reason, R5_QOS)             # MQTT-3.3.1-4
        if (b0 & 0x0E) == 0x08:
            return _fail(reason, R5_HEADER)          # DUP on QoS 0 (MQTT-3.3.1-2)
    elif (b0 & 0x0F) != gw5_header_flags[t]:
        return _fail(reason, R5_HEADER)              # MQTT-2.1.3-1; type 0 is reserved
    rem = 0
    i = 1
    while True:
        if <size_t>i >= n:
            return ERR_INCOMPLETE
        b = buf[i]
        rem |= <uint32_t>(b & 0x7F) << (7 * (i - 1))
        i += 1
        if not (b & 0x80):
            if i > 2 and b == 0:
                return _fail(reason, R5_VARINT)      # MQTT-1.5.5-1
            break
        if i == 5:
            return _fail(reason, R5_VARINT)          # more than 4 bytes (section 1.5.5)
    if (t == PINGREQ or t == PINGRESP) and rem != 0:
        return _fail(reason, R5_LENGTH)
    first[0] = b0
    remaining[0] = rem
    if rem > max_remaining:
        return ERR_TOO_LARGE
    return i


cdef int connect_protocol_level(const uint8_t* body, uint32_t n) noexcept nogil:
    cdef uint32_t off = 0
    cdef Slice name
    if _take(body, n, &off, &name) < 0 or off >= n:
        return ERR_MALFORMED
    if name.len == 4 and memcmp(name.ptr, b"MQTT", 4) == 0:
        return body[off]
    if name.len == 6 and memcmp(name.ptr, b"MQIsdp", 6) == 0:
        return body[off]
    return ERR_MALFORMED


cdef int decode_connect5(const uint8_t* body, uint32_t n, Connect5Packet* out, int* reason) noexcept nogil:
    cdef uint32_t off = 0
    cdef Slice name
    cdef uint8_t flags
    out.will_props.present = 0
    out.will_topic.len = out.will_message.len = out.username.len = out.password.len = 0
    out.will_topic.ptr = out.will_message.ptr = out.username.ptr = out.password.ptr = body
    if _take(body, n, &off, &name) < 0:
        return _fail(reason, R5_LENGTH)
    if not (name.len == 4 and memcmp(name.ptr, b"MQTT", 4) == 0):
        return _fail(reason, R5_PROTOCOL)            # MQTT-3.1.2-1
    if off >= n:
        return _fail(reason, R5_LENGTH)
    if body[off] != 5:
        return RC_UNSUPPORTED_VERSION               # MQTT-3.1.2-2
    off += 1
    if n - off < 3:
        return _fail(reason, R5_LENGTH)
    flags = body[off]
    out.keepalive = <uint16_t>_be16(body + off + 1)
    off += 3
    if flags & 0x01:
        return _fail(reason, R5_PROTOCOL)            # MQTT-3.1.2-3
    out.clean_start = (flags >> 1) & 1
    out.will_flag = (flags >> 2) & 1
    out.will_qos = (flags >> 3) & 3
    out.will_retain = (flags >> 5) & 1
    out.has_password = (flags >> 6) & 1
    out.has_username = flags >> 7
    if not out.will_flag and (out.will_qos or out.will_retain):
        return _fail(reason, R5_PROTOCOL)            # MQTT-3.1.2-11, MQTT-3.1.2-13
    if out.will_qos == 3:
        return _fail(reason, R5_QOS)                 # MQTT-3.1.2-12
    if _props(body, n, &off, CONNECT, &out.props, reason) < 0:
        return _fail(reason, reason[0])
    if _take(body, n, &off, &out.client_id) < 0:
        return _fail(reason, R5_LENGTH)
    if _string(out.client_id.ptr, out.client_id.len, reason) < 0:
        return ERR_MALFORMED                        # MQTT-3.1.3-4
    if out.will_flag:
        if _props(body, n, &off, WILL_PROPERTIES, &out.will_props, reason) < 0:
            return _fail(reason, reason[0])
        if _take(body, n, &off, &out.will_topic) < 0:
            return _fail(reason, R5_LENGTH)
        if _topic_name(out.will_topic.ptr, out.will_topic.len, reason) < 0:
            return ERR_MALFORMED                    # MQTT-3.1.3-11
        if _take(body, n, &off, &out.will_message) < 0:
            return _fail(reason, R5_LENGTH)
    if out.has_username:
        if _take(body, n, &off, &out.username) < 0:
            return _fail(reason, R5_LENGTH)
        if _string(out.username.ptr, out.username.len, reason) < 0:
            return ERR_MALFORMED                    # MQTT-3.1.3-12
    if out.has_password:
        if _take(body, n, &off, &out.password) < 0:
            return _fail(reason, R5_LENGTH)
    if off != n:
        return _fail(reason, R5_LENGTH)
    return 0


cdef inline bint _reason_ok(uint8_t ptype, uint8_t code) noexcept nogil:
    return gw5_reason_ok[ptype][code] != 0


cdef int decode_connack5(const uint8_t* body, uint32_t n, Connack5Packet* out, int* reason) noexcept nogil:
    cdef uint32_t off = 2
    if n < 1:
        return _fail(reason, R5_LENGTH)
    if body[0] & 0xFE:
        return _fail(reason, R5_PROTOCOL)            # MQTT-3.2.2-1
    if n < 2:
        return _fail(reason, R5_LENGTH)
    if not _reason_ok(CONNACK, body[1]):
        return _fail(reason, R5_REASON_CODE)         # MQTT-3.2.2-8
    if body[0] and body[1]:
        return _fail(reason, R5_SESSION_PRESENT)     # MQTT-3.2.2-6
    out.session_present = body[0]
    out.reason_code = body[1]
    if _props(body, n, &off, CONNACK, &out.props, reason) < 0:
        return _fail(reason, reason[0])
    if off != n:
        return _fail(reason, R5_LENGTH)
    return 0


cdef int decode_publish5(uint8_t first, const uint8_t* body, uint32_t n, Publish5Packet* out,
                         int* reason) noexcept nogil:
    cdef uint8_t qos = (first >> 1) & 3
    cdef uint32_t tl, off
    if qos == 3:
        return _fail(reason, R5_QOS)
    if n < 2:
        return _fail(reason, R5_LENGTH)
    tl = _be16(body)
    if n - 2 < tl:
        return _fail(reason, R5_LENGTH)
    if tl and _topic_name(body + 2, tl, reason) < 0:
        return ERR_MALFORMED                        # MQTT-1.5.4-1/2, MQTT-3.3.2-2
    off = 2 + tl
    out.qos = qos
    out.retain = first & 1
    out.dup = (first >> 3) & 1
    out.topic.ptr = body + 2
    out.topic.len = tl
    out.packet_id = 0
    if qos:
        if n - off < 2:
            return _fail(reason, R5_LENGTH)
        out.packet_id = <uint16_t>_be16(body + off)
        if out.packet_id == 0:
            return _fail(reason, R5_PACKET_ID)       # MQTT-2.2.1-3
        off += 2
    # The common blocks without the walk: none (Property Length 0), or a
    # Topic Alias alone (a non-zero one; 0 is _props' Protocol Error). What
    # _props would give for them, to the field.
    if off < n and body[off] == 0:
        out.props.present = 0
        out.props.subscription_id_count = 0
        out.props.user_property_count = 0
        out.props.raw.ptr = body + off + 1
        out.props.raw.len = 0
        off += 1
    elif n - off >= 4 and body[off] == 3 and body[off + 1] == P_TOPIC_ALIAS and (body[off + 2] or body[off + 3]):
        out.props.present = GW5_BIT(P_TOPIC_ALIAS)
        out.props.subscription_id_count = 0
        out.props.user_property_count = 0
        out.props.topic_alias = <uint16_t>_be16(body + off + 2)
        out.props.raw.ptr = body + off + 1
        out.props.raw.len = 3
        off += 4
    elif _props(body, n, &off, PUBLISH, &out.props, reason) < 0:
        return _fail(reason, reason[0])
    if tl == 0 and not (out.props.present & (GW5_BIT(P_TOPIC_ALIAS))):
        return _fail(reason, R5_TOPIC_ALIAS)         # 3.3.2.1
    out.payload.ptr = body + off
    out.payload.len = n - off
    return 0


cdef int decode_ack5(uint8_t ptype, const uint8_t* body, uint32_t n, Ack5Packet* out, int* reason) noexcept nogil:
    cdef uint32_t off = 3
    out.props.present = 0
    out.props.raw.ptr = body
    out.props.raw.len = 0
    out.reason_code = 0
    if n < 2:
        return _fail(reason, R5_LENGTH)
    out.packet_id = <uint16_t>_be16(body)
    if out.packet_id == 0:
        return _fail(reason, R5_PACKET_ID)           # MQTT-2.2.1-3
    if n > 2:
        out.reason_code = body[2]
        if not _reason_ok(ptype, body[2]):
            return _fail(reason, R5_REASON_CODE)     # MQTT-3.4.2-1, -3.5.2-1, -3.6.2-1, -3.7.2-1
        if n > 3:
            if _props(body, n, &off, ptype, &out.props, reason) < 0:
                return _fail(reason, reason[0])
            if off != n:
                return _fail(reason, R5_LENGTH)
    return 0


cdef int decode_disconnect5(uint8_t ptype, const uint8_t* body, uint32_t n, Ack5Packet* out,
                            int* reason) noexcept nogil:
    cdef uint32_t off = 1
    out.props.present = 0
    out.props.raw.ptr = body
    out.props.raw.len = 0
    out.reason_code = 0
    out.packet_id = 0
    if n == 0:
        return 0
    out.reason_code = body[0]
    if not _reason_ok(ptype, body[0]):
        return _fail(reason, R5_REASON_CODE)         # MQTT-3.14.2-1, MQTT-3.15.2-1
    if n > 1:
        if _props(body, n, &off, ptype, &out.props, reason) < 0:
            return _fail(reason, reason[0])
        if off != n:
            return _fail(reason, R5_LENGTH)
    if ptype == AUTH and not (out.props.present & (GW5_BIT(P_AUTH_METHOD))):
        return _fail(reason, R5_AUTHENTICATION)      # 3.15.2.2.2
    return 0


cdef int entries5_begin(uint8_t ptype, const uint8_t* body, uint32_t n, Entry5Iter* it, Props5* props,
                        int* reason) noexcept nogil:
    cdef uint32_t off = 2
    props.present = 0
    if n < 2:
        return _fail(reason, R5_LENGTH)
    it.packet_id = <uint16_t>_be16(body)
    if it.packet_id == 0:
        return _fail(reason, R5_PACKET_ID)           # MQTT-2.2.1-3
    if _props(body, n, &off, ptype, props, reason) < 0:
        return _fail(reason, reason[0])
    if off == n:
        return _fail(reason, R5_EMPTY)               # MQTT-3.8.3-2, MQTT-3.10.3-2
    it.p = body + off
    it.end = body + n
    it.ptype = ptype
    return 0


cdef inline int _next_filter(Entry5Iter* it, uint32_t trailer, Slice* topic_filter, int* reason) noexcept nogil:
    cdef const uint8_t* p = it.p
    cdef size_t avail = it.end - p
    cdef uint32_t l
    if avail == 0:
        return 0
    if avail < 2:
        return _fail(reason, R5_LENGTH)
    l = _be16(p)
    if avail - 2 < <size_t>l + trailer:
        return _fail(reason, R5_LENGTH)
    if _topic_filter(p + 2, l, reason) < 0:
        return ERR_MALFORMED
    topic_filter.ptr = p + 2
    topic_filter.len = l
    it.p = p + 2 + l
    return 1


cdef int subscribe5_next(Entry5Iter* it, Slice* topic_filter, uint8_t* options, int* reason) noexcept nogil:
    cdef int rc = _next_filter(it, 1, topic_filter, reason)
    cdef uint8_t o
    if rc <= 0:
        return rc
    o = it.p[0]
    if o & 0xC0:
        return _fail(reason, R5_OPTIONS)             # MQTT-3.8.3-5
    if (o & 3) == 3 or (o >> 4) == 3:
        return _fail(reason, R5_SUBSCRIPTION)        # 3.8.3.1: QoS 3, Retain Handling 3
    if (o & 4) and is_shared_filter(topic_filter.ptr, topic_filter.len):
        return _fail(reason, R5_SUBSCRIPTION)        # MQTT-3.8.3-4
    options[0] = o
    it.p += 1
    return 1


cdef int unsubscribe5_next(Entry5Iter* it, Slice* topic_filter, int* reason) noexcept nogil:
    return _next_filter(it, 0, topic_filter, reason)


cdef int codes5_next(Entry5Iter* it, uint8_t* code, int* reason) noexcept nogil:
    if it.p == it.end:
        return 0
    if not _reason_ok(it.ptype, it.p[0]):
        return _fail(reason, R5_REASON_CODE)         # MQTT-3.9.3-2, MQTT-3.11.3-2
    code[0] = it.p[0]
    it.p += 1
    return 1


# --- encoding ----------------------------------------------------------------

cdef uint32_t varint_size(uint32_t value) noexcept nogil:
    if value < 128:
        return 1
    if value < 16384:
        return 2
    if value < 2097152:
        return 3
    return 4

cdef uint32_t write_varint(uint8_t* out, uint32_t value) noexcept nogil:
    cdef uint32_t i = 0
    while True:
        if value < 128:
            out[i] = <uint8_t>value
            return i + 1
        out[i] = <uint8_t>((value & 0x7F) | 0x80)
        value >>= 7
        i += 1

cdef inline uint32_t _put16(uint8_t* out, uint32_t v) noexcept nogil:
    out[0] = <uint8_t>(v >> 8)
    out[1] = <uint8_t>v
    return 2

cdef inline uint32_t _put_field(uint8_t* out, const uint8_t* p, uint32_t n) noexcept nogil:
    out[0] = <uint8_t>(n >> 8)
    out[1] = <uint8_t>n
    if n:
        memcpy(out + 2, p, n)
    return 2 + n

cdef uint32_t put_prop_u8(uint8_t* out, uint8_t ident, uint8_t value) noexcept nogil:
    out[0] = ident
    out[1] = value
    return 2

cdef uint32_t put_prop_u16(uint8_t* out, uint8_t ident, uint16_t value) noexcept nogil:
    out[0] = ident
    return 1 + _put16(out + 1, value)

cdef uint32_t put_prop_u32(uint8_t* out, uint8_t ident, uint32_t value) noexcept nogil:
    out[0] = ident
    out[1] = <uint8_t>(value >> 24)
    out[2] = <uint8_t>(value >> 16)
    out[3] = <uint8_t>(value >> 8)
    out[4] = <uint8_t>value
    return 5

cdef uint32_t put_prop_varint(uint8_t* out, uint8_t ident, uint32_t value) noexcept nogil:
    out[0] = ident
    return 1 + write_varint(out + 1, value)

cdef uint32_t put_prop_bytes(uint8_t* out, uint8_t ident, const uint8_t* p, uint32_t n) noexcept nogil:
    out[0] = ident
    return 1 + _put_field(out + 1, p, n)

cdef uint32_t put_prop_pair(uint8_t* out, const uint8_t* k, uint32_t kn, const uint8_t* v,
                            uint32_t vn) noexcept nogil:
    cdef uint32_t i
    out[0] = P_USER_PROPERTY
    i = 1 + _put_field(out + 1, k, kn)
    return i + _put_field(out + i, v, vn)

cdef inline uint32_t _put_props(uint8_t* out, const uint8_t* props, uint32_t props_len) noexcept nogil:
    cdef uint32_t i = write_varint(out, props_len)
    if props_len:
        memcpy(out + i, props, props_len)
    return i + props_len

cdef inline uint32_t _publish_rem(uint32_t topic_len, uint32_t props_len, uint32_t payload_len,
                                  uint8_t qos) noexcept nogil:
    return 2 + topic_len + (2 if qos else 0) + varint_size(props_len) + props_len + payload_len

cdef uint32_t publish5_size(uint32_t topic_len, uint32_t props_len, uint32_t payload_len, uint8_t qos) noexcept nogil:
    cdef uint32_t rem = _publish_rem(topic_len, props_len, payload_len, qos)
    return header_size(rem) + rem

cdef uint32_t encode_publish5(uint8_t* out, const uint8_t* topic, uint32_t topic_len,
                              const uint8_t* props, uint32_t props_len,
                              const uint8_t* payload, uint32_t payload_len,
                              uint8_t qos, uint8_t retain, uint8_t dup, uint16_t packet_id) noexcept nogil:
    cdef uint32_t i = write_header(
        out, (PUBLISH << 4) | ((dup & 1) << 3) | ((qos & 3) << 1) | (retain & 1),
        _publish_rem(topic_len, props_len, payload_len, qos))
    i += _put_field(out + i, topic, topic_len)
    if qos:
        i += _put16(out + i, packet_id)
    i += _put_props(out + i, props, props_len)
    if payload_len:
        memcpy(out + i, payload, payload_len)
    return i + payload_len

cdef uint32_t connack5_size(uint32_t props_len) noexcept nogil:
    cdef uint32_t rem = 2 + varint_size(props_len) + props_len
    return header_size(rem) + rem

cdef uint32_t encode_connack5(uint8_t* out, uint8_t session_present, uint8_t reason_code,
                              const uint8_t* props, uint32_t props_len) noexcept nogil:
    cdef uint32_t i = write_header(out, CONNACK << 4, 2 + varint_size(props_len) + props_len)
    out[i] = session_present
    out[i + 1] = reason_code
    i += 2
    return i + _put_props(out + i, props, props_len)

cdef inline uint32_t _ack_rem(uint8_t reason_code, uint32_t props_len) noexcept nogil:
    if props_len:
        return 3 + varint_size(props_len) + props_len
    return 3 if reason_code else 2

cdef uint32_t ack5_size(uint8_t reason_code, uint32_t props_len) noexcept nogil:
    cdef uint32_t rem = _ack_rem(reason_code, props_len)
    return header_size(rem) + rem

cdef uint32_t encode_ack5(uint8_t* out, uint8_t ptype, uint16_t packet_id, uint8_t reason_code,
                          const uint8_t* props, uint32_t props_len) noexcept nogil:
    cdef uint32_t rem = _ack_rem(reason_code, props_len)
    cdef uint32_t i = write_header(out, (ptype << 4) | (0x02 if ptype == PUBREL else 0), rem)
    i += _put16(out + i, packet_id)
    if rem > 2:
        out[i] = reason_code
        i += 1
        if props_len:
            i += _put_props(out + i, props, props_len)
    return i

cdef uint32_t codes5_size(uint32_t count, uint32_t props_len) noexcept nogil:
    cdef uint32_t rem = 2 + varint_size(props_len) + props_len + count
    return header_size(rem) + rem

cdef uint32_t encode_codes5(uint8_t* out, uint8_t ptype, uint16_t packet_id, const uint8_t* props,
                            uint32_t props_len, const uint8_t* codes, uint32_t count) noexcept nogil:
    cdef uint32_t i = write_header(out, ptype << 4, 2 + varint_size(props_len) + props_len + count)
    i += _put16(out + i, packet_id)
    i += _put_props(out + i, props, props_len)
    if count:
        memcpy(out + i, codes, count)
    return i + count

cdef inline uint32_t _disconnect_rem(uint8_t reason_code, uint32_t props_len) noexcept nogil:
    if props_len:
        return 1 + varint_size(props_len) + props_len
    return 1 if reason_code else 0

cdef uint32_t disconnect5_size(uint8_t reason_code, uint32_t props_len) noexcept nogil:
    cdef uint32_t rem = _disconnect_rem(reason_code, props_len)
    return header_size(rem) + rem

cdef uint32_t encode_disconnect5(uint8_t* out, uint8_t ptype, uint8_t reason_code,
                                 const uint8_t* props, uint32_t props_len) noexcept nogil:
    cdef uint32_t rem = _disconnect_rem(reason_code, props_len)
    cdef uint32_t i = write_header(out, ptype << 4, rem)
    if rem:
        out[i] = reason_code
        i += 1
        if props_len:
            i += _put_props(out + i, props, props_len)
    return i


# --- per-packet validation (the server's work, no Python objects) --------------

cdef int _check_body5(uint8_t first, const uint8_t* body, uint32_t n, int* reason) noexcept nogil:
    """0 when valid, ERR_MALFORMED / ERR_PROTOCOL (with *reason) or 0x84."""
    cdef uint8_t t = first >> 4
    cdef Publish5Packet pub
    cdef Ack5Packet ack
    cdef Connect5Packet con
    cdef Connack5Packet cak
    cdef Entry5Iter it
    cdef Props5 props
    cdef Slice tf
    cdef uint8_t o
    cdef int rc
    if t == PUBLISH:
        return decode_publish5(first, body, n, &pub, reason)
    if t == PUBACK or t == PUBREC or t == PUBREL or t == PUBCOMP:
        return decode_ack5(t, body, n, &ack, reason)
    if t == PINGREQ or t == PINGRESP:
        return 0                                # size checked by the header
    if t == SUBSCRIBE or t == UNSUBSCRIBE or t == SUBACK or t == UNSUBACK:
        rc = entries5_begin(t, body, n, &it, &props, reason)
        if rc < 0:
            return rc
        while True:
            if t == SUBSCRIBE:
                rc = subscribe5_next(&it, &tf, &o, reason)
            elif t == UNSUBSCRIBE:
                rc = unsubscribe5_next(&it, &tf, reason)
            else:
                rc = codes5_next(&it, &o, reason)
            if rc <= 0:
                return rc
    if t == DISCONNECT or t == AUTH:
        return decode_disconnect5(t, body, n, &ack, reason)
    if t == CONNECT:
        return decode_connect5(body, n, &con, reason)
    if t == CONNACK:
        return decode_connack5(body, n, &cak, reason)
    return _fail(reason, R5_HEADER)              # unreachable after decode_header5


cdef Py_ssize_t _walk(const uint8_t* p, size_t n, uint32_t max_remaining, int* err,
                      int* reason, size_t* used) noexcept nogil:
    cdef size_t off = 0
    cdef Py_ssize_t count = 0
    cdef int hl, rc
    cdef uint8_t first
    cdef uint32_t rem
    err[0] = 0
    while off < n:
        hl = decode_header5(p + off, n - off, max_remaining, &first, &rem, reason)
        if hl < 0:
            if hl != ERR_INCOMPLETE:
                err[0] = hl
            break
        if n - off - <size_t>hl < rem:
            break
        rc = _check_body5(first, p + off + hl, rem, reason)
        if rc != 0:
            err[0] = rc
            break
        count += 1
        off += <size_t>hl + rem
    used[0] = off
    return count


# --- Python API: decoding --------------------------------------------------------

cdef uint32_t _limit(object max_packet_size) except? 0:
    if max_packet_size < 0:
        raise ValueError("max_packet_size must be >= 0")
    if max_packet_size >= MAX_REMAINING:
        return MAX_REMAINING
    return <uint32_t>max_packet_size


cdef int _raise(int err, int reason, uint32_t remaining, uint32_t limit) except -1:
    if err == ERR_TOO_LARGE:
        raise PacketTooLarge(remaining, limit)
    if err > 0:
        raise ConnectRefused(err)
    raise decode_error(reason)


cdef inline str _str(Slice s):
    return PyUnicode_DecodeUTF8(<char*>s.ptr, s.len, NULL)

cdef inline bytes _bytes(Slice s):
    return PyBytes_FromStringAndSize(<char*>s.ptr, s.len)


cdef inline bint _has(uint64_t m, int i) noexcept:
    return (m >> i) & 1


cdef object _properties(const Props5* pr):
    cdef uint64_t m = pr.present
    cdef PropIter it
    cdef uint8_t ident
    cdef uint32_t number = 0
    cdef Slice a, b
    cdef list sub_ids, pairs
    if m == 0:
        return EMPTY
    sub_ids = []
    pairs = []
    if pr.subscription_id_count or pr.user_property_count:
        prop_iter(&it, pr)
        while prop_next(&it, &ident, &number, &a, &b):
            if ident == P_SUBSCRIPTION_ID:
                sub_ids.append(number)
            elif ident == P_USER_PROPERTY:
                pairs.append((_str(a), _str(b)))

    return Properties(
        pr.payload_format if _has(m, P_PAYLOAD_FORMAT) else None,
        pr.message_expiry if _has(m, P_MESSAGE_EXPIRY) else None,
        _str(pr.content_type) if _has(m, P_CONTENT_TYPE) else None,
        _str(pr.response_topic) if _has(m, P_RESPONSE_TOPIC) else None,
        _bytes(pr.correlation_data) if _has(m, P_CORRELATION_DATA) else None,
        tuple(sub_ids),
        pr.session_expiry if _has(m, P_SESSION_EXPIRY) else None,
        _str(pr.assigned_client_id) if _has(m, P_ASSIGNED_CLIENT_ID) else None,
        pr.server_keep_alive if _has(m, P_SERVER_KEEP_ALIVE) else None,
        _str(pr.auth_method) if _has(m, P_AUTH_METHOD) else None,
        _bytes(pr.auth_data) if _has(m, P_AUTH_DATA) else None,
        pr.request_problem if _has(m, P_REQUEST_PROBLEM) else None,
        pr.will_delay if _has(m, P_WILL_DELAY) else None,
        pr.request_response if _has(m, P_REQUEST_RESPONSE) else None,
        _str(pr.response_info) if _has(m, P_RESPONSE_INFO) else None,
        _str(pr.server_reference) if _has(m, P_SERVER_REFERENCE) else None,
        _str(pr.reason_string) if _has(m, P_REASON_STRING) else None,
        pr.receive_maximum if _has(m, P_RECEIVE_MAXIMUM) else None,
        pr.topic_alias_maximum if _has(m, P_TOPIC_ALIAS_MAXIMUM) else None,
        pr.topic_alias if _has(m, P_TOPIC_ALIAS) else None,
        pr.maximum_qos if _has(m, P_MAXIMUM_QOS) else None,
        pr.retain_available if _has(m, P_RETAIN_AVAILABLE) else None,
        tuple(pairs),
        pr.maximum_packet_size if _has(m, P_MAXIMUM_PACKET_SIZE) else None,
        pr.wildcard_available if _has(m, P_WILDCARD_AVAILABLE) else None,
        pr.subscription_id_available if _has(m, P_SUBSCRIPTION_ID_AVAILABLE) else None,
        pr.shared_available if _has(m, P_SHARED_AVAILABLE) else None,
    )


cdef dict _ACK_CLASSES = {PUBACK: Puback, PUBREC: Pubrec, PUBREL: Pubrel, PUBCOMP: Pubcomp}
cdef dict _ACK_TYPES = {cls: t for t, cls in _ACK_CLASSES.items()}


cdef object _build(uint8_t first, const uint8_t* body, uint32_t n):
    cdef uint8_t t = first >> 4
    cdef int reason = 0
    cdef int rc
    cdef Publish5Packet pub
    cdef Ack5Packet ack
    cdef Connect5Packet con
    cdef Connack5Packet cak
    cdef Entry5Iter it
    cdef Props5 props
    cdef Slice tf
    cdef uint8_t o = 0
    cdef list entries
    if t == PUBLISH:
        rc = decode_publish5(first, body, n, &pub, &reason)
        if rc:
            _raise(rc, reason, 0, 0)
        return Publish(_str(pub.topic), _bytes(pub.payload), pub.qos, pub.retain != 0, pub.dup != 0,
                       pub.packet_id, _properties(&pub.props))
    if t == PUBACK or t == PUBREC or t == PUBREL or t == PUBCOMP:
        rc = decode_ack5(t, body, n, &ack, &reason)
        if rc:
            _raise(rc, reason, 0, 0)
        return _ACK_CLASSES[t](ack.packet_id, ack.reason_code, _properties(&ack.props))
    if t == PINGREQ:
        return Pingreq()
    if t == PINGRESP:
        return Pingresp()
    if t == SUBSCRIBE or t == UNSUBSCRIBE or t == SUBACK or t == UNSUBACK:
        rc = entries5_begin(t, body, n, &it, &props, &reason)
        if rc:
            _raise(rc, reason, 0, 0)
        entries = []
        while True:
            if t == SUBSCRIBE:
                rc = subscribe5_next(&it, &tf, &o, &reason)
            elif t == UNSUBSCRIBE:
                rc = unsubscribe5_next(&it, &tf, &reason)
            else:
                rc = codes5_next(&it, &o, &reason)
            if rc < 0:
                _raise(rc, reason, 0, 0)
            if rc == 0:
                break
            if t == SUBSCRIBE:
                entries.append((_str(tf), o))
            elif t == UNSUBSCRIBE:
                entries.append(_str(tf))
            else:
                entries.append(o)
        cls = Subscribe if t == SUBSCRIBE else Unsubscribe if t == UNSUBSCRIBE else Suback if t == SUBACK else Unsuback
        return cls(it.packet_id, entries, _properties(&props))
    if t == DISCONNECT or t == AUTH:
        rc = decode_disconnect5(t, body, n, &ack, &reason)
        if rc:
            _raise(rc, reason, 0, 0)
        return (Disconnect if t == DISCONNECT else Auth)(ack.reason_code, _properties(&ack.props))
    if t == CONNECT:
        rc = decode_connect5(body, n, &con, &reason)
        if rc:
            _raise(rc, reason, 0, 0)
        return Connect(
            _str(con.client_id), con.clean_start != 0, con.keepalive, _properties(&con.props),
            _str(con.will_topic) if con.will_flag else None,
            _bytes(con.will_message) if con.will_flag else None,
            con.will_qos, con.will_retain != 0,
            _properties(&con.will_props) if con.will_flag else EMPTY,
            _str(con.username) if con.has_username else None,
            _bytes(con.password) if con.has_password else None,
        )
    if t == CONNACK:
        rc = decode_connack5(body, n, &cak, &reason)
        if rc:
            _raise(rc, reason, 0, 0)
        return Connack(cak.session_present != 0, cak.reason_code, _properties(&cak.props))
    _raise(ERR_MALFORMED, R5_HEADER, 0, 0)


def decode(data, max_packet_size=MAX_REMAINING_LENGTH):
    """Decodes every complete MQTT 5.0 packet of ``data``: ``(packets,
    consumed)``, the bytes past ``consumed`` the start of a packet not fully
    received yet. ``max_packet_size`` limits each packet's remaining length.
    Raises MalformedPacket5, ProtocolError5, PacketTooLarge, or
    ConnectRefused(0x84)."""
    cdef const uint8_t[::1] view = data
    cdef size_t n = view.shape[0]
    cdef size_t off = 0
    cdef const uint8_t* p
    cdef uint32_t maxr = _limit(max_packet_size)
    cdef int hl
    cdef int reason = 0
    cdef uint8_t first = 0
    cdef uint32_t rem = 0
    cdef list out = []
    if n == 0:
        return out, 0
    p = &view[0]
    while off < n:
        hl = decode_header5(p + off, n - off, maxr, &first, &rem, &reason)
        if hl == ERR_INCOMPLETE:
            break
        if hl < 0:
            _raise(hl, reason, rem, maxr)
        if n - off - <size_t>hl < rem:
            break
        out.append(_build(first, p + off + hl, rem))
        off += <size_t>hl + rem
    return out, off


def decode_count(data, max_packet_size=MAX_REMAINING_LENGTH):
    """Decodes and fully validates every complete packet with the C functions
    only (no Python object per packet); returns how many. Raises like decode."""
    cdef const uint8_t[::1] view = data
    cdef size_t n = view.shape[0]
    cdef uint32_t maxr = _limit(max_packet_size)
    cdef int err = 0
    cdef int reason = 0
    cdef size_t used = 0
    cdef Py_ssize_t count
    cdef const uint8_t* p
    cdef uint8_t first = 0
    cdef uint32_t rem = 0
    if n == 0:
        return 0
    p = &view[0]
    with nogil:
        count = _walk(p, n, maxr, &err, &reason, &used)
    if err:
        if err == ERR_TOO_LARGE:
            decode_header5(p + used, n - used, maxr, &first, &rem, &reason)
        _raise(err, reason, rem, maxr)
    return count


def protocol_level(body):
    """The protocol level of a CONNECT body (the bytes after its fixed header)
    named "MQTT" or "MQIsdp": 5 for this codec, 4 or 3 for gw_ext.codec.
    MalformedPacket5("protocol") when it says neither."""
    cdef const uint8_t[::1] view = body
    cdef int level
    if view.shape[0] == 0:
        raise decode_error(R5_PROTOCOL)
    level = connect_protocol_level(&view[0], <uint32_t>min(view.shape[0], 0xFFFFFFFF))
    if level < 0:
        raise decode_error(R5_PROTOCOL)
    return level


cdef class Decoder:
    """A connection's decoder: 3.1.1 (gw_ext.codec) until a CONNECT says
    protocol level 5, MQTT 5.0 (this codec) from that CONNECT on; the
    version, once chosen by a CONNECT, stays. ``decode(data)`` takes the
    connection's bytes not consumed yet, as the module functions do."""

    cdef public int version
    cdef uint32_t limit

    def __init__(self, max_packet_size=MAX_REMAINING_LENGTH):
        self.version = 0
        self.limit = _limit(max_packet_size)

    def decode(self, data):
        cdef const uint8_t[::1] view = data
        cdef size_t n = view.shape[0]
        cdef int hl, level, reason = 0
        cdef uint8_t first = 0
        cdef uint32_t rem = 0
        cdef list packets
        cdef Py_ssize_t used
        if self.version == 5:
            return decode(data, self.limit)
        if self.version != 0 or n == 0:
            return _codec3.decode(data, self.limit)
        # Not chosen yet: the first packet's header read the 3.1.1 way.
        hl = decode_header(&view[0], n, self.limit, &first, &rem, &reason)
        if hl < 0 or (first >> 4) != CONNECT or n - <size_t>hl < rem:
            return _codec3.decode(data, self.limit)
        level = connect_protocol_level(&view[hl], rem)
        if level != 5:
            packets, used = _codec3.decode(data, self.limit)
            if packets:
                self.version = packets[0].protocol_level
            return packets, used
        packets, used = decode(data[:hl + rem], self.limit)      # this CONNECT, by 5.0's rules
        self.version = 5
        more, used2 = decode(data[used:], self.limit)
        return packets + more, used + used2


# --- Python API: encoding --------------------------------------------------------

cdef inline const uint8_t* _utf8(object s, Py_ssize_t* n) except NULL:
    cdef const char* p
    if type(s) is not str:
        raise TypeError(f"expected str, got {type(s).__name__}")
    p = PyUnicode_AsUTF8AndSize(s, n)
    if n[0] > 65535:
        raise ValueError("string longer than 65535 bytes")
    return <const uint8_t*>p

cdef inline bytes _field_bytes(object b):
    if type(b) is not bytes:
        b = bytes(b)
    if len(<bytes>b) > 65535:
        raise ValueError("binary field longer than 65535 bytes")
    return <bytes>b

cdef inline uint32_t _int(object v, uint64_t limit) except? 0xFFFFFFFF:
    if not isinstance(v, int) or not 0 <= v < limit:
        raise ValueError(f"value out of range: {v!r}")
    return <uint32_t>v

cdef inline int _qos(object v) except -1:
    if not 0 <= v <= 2:
        raise ValueError(f"QoS out of range: {v!r}")
    return v

cdef inline uint32_t _check_rem(Py_ssize_t rem) except 0:
    if rem > MAX_REMAINING:
        raise ValueError("packet too large for MQTT")
    return <uint32_t>rem

cdef inline Py_ssize_t _vs(Py_ssize_t n):
    return 1 if n < 128 else 2 if n < 16384 else 3 if n < 2097152 else 4 if n <= MAX_REMAINING else 5

cdef inline bytes _alloc(uint32_t size, uint8_t** out):
    cdef bytes b = PyBytes_FromStringAndSize(NULL, size)
    out[0] = <uint8_t*>PyBytes_AS_STRING(b)
    return b


cdef inline bytes _len2(Py_ssize_t n):
    return bytes((n >> 8, n & 0xFF))


cdef tuple _PROPERTY_FIELDS = tuple(PROPERTY_NAMES.items())
cdef tuple _PROPERTY_IDS = tuple(PROPERTY_NAMES)
assert Properties.__struct_fields__ == tuple(PROPERTY_NAMES.values())   # astuple's order is the identifiers'
_astuple = msgspec.structs.astuple


cdef bytes _encode_props(object props, uint8_t ctx):
    """The property block (without its Property Length) of `props` for packet
    type ctx; ValueError for a property the packet may not carry or a value
    out of its type's range. Two passes over the values: check and size,
    then write into the bytes object (the strings' UTF-8 is cached by each
    str, which `values` keeps alive)."""
    cdef tuple values
    cdef Py_ssize_t i, l, l2, size = 0
    cdef uint32_t v
    cdef const uint8_t* sp
    cdef const uint8_t* sp2
    cdef uint8_t ident, kind
    cdef uint8_t* out
    cdef uint32_t o = 0
    cdef bytes raw, b
    if props is EMPTY:
        return b""
    values = _astuple(props)
    for i in range(len(_PROPERTY_IDS)):
        value = values[i]
        if value is None:
            continue
        ident = _PROPERTY_IDS[i]
        if (ident == P_SUBSCRIPTION_ID or ident == P_USER_PROPERTY) and len(value) == 0:
            continue
        if not ((gw5_prop_ctx[ident] >> ctx) & 1):
            raise ValueError(f"property {_PROPERTY_FIELDS[i][1]} not allowed in this packet")
        kind = gw5_prop_kind[ident]
        if ident == P_SUBSCRIPTION_ID:
            for item in value:
                size += 1 + varint_size(_int(item, MAX_REMAINING + 1))
        elif ident == P_USER_PROPERTY:
            for key, val in value:
                _utf8(key, &l)
                _utf8(val, &l2)
                size += 5 + l + l2
        elif kind == K_BYTE:
            _int(value, 0x100)
            size += 2
        elif kind == K_U16:
            _int(value, 0x10000)
            size += 3
        elif kind == K_U32:
            _int(value, 0x100000000)
            size += 5
        elif kind == K_STR:
            _utf8(value, &l)
            size += 3 + l
        else:
            size += 3 + len(_field_bytes(value))
    if size > MAX_REMAINING:
        raise ValueError("properties too large for MQTT")
    b = _alloc(<uint32_t>size, &out)
    for i in range(len(_PROPERTY_IDS)):
        value = values[i]
        if value is None:
            continue
        ident = _PROPERTY_IDS[i]
        kind = gw5_prop_kind[ident]
        if ident == P_SUBSCRIPTION_ID:
            for item in value:
                o += put_prop_varint(out + o, ident, <uint32_t>item)
        elif ident == P_USER_PROPERTY:
            for key, val in value:
                sp = _utf8(key, &l)
                sp2 = _utf8(val, &l2)
                o += put_prop_pair(out + o, sp, <uint32_t>l, sp2, <uint32_t>l2)
        elif kind == K_BYTE:
            o += put_prop_u8(out + o, ident, <uint8_t>value)
        elif kind == K_U16:
            o += put_prop_u16(out + o, ident, <uint16_t>value)
        elif kind == K_U32:
            o += put_prop_u32(out + o, ident, <uint32_t>value)
        elif kind == K_STR:
            sp = _utf8(value, &l)
            o += put_prop_bytes(out + o, ident, sp, <uint32_t>l)
        else:
            raw = _field_bytes(value)
            o += put_prop_bytes(out + o, ident, <const uint8_t*>PyBytes_AS_STRING(raw), <uint32_t>len(raw))
    return b


cdef bytes _encode_publish(object pkt):
    cdef Py_ssize_t tl, pl
    cdef const uint8_t* tp = _utf8(pkt.topic, &tl)
    cdef int qos = _qos(pkt.qos)
    cdef uint32_t pid = _int(pkt.packet_id, 0x10000)
    cdef bytes props = _encode_props(pkt.properties, PUBLISH)
    cdef bytes payload = pkt.payload if type(pkt.payload) is bytes else bytes(pkt.payload)
    cdef uint8_t* out
    pl = len(payload)
    _check_rem(2 + tl + (2 if qos else 0) + _vs(len(props)) + len(props) + pl)
    cdef bytes b = _alloc(publish5_size(<uint32_t>tl, <uint32_t>len(props), <uint32_t>pl, qos), &out)
    encode_publish5(out, tp, <uint32_t>tl, <const uint8_t*>PyBytes_AS_STRING(props), <uint32_t>len(props),
                    <const uint8_t*>PyBytes_AS_STRING(payload), <uint32_t>pl,
                    qos, 1 if pkt.retain else 0, 1 if pkt.dup else 0, <uint16_t>pid)
    return b


cdef bytes _with_props(bytes props):
    cdef uint8_t buf[4]
    cdef uint32_t k = write_varint(buf, <uint32_t>len(props))
    return buf[:k] + props


cdef bytes _encode_connect(object c):
    cdef bint will = c.will_topic is not None
    cdef int will_qos = c.will_qos
    cdef uint8_t* out
    cdef Py_ssize_t l
    cdef const uint8_t* sp
    cdef uint32_t k
    cdef bytes body, raw
    if not 0 <= will_qos <= 3:
        raise ValueError("will QoS out of range")
    flags = ((0x02 if c.clean_start else 0) | (0x04 if will else 0) | (will_qos << 3)
             | (0x20 if c.will_retain else 0) | (0x40 if c.password is not None else 0)
             | (0x80 if c.username is not None else 0))
    parts = [b"\x00\x04MQTT\x05", bytes((flags,)), _len2(_int(c.keepalive, 0x10000)),
             _with_props(_encode_props(c.properties, CONNECT))]
    sp = _utf8(c.client_id, &l)
    parts.append(_len2(l) + sp[:l])
    if will:
        parts.append(_with_props(_encode_props(c.will_properties, WILL_PROPERTIES)))
        sp = _utf8(c.will_topic, &l)
        parts.append(_len2(l) + sp[:l])
        raw = _field_bytes(c.will_message if c.will_message is not None else b"")
        parts.append(_len2(len(raw)) + raw)
    elif c.will_properties != EMPTY:
        raise ValueError("will properties without a will")
    if c.username is not None:
        sp = _utf8(c.username, &l)
        parts.append(_len2(l) + sp[:l])
    if c.password is not None:
        raw = _field_bytes(c.password)
        parts.append(_len2(len(raw)) + raw)
    body = b"".join(parts)
    _check_rem(len(body))
    cdef bytes b = _alloc(header_size(<uint32_t>len(body)) + <uint32_t>len(body), &out)
    k = write_header(out, CONNECT << 4, <uint32_t>len(body))
    memcpy(out + k, <const char*>body, len(body))
    return b


cdef bytes _encode_entries(uint8_t ptype, object pkt):
    cdef uint32_t pid = _int(pkt.packet_id, 0x10000)
    cdef bytes props = _encode_props(pkt.properties, ptype)
    cdef uint8_t* out
    cdef Py_ssize_t l
    cdef const uint8_t* sp
    cdef bytes codes, body
    cdef uint32_t k
    if ptype == SUBACK or ptype == UNSUBACK:
        codes = bytes([_int(c, 0x100) for c in pkt.reason_codes])
        _check_rem(2 + _vs(len(props)) + len(props) + len(codes))
        b = _alloc(codes5_size(<uint32_t>len(codes), <uint32_t>len(props)), &out)
        encode_codes5(out, ptype, <uint16_t>pid, <const uint8_t*>PyBytes_AS_STRING(props), <uint32_t>len(props),
                      <const uint8_t*>PyBytes_AS_STRING(codes), <uint32_t>len(codes))
        return b
    parts = [_len2(pid), _with_props(props)]
    if ptype == SUBSCRIBE:
        for topic_filter, options in pkt.topics:
            sp = _utf8(topic_filter, &l)
            parts.append(_len2(l) + sp[:l] + bytes((_int(options, 0x100),)))
    else:
        for topic_filter in pkt.topics:
            sp = _utf8(topic_filter, &l)
            parts.append(_len2(l) + sp[:l])
    body = b"".join(parts)
    _check_rem(len(body))
    b = _alloc(header_size(<uint32_t>len(body)) + <uint32_t>len(body), &out)
    k = write_header(out, (ptype << 4) | 0x02, <uint32_t>len(body))
    memcpy(out + k, <const char*>body, len(body))
    return b


def encode(packet):
    """Encodes one packet (gw.packets5 struct) to its wire bytes; properties in
    ascending identifier order, the short forms of the acknowledgements,
    DISCONNECT and AUTH where the standard allows them."""
    cdef object t = type(packet)
    cdef object ptype
    cdef uint8_t* out
    cdef bytes b, props
    cdef uint32_t code
    if t is Publish:
        return _encode_publish(packet)
    ptype = _ACK_TYPES.get(t)
    if ptype is not None:
        code = _int(packet.reason_code, 0x100)
        pid = _int(packet.packet_id, 0x10000)
        props = _encode_props(packet.properties, ptype)
        _check_rem(3 + _vs(len(props)) + len(props))
        b = _alloc(ack5_size(<uint8_t>code, <uint32_t>len(props)), &out)
        encode_ack5(out, ptype, <uint16_t>pid, <uint8_t>code, <const uint8_t*>PyBytes_AS_STRING(props),
                    <uint32_t>len(props))
        return b
    if t is Pingreq or t is Pingresp:
        return bytes(((PINGREQ if t is Pingreq else PINGRESP) << 4, 0))
    if t is Disconnect or t is Auth:
        ptype = DISCONNECT if t is Disconnect else AUTH
        code = _int(packet.reason_code, 0x100)
        props = _encode_props(packet.properties, ptype)
        _check_rem(1 + _vs(len(props)) + len(props))
        b = _alloc(disconnect5_size(<uint8_t>code, <uint32_t>len(props)), &out)
        encode_disconnect5(out, ptype, <uint8_t>code, <const uint8_t*>PyBytes_AS_STRING(props), <uint32_t>len(props))
        return b
    if t is Subscribe:
        return _encode_entries(SUBSCRIBE, packet)
    if t is Unsubscribe:
        return _encode_entries(UNSUBSCRIBE, packet)
    if t is Suback:
        return _encode_entries(SUBACK, packet)
    if t is Unsuback:
        return _encode_entries(UNSUBACK, packet)
    if t is Connack:
        code = _int(packet.reason_code, 0x100)
        props = _encode_props(packet.properties, CONNACK)
        _check_rem(2 + _vs(len(props)) + len(props))
        b = _alloc(connack5_size(<uint32_t>len(props)), &out)
        encode_connack5(out, 1 if packet.session_present else 0, <uint8_t>code,
                        <const uint8_t*>PyBytes_AS_STRING(props), <uint32_t>len(props))
        return b
    if t is Connect:
        return _encode_connect(packet)
    raise TypeError(f"not an MQTT 5 packet: {packet!r}")
