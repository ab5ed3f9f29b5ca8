# The MQTT 3.1.1 codec: C-level decode and encode of all 14 control packets.
#
# Decoders read from a buffer the caller owns and fill structs whose Slice
# fields point *into* that buffer (no copies, no Python objects). Every rule
# the standard calls "malformed" is checked here, so callers can trust a
# decoded packet. Encoders write into memory the caller reserved, sized with
# the matching *_size() function, and return the number of bytes written.
#
# Everything here is `noexcept nogil`: the worker loop and the load generator
# call it per packet.

from libc.stdint cimport uint8_t, uint16_t, uint32_t

# Control packet types (MQTT 3.1.1 section 2.2.1), cimported with the codec.
from gw_ext.packet_types cimport (
    CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP, SUBSCRIBE, SUBACK,
    UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT,
)

cdef enum:
    # Negative results of the decoders.
    ERR_INCOMPLETE = -1   # not enough bytes yet: read more and call again
    ERR_MALFORMED = -2    # a protocol violation: the connection must be closed
    ERR_TOO_LARGE = -3    # remaining length above the caller's maximum

cdef enum:
    # CONNACK return codes (MQTT 3.1.1 section 3.2.2.3).
    CONNACK_ACCEPTED = 0
    CONNACK_BAD_PROTOCOL = 1
    CONNACK_ID_REJECTED = 2
    CONNACK_UNAVAILABLE = 3
    CONNACK_BAD_AUTH = 4
    CONNACK_NOT_AUTHORIZED = 5

cdef enum:
    # SUBACK failure return code (MQTT 3.1.1 section 3.9.3).
    SUBACK_FAILURE = 0x80

cdef enum:
    # Why a packet was malformed: decoders store one of these in *reason
    # (where they take a reason pointer) so the worker can count and log it.
    MAL_NONE = 0
    MAL_HEADER = 1          # reserved type, bad fixed-header flags
    MAL_LENGTH = 2          # remaining length over 4 bytes or inconsistent
    MAL_UTF8 = 3            # ill-formed UTF-8, U+0000 or a surrogate
    MAL_PROTOCOL = 4        # bad protocol name, reserved connect flag, will flags
    MAL_TOPIC = 5           # empty topic or filter, wildcard in a topic name, bad filter (a/#/b, a+)
    MAL_QOS = 6             # QoS 3
    MAL_PACKET_ID = 7       # packet identifier 0 where one is required
    MAL_EMPTY = 8           # SUBSCRIBE/UNSUBSCRIBE without a topic filter
    MAL_CONTROL = 9         # a control character (U+0001-U+001F, U+007F-U+009F) in a client id,
                            # user name, will topic, topic name or filter (while they are refused)
    # Not the codec's own findings (it decodes either direction), but reasons
    # the worker's handlers report with the same counters:
    MAL_SERVER_PACKET = 10  # a packet only servers send (CONNACK, SUBACK, UNSUBACK, PINGRESP)
    MAL_ACK = 11            # an acknowledgement of the wrong kind for the flow it answers


cdef struct Slice:
    const uint8_t* ptr
    uint32_t len

cdef struct ConnectPacket:
    uint8_t protocol_level    # 4 = MQTT 3.1.1 ("MQTT"), 3 = MQTT 3.1 ("MQIsdp")
    uint8_t clean_session
    uint8_t will_flag
    uint8_t will_qos
    uint8_t will_retain
    uint8_t has_username
    uint8_t has_password
    uint16_t keepalive        # seconds; 0 = no keepalive
    Slice client_id
    Slice will_topic
    Slice will_message
    Slice username
    Slice password

cdef struct PublishPacket:
    uint8_t qos
    uint8_t retain
    uint8_t dup
    uint16_t packet_id        # 0 for QoS 0
    Slice topic
    Slice payload

cdef struct EntryIter:
    # Walks the entries of a SUBSCRIBE, UNSUBSCRIBE or SUBACK body.
    const uint8_t* p
    const uint8_t* end
    uint16_t packet_id


# --- validation (MQTT 3.1.1 sections 1.5.3 and 4.7) ---------------------------

# Well-formed UTF-8 (RFC 3629: no overlongs, no surrogates D800-DFFF, nothing
# above U+10FFFF) and no U+0000 (MQTT-1.5.3-1, -1.5.3-2). Control characters
# are well-formed: see check_string.
cdef bint valid_utf8(const uint8_t* p, uint32_t n) noexcept nogil
# What the decoders check of a client id, user name, topic or filter: 0, or
# MAL_UTF8 (valid_utf8 fails), or MAL_CONTROL for a control character
# (U+0001-U+001F, U+007F-U+009F), which section 1.5.3 lets a receiver close
# the connection for, unless they are allowed (the Python API's
# allow_control_characters; refused by default, as Mosquitto does).
cdef int check_string(const uint8_t* p, uint32_t n) noexcept nogil
# A topic name for PUBLISH: at least one byte, no '+' or '#' (MQTT-3.3.2-2).
cdef bint valid_topic_name(const uint8_t* p, uint32_t n) noexcept nogil
# check_string and valid_topic_name at once, with the fast path of
# decode_publish (printable ASCII decided 8 bytes at a time): 0, or MAL_UTF8,
# MAL_CONTROL (as check_string), or MAL_TOPIC (empty, or a wildcard).
cdef int check_topic_name(const uint8_t* p, uint32_t n) noexcept nogil
# A topic filter: at least one byte, '#' only last and alone in its level,
# '+' alone in its level (MQTT-4.7.1-2, -4.7.1-3).
cdef bint valid_topic_filter(const uint8_t* p, uint32_t n) noexcept nogil


# --- decoding ----------------------------------------------------------------

# Reads a fixed header from buf[0:n]. On success returns its length (2..5) and
# sets *first (the first byte: type << 4 | flags) and *remaining. Checks the
# packet type is not reserved (0, 15) and its flag bits are the ones section
# 2.2.2 fixes for its type (PUBLISH: QoS 3, MQTT-3.3.1-4, and DUP on QoS 0,
# MQTT-3.3.1-2, are malformed), and that the fixed-size packets (PUBACK,
# PUBREC, PUBREL, PUBCOMP, UNSUBACK, CONNACK: 2; PINGREQ, PINGRESP,
# DISCONNECT: 0) carry exactly their size (MAL_LENGTH). Returns
# ERR_INCOMPLETE when the header itself is cut, ERR_MALFORMED (and *reason) for
# a bad type/flags or a remaining length over 4 bytes, ERR_TOO_LARGE when
# the remaining length exceeds max_remaining.
cdef int decode_header(const uint8_t* buf, size_t n, uint32_t max_remaining,
                       uint8_t* first, uint32_t* remaining, int* reason) noexcept nogil

# CONNECT body (the bytes after the fixed header). Returns 0 when valid,
# CONNACK_BAD_PROTOCOL for a protocol level other than 4 ("MQTT") or 3
# ("MQIsdp"), CONNACK_ID_REJECTED for an empty client id with clean session 0
# (MQTT-3.1.3-8) or, for level 3, a client id that is empty or longer than 23
# characters (MQTT 3.1, section 3.1); ERR_MALFORMED (and *reason) for anything
# the standard calls malformed: wrong protocol name, reserved flag set
# (MQTT-3.1.2-3), will QoS 3 or will flags without the will flag
# (MQTT-3.1.2-11/13/15), password without username (MQTT-3.1.2-22), a will
# topic that is no topic name, a string field failing check_string, trailing
# or missing bytes.
cdef int decode_connect(const uint8_t* body, uint32_t n, ConnectPacket* out, int* reason) noexcept nogil

# CONNACK body (client side). 0 or ERR_MALFORMED.
cdef int decode_connack(const uint8_t* body, uint32_t n, uint8_t* session_present, uint8_t* return_code) noexcept nogil

# PUBLISH body; `first` is the fixed header's first byte (flags carry QoS,
# retain, dup). Checks the topic name (check_string, at least one byte, no
# wildcards), packet id non-zero for QoS > 0 (MQTT-2.3.1-1). 0 or
# ERR_MALFORMED (and *reason).
cdef int decode_publish(uint8_t first, const uint8_t* body, uint32_t n, PublishPacket* out, int* reason) noexcept nogil

# PUBACK, PUBREC, PUBREL, PUBCOMP, UNSUBACK: exactly a non-zero packet id.
cdef int decode_packet_id(const uint8_t* body, uint32_t n, uint16_t* packet_id) noexcept nogil

# SUBSCRIBE: subscribe_begin reads the packet id and checks at least one
# entry follows (MQTT-3.8.3-3); subscribe_next yields (filter, requested QoS)
# and returns 1 for an entry, 0 at the end, ERR_MALFORMED (and *reason) for a
# filter failing check_string (its reason), an empty filter (MQTT-4.7.3-1) or
# one that is no filter (a/#/b, a+: MQTT-4.7.1-2/3), both MAL_TOPIC, then for
# QoS 3 or reserved bits (MQTT-3.8.3-4). Each is a protocol violation, which
# closes the connection (MQTT-4.8.0-1): SUBACK 0x80 is for a valid filter the
# server refuses.
cdef int subscribe_begin(const uint8_t* body, uint32_t n, EntryIter* it, int* reason) noexcept nogil
cdef int subscribe_next(EntryIter* it, Slice* topic_filter, uint8_t* qos, int* reason) noexcept nogil
# UNSUBSCRIBE: same shape and checks, entries are filters only (MQTT-3.10.3-2).
cdef int unsubscribe_begin(const uint8_t* body, uint32_t n, EntryIter* it, int* reason) noexcept nogil
cdef int unsubscribe_next(EntryIter* it, Slice* topic_filter, int* reason) noexcept nogil
# SUBACK (client side): return codes 0, 1, 2 or 0x80.
cdef int suback_begin(const uint8_t* body, uint32_t n, EntryIter* it) noexcept nogil
cdef int suback_next(EntryIter* it, uint8_t* return_code) noexcept nogil


# --- encoding ----------------------------------------------------------------

# Bytes needed for a fixed header carrying this remaining length (2..5).
cdef uint32_t header_size(uint32_t remaining) noexcept nogil
# Writes a fixed header, returns its length.
cdef uint32_t write_header(uint8_t* out, uint8_t first, uint32_t remaining) noexcept nogil

cdef uint32_t connect_size(const ConnectPacket* c) noexcept nogil
cdef uint32_t encode_connect(uint8_t* out, const ConnectPacket* c) noexcept nogil
# 4 bytes.
cdef uint32_t encode_connack(uint8_t* out, uint8_t session_present, uint8_t return_code) noexcept nogil
cdef uint32_t publish_size(uint32_t topic_len, uint32_t payload_len, uint8_t qos) noexcept nogil
cdef uint32_t encode_publish(uint8_t* out, const uint8_t* topic, uint32_t topic_len,
                             const uint8_t* payload, uint32_t payload_len,
                             uint8_t qos, uint8_t retain, uint8_t dup, uint16_t packet_id) noexcept nogil
# PUBACK, PUBREC, PUBREL (flags 0b0010 set here), PUBCOMP, UNSUBACK: 4 bytes.
cdef uint32_t encode_ack(uint8_t* out, uint8_t packet_type, uint16_t packet_id) noexcept nogil
# SUBSCRIBE with one filter (what clients and the load generator send most).
cdef uint32_t subscribe1_size(uint32_t filter_len) noexcept nogil
cdef uint32_t encode_subscribe1(uint8_t* out, uint16_t packet_id, const uint8_t* topic_filter,
                                uint32_t filter_len, uint8_t qos) noexcept nogil
cdef uint32_t suback_size(uint32_t count) noexcept nogil
cdef uint32_t encode_suback(uint8_t* out, uint16_t packet_id, const uint8_t* return_codes, uint32_t count) noexcept nogil
# PINGREQ, PINGRESP, DISCONNECT: 2 bytes.
cdef uint32_t encode_empty(uint8_t* out, uint8_t packet_type) noexcept nogil
