# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""MQTT 3.1.1 codec: C-level decoders/encoders (see codec.pxd) and a small Python API.

The cdef functions are `noexcept nogil`, allocate nothing and keep decoded
fields as Slices into the caller's buffer. The Python API on top of them:

* ``decode(data, max_packet_size)`` -> ``(packets, consumed)``
* ``encode(packet)`` -> ``bytes``
* ``decode_count(data, max_packet_size)`` -> number of packets decoded and
  validated with the C functions only (what the server does per packet).
* ``allow_control_characters(allowed)``: whether control characters in client
  ids, user names, topics and filters are accepted (refused by default; a
  process-wide policy, set by each worker from its configuration).

Check order (mirrored exactly by tests/mqtt_ref.py, the oracle of the tests):
fixed header (type/flags, then remaining length, then fixed body sizes, then
the size limit), then per body: structure lengths before the content of the
field just read, as documented on each decoder below.
"""

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING
from cpython.unicode cimport PyUnicode_DecodeUTF8, PyUnicode_AsUTF8AndSize

from gw.packets import (
    Connect, Connack, Publish, Puback, Pubrec, Pubrel, Pubcomp, Subscribe,
    Suback, Unsubscribe, Unsuback, Pingreq, Pingresp, Disconnect,
    MalformedPacket, PacketTooLarge, ConnectRefused, MAX_REMAINING_LENGTH,
)

cdef extern from *:
    """
    #define GW_LO 0x0101010101010101ULL
    #define GW_HI 0x8080808080808080ULL
    #define GW_SPACE 0x2020202020202020ULL
    #define GW_PLUS 0x2B2B2B2B2B2B2B2BULL
    #define GW_BIT3 0x0808080808080808ULL
    #define GW_R16(x) x,x,x,x,x,x,x,x,x,x,x,x,x,x,x,x
    /* Bytes that take a topic name off the fast path: NUL and the C0 controls,
       '#', '+', DEL, non-ASCII. */
    static const unsigned char gw_topic_special[256] = {
        GW_R16(1),                                /* 0x00: NUL, controls */
        GW_R16(1),                                /* 0x10: controls */
        0,0,0,1,0,0,0,0,0,0,0,1,0,0,0,0,          /* 0x20: '#', '+' */
        GW_R16(0), GW_R16(0), GW_R16(0), GW_R16(0),               /* 0x30-0x6F */
        0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,1,          /* 0x70: DEL */
        GW_R16(1), GW_R16(1), GW_R16(1), GW_R16(1),               /* 0x80-0xBF */
        GW_R16(1), GW_R16(1), GW_R16(1), GW_R16(1),               /* 0xC0-0xFF */
    };
    /* Fixed-header flags each type must carry (2.2.2); 0xFF: reserved type,
       0xFE: PUBLISH (flags are DUP/QoS/RETAIN, checked apart). */
    static const unsigned char gw_header_flags[16] =
        {0xFF, 0, 0, 0xFE, 0, 0, 2, 0, 2, 0, 2, 0, 0, 0, 0, 0xFF};
    /* Remaining length of the fixed-size packets, -1 for variable ones. */
    static const signed char gw_fixed_length[16] =
        {-1, -1, 2, -1, 2, 2, 2, 2, -1, -1, -1, 2, 0, 0, 0, -1};
    """
    const uint64_t GW_LO
    const uint64_t GW_HI
    const uint64_t GW_SPACE
    const uint64_t GW_PLUS
    const uint64_t GW_BIT3
    const uint8_t gw_topic_special[256]
    const uint8_t gw_header_flags[16]
    const signed char gw_fixed_length[16]

cdef enum:
    MAX_REMAINING = 268435455

# Control characters in client ids, user names, topics and filters: refused
# (MAL_CONTROL) unless allowed (allow_control_characters). One policy per
# process: a worker sets it from its configuration before serving.
cdef bint control_allowed = False


# --- small helpers -------------------------------------------------------------

cdef inline int _mal(int* reason, int why) noexcept nogil:
    reason[0] = why
    return ERR_MALFORMED

cdef inline uint32_t _be16(const uint8_t* p) noexcept nogil:
    return (<uint32_t>p[0] << 8) | p[1]

cdef inline uint64_t _load64(const uint8_t* p) noexcept nogil:
    cdef uint64_t v
    memcpy(&v, p, 8)
    return v

cdef inline uint64_t _haszero(uint64_t v) noexcept nogil:
    # Non-zero iff some byte of v is 0 (exact as a yes/no answer).
    return (v - GW_LO) & ~v & GW_HI

cdef inline uint64_t _hasbelow_space(uint64_t v) noexcept nogil:
    # Non-zero iff some byte of v is below 0x20 (NUL or a C0 control; exact as
    # a yes/no answer, as _haszero, for any bound up to 0x80).
    return (v - GW_SPACE) & ~v & GW_HI

cdef inline uint64_t _word_not_printable(uint64_t v) noexcept nogil:
    # Non-zero iff some byte is non-ASCII, NUL, a C0 control or DEL: a byte of
    # 0x7F or more has its top bit set in v or in v + 0x01 per byte (a carry
    # between bytes needs a byte 0xFF, whose top bit is set already).
    return ((v | (v + GW_LO)) & GW_HI) | _hasbelow_space(v)

cdef inline uint64_t _topic_word_special(uint64_t v) noexcept nogil:
    # Non-zero iff some byte is non-ASCII, NUL, a control, '+' or '#'. '#'
    # (0x23) and '+' (0x2B) differ in bit 0x08 only: with it set, both are '+'.
    return _word_not_printable(v) | _haszero((v | GW_BIT3) ^ GW_PLUS)

cdef inline bint _plain_topic(const uint8_t* p, uint32_t n) noexcept nogil:
    # True iff p[0:n] is printable ASCII without '+', '#': then it is a valid
    # topic name as far as bytes go (the common case, decided 8 bytes at a time).
    cdef uint32_t i = 0
    if n >= 8:
        while i + 8 <= n:
            if _topic_word_special(_load64(p + i)):
                return False
            i += 8
        if i < n:
            return _topic_word_special(_load64(p + n - 8)) == 0
        return True
    while i < n:
        if gw_topic_special[p[i]]:
            return False
        i += 1
    return True

cdef inline int _take(const uint8_t* body, uint32_t n, uint32_t* off, Slice* s) noexcept nogil:
    # A 2-byte length prefixed field at body[off]; -1 if it runs past n.
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


# --- validation --------------------------------------------------------------

cdef inline bint _second_byte_ok(uint8_t lead, uint8_t c1) noexcept nogil:
    # The second byte of a 3- or 4-byte sequence: a continuation byte, in the
    # narrower range some leads allow (Unicode Table 3-7): after E0 and F0 no
    # overlong form, after ED no surrogate D800-DFFF (MQTT-1.5.3-1), after F4
    # nothing above U+10FFFF.
    cdef uint8_t lo = 0x80
    cdef uint8_t hi = 0xBF
    if lead == 0xE0:
        lo = 0xA0
    elif lead == 0xED:
        hi = 0x9F
    elif lead == 0xF0:
        lo = 0x90
    elif lead == 0xF4:
        hi = 0x8F
    return lo <= c1 <= hi


cdef int _scan_string(const uint8_t* p, uint32_t n) noexcept nogil:
    # -1: ill-formed UTF-8 or U+0000 (whatever else it holds); 1: well-formed,
    # with a control character (U+0001-U+001F, U+007F-U+009F); 0: neither.
    cdef uint32_t i = 0
    cdef uint64_t v
    cdef uint8_t c
    cdef int control = 0
    while i < n:
        if i + 8 <= n:
            v = _load64(p + i)
            if _word_not_printable(v) == 0:
                i += 8
                continue
        elif n >= 8 and _word_not_printable(_load64(p + n - 8)) == 0:
            return control              # the last bytes (fewer than 8) are printable ASCII
        c = p[i]
        if c < 0x80:
            if c < 0x20 or c == 0x7F:
                if c == 0:
                    return -1           # U+0000 (MQTT-1.5.3-2)
                control = 1             # C0 controls, DEL
            i += 1
        elif c < 0xC2:
            return -1                   # continuation byte or overlong lead
        elif c < 0xE0:
            if n - i < 2 or (p[i + 1] & 0xC0) != 0x80:
                return -1
            if c == 0xC2 and p[i + 1] < 0xA0:
                control = 1             # C1 controls U+0080-U+009F
            i += 2
        elif c < 0xF0:
            if n - i < 3 or not _second_byte_ok(c, p[i + 1]) or (p[i + 2] & 0xC0) != 0x80:
                return -1
            i += 3
        elif c < 0xF5:
            if (n - i < 4 or not _second_byte_ok(c, p[i + 1])
                    or (p[i + 2] & 0xC0) != 0x80 or (p[i + 3] & 0xC0) != 0x80):
                return -1
            i += 4
        else:
            return -1
    return control


cdef bint valid_utf8(const uint8_t* p, uint32_t n) noexcept nogil:
    return _scan_string(p, n) >= 0


cdef inline int _check_string(const uint8_t* p, uint32_t n) noexcept nogil:
    cdef int r = _scan_string(p, n)
    if r == 0:
        return 0
    if r < 0:
        return MAL_UTF8                 # MQTT-1.5.3-1/2
    return 0 if control_allowed else MAL_CONTROL     # section 1.5.3: the receiver MAY close

cdef int check_string(const uint8_t* p, uint32_t n) noexcept nogil:
    return _check_string(p, n)

cdef inline int _take_string(const uint8_t* body, uint32_t n, uint32_t* off, Slice* s,
                             int* reason) noexcept nogil:
    # A length-prefixed UTF-8 string field (section 1.5.3) at body[off]: 0, or
    # ERR_MALFORMED with *reason.
    cdef int bad
    if _take(body, n, off, s) < 0:
        return _mal(reason, MAL_LENGTH)
    bad = _check_string(s.ptr, s.len)
    if bad:
        return _mal(reason, bad)
    return 0


cdef inline uint32_t _utf8_chars(const uint8_t* p, uint32_t n) noexcept nogil:
    # Characters of a well-formed UTF-8 string: the bytes that are not continuations.
    cdef uint32_t i, chars = 0
    for i in range(n):
        if (p[i] & 0xC0) != 0x80:
            chars += 1
    return chars


cdef bint valid_topic_name(const uint8_t* p, uint32_t n) noexcept nogil:
    cdef uint32_t i
    if n == 0:
        return False
    for i in range(n):
        if p[i] == 0x2B or p[i] == 0x23:    # '+', '#'
            return False
    return True


cdef int check_topic_name(const uint8_t* p, uint32_t n) noexcept nogil:
    cdef int bad
    if n == 0:
        return MAL_TOPIC
    if _plain_topic(p, n):
        return 0
    bad = _check_string(p, n)
    if bad:
        return bad
    if not valid_topic_name(p, n):
        return MAL_TOPIC
    return 0


cdef bint valid_topic_filter(const uint8_t* p, uint32_t n) noexcept nogil:
    cdef uint32_t i
    cdef uint8_t c
    if n == 0:
        return False
    for i in range(n):
        c = p[i]
        if c == 0x23:       # '#': last, alone in its level
            if i != n - 1 or (i > 0 and p[i - 1] != 0x2F):
                return False
        elif c == 0x2B:     # '+': alone in its level
            if (i > 0 and p[i - 1] != 0x2F) or (i < n - 1 and p[i + 1] != 0x2F):
                return False
    return True


# --- decoding ----------------------------------------------------------------

cdef int decode_header(const uint8_t* buf, size_t n, uint32_t max_remaining,
                       uint8_t* first, uint32_t* remaining, int* reason) noexcept nogil:
    cdef uint8_t b0, b, t
    cdef uint32_t rem
    cdef int i
    cdef signed char fixed
    if n == 0:
        return ERR_INCOMPLETE
    b0 = buf[0]
    t = b0 >> 4
    if t == PUBLISH:
        if (b0 & 0x06) == 0x06:
            return _mal(reason, MAL_QOS)            # QoS 3 (MQTT-3.3.1-4)
        if (b0 & 0x0E) == 0x08:
            return _mal(reason, MAL_HEADER)         # DUP on QoS 0 (MQTT-3.3.1-2)
    elif (b0 & 0x0F) != gw_header_flags[t]:
        return _mal(reason, MAL_HEADER)             # MQTT-2.2.2-1/2, types 0/15
    if n < 2:
        return ERR_INCOMPLETE
    b = buf[1]
    rem = b & 0x7F
    i = 2
    if b & 0x80:
        while True:
            if <size_t>i >= n:
                return ERR_INCOMPLETE
            b = buf[i]
            rem |= <uint32_t>(b & 0x7F) << (7 * (i - 1))
            i += 1
            if not (b & 0x80):
                break
            if i == 5:
                return _mal(reason, MAL_LENGTH)     # more than 4 length bytes
    fixed = gw_fixed_length[t]
    if fixed >= 0 and rem != <uint32_t>fixed:
        return _mal(reason, MAL_LENGTH)
    first[0] = b0
    remaining[0] = rem
    if rem > max_remaining:
        return ERR_TOO_LARGE
    return i


cdef int decode_connect(const uint8_t* body, uint32_t n, ConnectPacket* out, int* reason) noexcept nogil:
    cdef uint32_t off = 0
    cdef Slice name
    cdef uint8_t level, flags, expect
    memset(out, 0, sizeof(ConnectPacket))
    if _take(body, n, &off, &name) < 0:
        return _mal(reason, MAL_LENGTH)
    if (name.len == 4 and name.ptr[0] == 0x4D and name.ptr[1] == 0x51
            and name.ptr[2] == 0x54 and name.ptr[3] == 0x54):                 # "MQTT"
        expect = 4
    elif (name.len == 6 and name.ptr[0] == 0x4D and name.ptr[1] == 0x51
            and name.ptr[2] == 0x49 and name.ptr[3] == 0x73
            and name.ptr[4] == 0x64 and name.ptr[5] == 0x70):                 # "MQIsdp"
        expect = 3
    else:
        return _mal(reason, MAL_PROTOCOL)       # MQTT-3.1.2-1
    if off >= n:
        return _mal(reason, MAL_LENGTH)
    level = body[off]
    off += 1
    out.protocol_level = level
    if level != expect:
        return CONNACK_BAD_PROTOCOL             # MQTT-3.1.2-2
    if n - off < 3:
        return _mal(reason, MAL_LENGTH)
    flags = body[off]
    out.keepalive = <uint16_t>_be16(body + off + 1)
    off += 3
    if flags & 0x01:
        return _mal(reason, MAL_PROTOCOL)       # MQTT-3.1.2-3
    out.clean_session = (flags >> 1) & 1
    out.will_flag = (flags >> 2) & 1
    out.will_qos = (flags >> 3) & 3
    out.will_retain = (flags >> 5) & 1
    out.has_password = (flags >> 6) & 1
    out.has_username = flags >> 7
    if not out.will_flag and (out.will_qos or out.will_retain):
        return _mal(reason, MAL_PROTOCOL)       # MQTT-3.1.2-11/13/15
    if out.will_qos == 3:
        return _mal(reason, MAL_QOS)            # MQTT-3.1.2-14
    if out.has_password and not out.has_username:
        return _mal(reason, MAL_PROTOCOL)       # MQTT-3.1.2-22
    if _take_string(body, n, &off, &out.client_id, reason) < 0:
        return ERR_MALFORMED
    if out.will_flag:
        if _take_string(body, n, &off, &out.will_topic, reason) < 0:
            return ERR_MALFORMED
        if not valid_topic_name(out.will_topic.ptr, out.will_topic.len):
            return _mal(reason, MAL_TOPIC)
        if _take(body, n, &off, &out.will_message) < 0:
            return _mal(reason, MAL_LENGTH)
    if out.has_username:
        if _take_string(body, n, &off, &out.username, reason) < 0:
            return ERR_MALFORMED
    if out.has_password:
        if _take(body, n, &off, &out.password) < 0:
            return _mal(reason, MAL_LENGTH)
    if off != n:
        return _mal(reason, MAL_LENGTH)         # trailing bytes
    if out.client_id.len == 0:
        if level == 3 or not out.clean_session:
            return CONNACK_ID_REJECTED          # MQTT-3.1.3-8
    elif level == 3 and out.client_id.len > 23 and _utf8_chars(out.client_id.ptr, out.client_id.len) > 23:
        return CONNACK_ID_REJECTED          # MQTT 3.1: 1 to 23 characters
    return 0


cdef inline int _decode_connack(const uint8_t* body, uint32_t n, uint8_t* session_present,
                                uint8_t* return_code, int* reason) noexcept nogil:
    if n != 2:
        return _mal(reason, MAL_LENGTH)
    if body[0] & 0xFE or body[1] > 5:
        return _mal(reason, MAL_PROTOCOL)       # reserved ack flags / return code
    session_present[0] = body[0]
    return_code[0] = body[1]
    return 0

cdef int decode_connack(const uint8_t* body, uint32_t n, uint8_t* session_present, uint8_t* return_code) noexcept nogil:
    cdef int reason
    return _decode_connack(body, n, session_present, return_code, &reason)


cdef int decode_publish(uint8_t first, const uint8_t* body, uint32_t n, PublishPacket* out, int* reason) noexcept nogil:
    cdef uint8_t qos = (first >> 1) & 3
    cdef uint32_t tl, off
    cdef int bad
    if qos == 3:
        return _mal(reason, MAL_QOS)
    if n < 2:
        return _mal(reason, MAL_LENGTH)
    tl = _be16(body)
    off = 2 + tl
    if off > n:
        return _mal(reason, MAL_LENGTH)
    if tl == 0:
        return _mal(reason, MAL_TOPIC)          # MQTT-4.7.3-1
    if not _plain_topic(body + 2, tl):
        bad = _check_string(body + 2, tl)
        if bad:
            return _mal(reason, bad)            # MQTT-1.5.3-1/2, section 1.5.3
        if not valid_topic_name(body + 2, tl):
            return _mal(reason, MAL_TOPIC)      # MQTT-3.3.2-2
    out.qos = qos
    out.retain = first & 1
    out.dup = (first >> 3) & 1
    out.topic.ptr = body + 2
    out.topic.len = tl
    if qos:
        if n - off < 2:
            return _mal(reason, MAL_LENGTH)
        out.packet_id = <uint16_t>_be16(body + off)
        if out.packet_id == 0:
            return _mal(reason, MAL_PACKET_ID)  # MQTT-2.3.1-1
        off += 2
    else:
        out.packet_id = 0
    out.payload.ptr = body + off
    out.payload.len = n - off
    return 0


cdef int decode_packet_id(const uint8_t* body, uint32_t n, uint16_t* packet_id) noexcept nogil:
    if n != 2:
        return ERR_MALFORMED
    packet_id[0] = <uint16_t>_be16(body)
    if packet_id[0] == 0:
        return ERR_MALFORMED
    return 0


cdef inline int _entries_begin(const uint8_t* body, uint32_t n, EntryIter* it, int* reason) noexcept nogil:
    if n < 2:
        return _mal(reason, MAL_LENGTH)
    it.packet_id = <uint16_t>_be16(body)
    if it.packet_id == 0:
        return _mal(reason, MAL_PACKET_ID)      # MQTT-2.3.1-1
    if n == 2:
        return _mal(reason, MAL_EMPTY)          # MQTT-3.8.3-3, MQTT-3.10.3-2
    it.p = body + 2
    it.end = body + n
    return 0

cdef int subscribe_begin(const uint8_t* body, uint32_t n, EntryIter* it, int* reason) noexcept nogil:
    return _entries_begin(body, n, it, reason)

cdef inline int _next_filter(EntryIter* it, uint32_t trailer, Slice* topic_filter, int* reason) noexcept nogil:
    # The topic filter that opens the next SUBSCRIBE or UNSUBSCRIBE entry, with
    # `trailer` more bytes of the entry after it (SUBSCRIBE's requested QoS):
    # 1 with it.p past the filter, 0 at the end, or ERR_MALFORMED.
    cdef const uint8_t* p = it.p
    cdef size_t avail = it.end - p
    cdef uint32_t l
    cdef int bad
    if avail == 0:
        return 0
    if avail < 2:
        return _mal(reason, MAL_LENGTH)
    l = _be16(p)
    if avail - 2 < <size_t>l + trailer:
        return _mal(reason, MAL_LENGTH)
    bad = _check_string(p + 2, l)
    if bad:
        return _mal(reason, bad)                # MQTT-3.8.3-1, MQTT-3.10.3-1, section 1.5.3
    if not valid_topic_filter(p + 2, l):
        return _mal(reason, MAL_TOPIC)          # MQTT-4.7.3-1, MQTT-4.7.1-2/3
    topic_filter.ptr = p + 2
    topic_filter.len = l
    it.p = p + 2 + l
    return 1

cdef int subscribe_next(EntryIter* it, Slice* topic_filter, uint8_t* qos, int* reason) noexcept nogil:
    cdef int rc = _next_filter(it, 1, topic_filter, reason)
    cdef uint8_t q
    if rc <= 0:
        return rc
    q = it.p[0]
    if q > 2:
        return _mal(reason, MAL_QOS)            # MQTT-3.8.3-4
    qos[0] = q
    it.p += 1
    return 1

cdef int unsubscribe_begin(const uint8_t* body, uint32_t n, EntryIter* it, int* reason) noexcept nogil:
    return _entries_begin(body, n, it, reason)

cdef int unsubscribe_next(EntryIter* it, Slice* topic_filter, int* reason) noexcept nogil:
    return _next_filter(it, 0, topic_filter, reason)

cdef int suback_begin(const uint8_t* body, uint32_t n, EntryIter* it) noexcept nogil:
    cdef int reason
    return _entries_begin(body, n, it, &reason)

cdef inline int _suback_next(EntryIter* it, uint8_t* return_code, int* reason) noexcept nogil:
    cdef uint8_t c
    if it.p == it.end:
        return 0
    c = it.p[0]
    if c > 2 and c != SUBACK_FAILURE:
        return _mal(reason, MAL_QOS)
    return_code[0] = c
    it.p += 1
    return 1

cdef int suback_next(EntryIter* it, uint8_t* return_code) noexcept nogil:
    cdef int reason
    return _suback_next(it, return_code, &reason)


cdef inline int _entry_next(uint8_t t, EntryIter* it, Slice* topic_filter, uint8_t* qos,
                            int* reason) noexcept nogil:
    # The next entry of a SUBSCRIBE (filter and QoS), UNSUBSCRIBE (filter) or
    # SUBACK (return code, in *qos) body.
    if t == SUBSCRIBE:
        return subscribe_next(it, topic_filter, qos, reason)
    if t == UNSUBSCRIBE:
        return unsubscribe_next(it, topic_filter, reason)
    return _suback_next(it, qos, reason)


cdef inline int _packet_id_body(const uint8_t* body, uint32_t n, uint16_t* packet_id, int* reason) noexcept nogil:
    # A body that is a packet id alone (PUBACK, PUBREC, PUBREL, PUBCOMP, UNSUBACK).
    if decode_packet_id(body, n, packet_id) < 0:
        return _mal(reason, MAL_LENGTH if n != 2 else MAL_PACKET_ID)
    return 0


# --- encoding ----------------------------------------------------------------

cdef uint32_t header_size(uint32_t remaining) noexcept nogil:
    if remaining < 128:
        return 2
    if remaining < 16384:
        return 3
    if remaining < 2097152:
        return 4
    return 5

cdef uint32_t write_header(uint8_t* out, uint8_t first, uint32_t remaining) noexcept nogil:
    cdef uint32_t i = 1
    cdef uint8_t b
    out[0] = first
    while True:
        b = remaining & 0x7F
        remaining >>= 7
        if remaining:
            out[i] = b | 0x80
            i += 1
        else:
            out[i] = b
            return i + 1

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

cdef inline uint32_t _connect_remaining(const ConnectPacket* c) noexcept nogil:
    cdef uint32_t rem = (8 if c.protocol_level == 3 else 6) + 4 + 2 + c.client_id.len
    if c.will_flag:
        rem += 4 + c.will_topic.len + c.will_message.len
    if c.has_username:
        rem += 2 + c.username.len
    if c.has_password:
        rem += 2 + c.password.len
    return rem

cdef uint32_t connect_size(const ConnectPacket* c) noexcept nogil:
    cdef uint32_t rem = _connect_remaining(c)
    return header_size(rem) + rem

cdef uint32_t encode_connect(uint8_t* out, const ConnectPacket* c) noexcept nogil:
    cdef uint32_t i = write_header(out, CONNECT << 4, _connect_remaining(c))
    if c.protocol_level == 3:
        i += _put_field(out + i, <const uint8_t*>b"MQIsdp", 6)
    else:
        i += _put_field(out + i, <const uint8_t*>b"MQTT", 4)
    out[i] = c.protocol_level
    out[i + 1] = (((c.clean_session & 1) << 1) | ((c.will_flag & 1) << 2)
                  | ((c.will_qos & 3) << 3) | ((c.will_retain & 1) << 5)
                  | ((c.has_password & 1) << 6) | ((c.has_username & 1) << 7))
    i += 2
    i += _put16(out + i, c.keepalive)
    i += _put_field(out + i, c.client_id.ptr, c.client_id.len)
    if c.will_flag:
        i += _put_field(out + i, c.will_topic.ptr, c.will_topic.len)
        i += _put_field(out + i, c.will_message.ptr, c.will_message.len)
    if c.has_username:
        i += _put_field(out + i, c.username.ptr, c.username.len)
    if c.has_password:
        i += _put_field(out + i, c.password.ptr, c.password.len)
    return i

cdef uint32_t encode_connack(uint8_t* out, uint8_t session_present, uint8_t return_code) noexcept nogil:
    out[0] = CONNACK << 4
    out[1] = 2
    out[2] = session_present
    out[3] = return_code
    return 4

cdef uint32_t publish_size(uint32_t topic_len, uint32_t payload_len, uint8_t qos) noexcept nogil:
    cdef uint32_t rem = 2 + topic_len + payload_len + (2 if qos else 0)
    return header_size(rem) + rem

cdef uint32_t encode_publish(uint8_t* out, const uint8_t* topic, uint32_t topic_len,
                             const uint8_t* payload, uint32_t payload_len,
                             uint8_t qos, uint8_t retain, uint8_t dup, uint16_t packet_id) noexcept nogil:
    cdef uint32_t rem = 2 + topic_len + payload_len + (2 if qos else 0)
    cdef uint32_t i = write_header(
        out, (PUBLISH << 4) | ((dup & 1) << 3) | ((qos & 3) << 1) | (retain & 1), rem)
    i += _put_field(out + i, topic, topic_len)
    if qos:
        i += _put16(out + i, packet_id)
    if payload_len:
        memcpy(out + i, payload, payload_len)
    return i + payload_len

cdef uint32_t encode_ack(uint8_t* out, uint8_t packet_type, uint16_t packet_id) noexcept nogil:
    out[0] = (packet_type << 4) | (0x02 if packet_type == PUBREL else 0)
    out[1] = 2
    out[2] = <uint8_t>(packet_id >> 8)
    out[3] = <uint8_t>packet_id
    return 4

cdef uint32_t subscribe1_size(uint32_t filter_len) noexcept nogil:
    cdef uint32_t rem = 2 + 2 + filter_len + 1
    return header_size(rem) + rem

cdef uint32_t encode_subscribe1(uint8_t* out, uint16_t packet_id, const uint8_t* topic_filter,
                                uint32_t filter_len, uint8_t qos) noexcept nogil:
    cdef uint32_t i = write_header(out, (SUBSCRIBE << 4) | 0x02, 2 + 2 + filter_len + 1)
    i += _put16(out + i, packet_id)
    i += _put_field(out + i, topic_filter, filter_len)
    out[i] = qos
    return i + 1

cdef uint32_t suback_size(uint32_t count) noexcept nogil:
    return header_size(2 + count) + 2 + count

cdef uint32_t encode_suback(uint8_t* out, uint16_t packet_id, const uint8_t* return_codes, uint32_t count) noexcept nogil:
    cdef uint32_t i = write_header(out, SUBACK << 4, 2 + count)
    i += _put16(out + i, packet_id)
    if count:
        memcpy(out + i, return_codes, count)
    return i + count

cdef uint32_t encode_empty(uint8_t* out, uint8_t packet_type) noexcept nogil:
    out[0] = packet_type << 4
    out[1] = 0
    return 2


# --- per-packet validation (the server's work, no Python objects) --------------

cdef int _check_body(uint8_t first, const uint8_t* body, uint32_t n, int* reason) noexcept nogil:
    """0 when valid, ERR_MALFORMED (with *reason) or a CONNACK refusal code."""
    cdef uint8_t t = first >> 4
    cdef PublishPacket pub
    cdef ConnectPacket con
    cdef EntryIter it
    cdef Slice tf
    cdef uint8_t q, sp
    cdef uint16_t pid
    cdef int rc
    memset(&it, 0, sizeof(EntryIter))
    if t == PUBLISH:
        return decode_publish(first, body, n, &pub, reason)
    if t == PUBACK or t == PUBREC or t == PUBREL or t == PUBCOMP or t == UNSUBACK:
        return _packet_id_body(body, n, &pid, reason)
    if t == PINGREQ or t == PINGRESP or t == DISCONNECT:
        return 0                                # size checked by the header
    if t == SUBSCRIBE or t == UNSUBSCRIBE or t == SUBACK:
        rc = _entries_begin(body, n, &it, reason)
        if rc < 0:
            return rc
        while True:
            rc = _entry_next(t, &it, &tf, &q, reason)
            if rc <= 0:
                return rc
    if t == CONNECT:
        return decode_connect(body, n, &con, reason)
    if t == CONNACK:
        return _decode_connack(body, n, &sp, &q, reason)
    return _mal(reason, MAL_HEADER)             # unreachable after decode_header


cdef Py_ssize_t _walk(const uint8_t* p, size_t n, uint32_t max_remaining, int* err,
                      int* reason, size_t* used) noexcept nogil:
    cdef size_t off = 0
    cdef Py_ssize_t count = 0
    cdef int hl, rc
    cdef uint8_t first
    cdef uint32_t rem
    err[0] = 0
    while off < n:
        hl = decode_header(p + off, n - off, max_remaining, &first, &rem, reason)
        if hl < 0:
            if hl != ERR_INCOMPLETE:
                err[0] = hl
            break
        if n - off - <size_t>hl < rem:
            break
        rc = _check_body(first, p + off + hl, rem, reason)
        if rc != 0:
            err[0] = rc
            break
        count += 1
        off += <size_t>hl + rem
    used[0] = off
    return count


# --- Python API --------------------------------------------------------------

_REASONS = ("none", "header", "length", "utf8", "protocol", "topic", "qos", "packet_id", "empty",
            "control", "server_packet", "ack")


def allow_control_characters(bint allowed):
    """Whether the decoders accept control characters (U+0001-U+001F,
    U+007F-U+009F) in client ids, user names, will topics, topic names and
    filters. Refused by default (MAL_CONTROL, "control"): section 1.5.3 lets a
    receiver close the connection for them, and Mosquitto does. For this
    process, until set again."""
    global control_allowed
    control_allowed = allowed


def control_characters_allowed():
    return control_allowed


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
    raise MalformedPacket(_REASONS[reason] if 0 <= reason < len(_REASONS) else "unknown")


cdef inline str _str(Slice s):
    return PyUnicode_DecodeUTF8(<char*>s.ptr, s.len, NULL)

cdef inline bytes _bytes(Slice s):
    return PyBytes_FromStringAndSize(<char*>s.ptr, s.len)


# The packets that are a packet id alone, their type alone, or a packet id and
# a list of entries: decoded and encoded by kind.
cdef dict _ACK_CLASSES = {PUBACK: Puback, PUBREC: Pubrec, PUBREL: Pubrel, PUBCOMP: Pubcomp,
                          UNSUBACK: Unsuback}
cdef dict _EMPTY_CLASSES = {PINGREQ: Pingreq, PINGRESP: Pingresp, DISCONNECT: Disconnect}
cdef dict _ENTRY_CLASSES = {SUBSCRIBE: Subscribe, UNSUBSCRIBE: Unsubscribe, SUBACK: Suback}
cdef dict _ACK_TYPES = {cls: t for t, cls in _ACK_CLASSES.items()}
cdef dict _EMPTY_TYPES = {cls: t for t, cls in _EMPTY_CLASSES.items()}
cdef dict _ENTRY_TYPES = {cls: t for t, cls in _ENTRY_CLASSES.items()}


cdef object _build(uint8_t first, const uint8_t* body, uint32_t n):
    cdef uint8_t t = first >> 4
    cdef int reason = 0
    cdef int rc
    cdef PublishPacket pub
    cdef ConnectPacket con
    cdef EntryIter it
    cdef Slice tf
    cdef uint8_t q, sp
    cdef uint16_t pid
    cdef list entries
    cdef object cls
    q = sp = 0
    memset(&it, 0, sizeof(EntryIter))
    tf.ptr = NULL
    tf.len = 0
    if t == PUBLISH:
        if decode_publish(first, body, n, &pub, &reason) < 0:
            _raise(ERR_MALFORMED, reason, 0, 0)
        return Publish(_str(pub.topic), _bytes(pub.payload), pub.qos,
                       pub.retain != 0, pub.dup != 0, pub.packet_id)
    cls = _ACK_CLASSES.get(t)
    if cls is not None:
        if _packet_id_body(body, n, &pid, &reason) < 0:
            _raise(ERR_MALFORMED, reason, 0, 0)
        return cls(pid)
    cls = _EMPTY_CLASSES.get(t)
    if cls is not None:
        return cls()
    cls = _ENTRY_CLASSES.get(t)
    if cls is not None:
        if _entries_begin(body, n, &it, &reason) < 0:
            _raise(ERR_MALFORMED, reason, 0, 0)
        entries = []
        while True:
            rc = _entry_next(t, &it, &tf, &q, &reason)
            if rc < 0:
                _raise(ERR_MALFORMED, reason, 0, 0)
            if rc == 0:
                return cls(it.packet_id, entries)
            if t == SUBSCRIBE:
                entries.append((_str(tf), q))
            elif t == UNSUBSCRIBE:
                entries.append(_str(tf))
            else:
                entries.append(q)
    if t == CONNECT:
        rc = decode_connect(body, n, &con, &reason)
        if rc != 0:
            _raise(rc, reason, 0, 0)
        return Connect(
            _str(con.client_id),
            con.clean_session != 0,
            con.keepalive,
            _str(con.will_topic) if con.will_flag else None,
            _bytes(con.will_message) if con.will_flag else None,
            con.will_qos,
            con.will_retain != 0,
            _str(con.username) if con.has_username else None,
            _bytes(con.password) if con.has_password else None,
            con.protocol_level,
        )
    if t == CONNACK:
        if _decode_connack(body, n, &sp, &q, &reason) < 0:
            _raise(ERR_MALFORMED, reason, 0, 0)
        return Connack(sp != 0, q)
    _raise(ERR_MALFORMED, MAL_HEADER, 0, 0)


def decode(data, max_packet_size=MAX_REMAINING_LENGTH):
    """Decodes every complete packet of ``data``.

    Returns ``(packets, consumed)``: the bytes past ``consumed`` are the start
    of a packet not fully received yet. ``max_packet_size`` limits the
    remaining length of each packet. Raises MalformedPacket, PacketTooLarge,
    or ConnectRefused (a CONNECT the server answers with CONNACK 1 or 2).
    """
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
        hl = decode_header(p + off, n - off, maxr, &first, &rem, &reason)
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
            # read the header again for the size in the error
            decode_header(p + used, n - used, maxr, &first, &rem, &reason)
        _raise(err, reason, rem, maxr)
    return count


# --- encoding, Python API --------------------------------------------------------

cdef inline const uint8_t* _utf8(object s, Py_ssize_t* n) except NULL:
    cdef const char* p
    if type(s) is not str:
        raise TypeError(f"expected str, got {type(s).__name__}")
    p = PyUnicode_AsUTF8AndSize(s, n)
    if n[0] > 65535:
        raise ValueError("string longer than 65535 bytes")
    return <const uint8_t*>p

cdef inline bytes _as_bytes(object b, bint field):
    if type(b) is not bytes:
        b = bytes(b)
    if field and len(<bytes>b) > 65535:
        raise ValueError("binary field longer than 65535 bytes")
    return <bytes>b

cdef inline int _u16(object v) except -1:
    if not 0 <= v <= 65535:
        raise ValueError(f"packet identifier out of range: {v!r}")
    return v

cdef inline int _qos(object v) except -1:
    if not 0 <= v <= 2:
        raise ValueError(f"QoS out of range: {v!r}")
    return v

cdef inline uint32_t _check_rem(Py_ssize_t rem) except 0:
    if rem > MAX_REMAINING:
        raise ValueError("packet too large for MQTT")
    return <uint32_t>rem

cdef inline bytes _alloc(uint32_t size, uint8_t** out):
    cdef bytes b = PyBytes_FromStringAndSize(NULL, size)
    out[0] = <uint8_t*>PyBytes_AS_STRING(b)
    return b


cdef bytes _encode_publish(object pkt):
    cdef Py_ssize_t tl, pl
    cdef const uint8_t* tp = _utf8(pkt.topic, &tl)
    cdef bytes payload = _as_bytes(pkt.payload, False)
    cdef int qos = _qos(pkt.qos)
    cdef int pid = _u16(pkt.packet_id)
    cdef uint8_t* out
    pl = len(payload)
    _check_rem(2 + tl + pl + (2 if qos else 0))
    cdef bytes b = _alloc(publish_size(<uint32_t>tl, <uint32_t>pl, qos), &out)
    encode_publish(out, tp, <uint32_t>tl, <const uint8_t*>PyBytes_AS_STRING(payload), <uint32_t>pl,
                   qos, 1 if pkt.retain else 0, 1 if pkt.dup else 0, pid)
    return b


cdef bytes _encode_connect(object pkt):
    cdef ConnectPacket c
    cdef Py_ssize_t l
    cdef bytes will_message, password
    cdef uint8_t* out
    cdef int level = pkt.protocol_level
    memset(&c, 0, sizeof(ConnectPacket))
    if not 0 <= level <= 255:
        raise ValueError("protocol level out of range")
    c.protocol_level = level
    c.clean_session = 1 if pkt.clean_session else 0
    if not 0 <= pkt.keepalive <= 65535:
        raise ValueError("keepalive out of range")
    c.keepalive = pkt.keepalive
    c.client_id.ptr = _utf8(pkt.client_id, &l)
    c.client_id.len = <uint32_t>l
    if not 0 <= pkt.will_qos <= 3:
        raise ValueError("will QoS out of range")
    c.will_qos = pkt.will_qos
    c.will_retain = 1 if pkt.will_retain else 0
    if pkt.will_topic is not None:
        c.will_flag = 1
        c.will_topic.ptr = _utf8(pkt.will_topic, &l)
        c.will_topic.len = <uint32_t>l
        will_message = _as_bytes(pkt.will_message if pkt.will_message is not None else b"", True)
        c.will_message.ptr = <const uint8_t*>PyBytes_AS_STRING(will_message)
        c.will_message.len = <uint32_t>len(will_message)
    if pkt.username is not None:
        c.has_username = 1
        c.username.ptr = _utf8(pkt.username, &l)
        c.username.len = <uint32_t>l
    if pkt.password is not None:
        c.has_password = 1
        password = _as_bytes(pkt.password, True)
        c.password.ptr = <const uint8_t*>PyBytes_AS_STRING(password)
        c.password.len = <uint32_t>len(password)
    cdef bytes b = _alloc(connect_size(&c), &out)
    encode_connect(out, &c)
    return b


cdef bytes _encode_entries(int ptype, object pkt):
    # SUBSCRIBE (filter, qos) / UNSUBSCRIBE filter / SUBACK code entries.
    cdef int pid = _u16(pkt.packet_id)
    cdef Py_ssize_t rem = 2, l
    cdef list parts = []
    cdef uint8_t* out
    cdef uint32_t i
    cdef const uint8_t* fp
    if ptype == SUBACK:
        codes = bytes(pkt.return_codes)
        rem += len(codes)
        _check_rem(rem)
        b = _alloc(suback_size(<uint32_t>len(codes)), &out)
        encode_suback(out, pid, <const uint8_t*>PyBytes_AS_STRING(codes), <uint32_t>len(codes))
        return b
    if ptype == SUBSCRIBE:
        for topic_filter, qos in pkt.topics:
            _utf8(topic_filter, &l)
            _qos(qos)
            parts.append((topic_filter, qos))
            rem += 3 + l
    else:
        for topic_filter in pkt.topics:
            _utf8(topic_filter, &l)
            parts.append(topic_filter)
            rem += 2 + l
    _check_rem(rem)
    b = _alloc(header_size(<uint32_t>rem) + <uint32_t>rem, &out)
    i = write_header(out, (ptype << 4) | 0x02, <uint32_t>rem)
    i += _put16(out + i, pid)
    for part in parts:
        if ptype == SUBSCRIBE:
            fp = _utf8(part[0], &l)
            i += _put_field(out + i, fp, <uint32_t>l)
            out[i] = <uint8_t>part[1]
            i += 1
        else:
            fp = _utf8(part, &l)
            i += _put_field(out + i, fp, <uint32_t>l)
    return b


cdef bytes _encode_ack(uint8_t ptype, object pkt):
    cdef uint8_t* out
    cdef int pid = _u16(pkt.packet_id)
    cdef bytes b = _alloc(4, &out)
    encode_ack(out, ptype, pid)
    return b


cdef bytes _encode_empty(uint8_t ptype):
    cdef uint8_t* out
    cdef bytes b = _alloc(2, &out)
    encode_empty(out, ptype)
    return b


def encode(packet):
    """Encodes one packet (gw.packets struct) to its wire bytes."""
    cdef object t = type(packet)
    cdef object ptype
    cdef uint8_t* out
    cdef bytes b
    if t is Publish:
        return _encode_publish(packet)
    ptype = _ACK_TYPES.get(t)
    if ptype is not None:
        return _encode_ack(ptype, packet)
    ptype = _EMPTY_TYPES.get(t)
    if ptype is not None:
        return _encode_empty(ptype)
    ptype = _ENTRY_TYPES.get(t)
    if ptype is not None:
        return _encode_entries(ptype, packet)
    if t is Connect:
        return _encode_connect(packet)
    if t is Connack:
        if not 0 <= packet.return_code <= 255:
            raise ValueError("return code out of range")
        b = _alloc(4, &out)
        encode_connack(out, 1 if packet.session_present else 0, packet.return_code)
        return b
    raise TypeError(f"not an MQTT packet: {packet!r}")


cdef int _topic_string(str topic, const uint8_t** p, uint32_t* n) except -1:
    # 1 with the UTF-8 of a topic name or filter that is a valid MQTT string (at
    # most 65535 bytes, well-formed, no U+0000, no control character unless
    # they are allowed); 0 when it is not one.
    cdef Py_ssize_t size
    cdef const char* utf8
    try:
        utf8 = PyUnicode_AsUTF8AndSize(topic, &size)
    except UnicodeEncodeError:
        return 0
    if size > 65535 or check_string(<const uint8_t*>utf8, <uint32_t>size) != 0:
        return 0
    p[0] = <const uint8_t*>utf8
    n[0] = <uint32_t>size
    return 1


def is_valid_topic_name(str topic):
    """A topic name a client may PUBLISH to: non-empty, no wildcard, no U+0000,
    no control character unless they are allowed."""
    cdef const uint8_t* p
    cdef uint32_t n
    return _topic_string(topic, &p, &n) == 1 and valid_topic_name(p, n)


def is_valid_topic_filter(str topic_filter):
    """A topic filter a client may SUBSCRIBE to (MQTT-4.7.1-2/3, MQTT-4.7.3-1), no
    control character unless they are allowed."""
    cdef const uint8_t* p
    cdef uint32_t n
    return _topic_string(topic_filter, &p, &n) == 1 and valid_topic_filter(p, n)
