# The MQTT 5.0 codec: C-level decode and encode of all 15 control packets.
#
# Same shape as the 3.1.1 codec (codec.pxd), whose strings, topic checks,
# Slice and error codes it shares: decoders read from a buffer the caller owns
# and fill structs whose Slices point into it (no copies, no Python objects),
# checking every Malformed Packet and Protocol Error rule the standard gives
# a packet alone (section 4.13); rules that need a connection's state (a
# Topic Alias above the maximum, Subscription Identifiers in a PUBLISH from a
# client, MQTT-3.3.4-6) are the handlers'. Encoders write into memory the
# caller reserved, sized with the matching *_size() function; properties are
# handed to them as a ready property block (what a decoder's Props5.raw
# points at, or what the put_prop_* writers made).
#
# A connection's version comes from its CONNECT (connect_protocol_level): 5
# decodes every later packet with this codec, 4 and 3 with codec.pxd's.
#
# Everything here is `noexcept nogil`.

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t

from gw_ext.codec cimport Slice, ERR_INCOMPLETE, ERR_MALFORMED, ERR_TOO_LARGE
from gw_ext.packet_types cimport (
    CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP, SUBSCRIBE, SUBACK,
    UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT,
)

cdef enum:
    AUTH = 15                 # MQTT 5.0 gives the reserved type 15 to AUTH (section 2.1.2)
    WILL_PROPERTIES = 0       # the context of a will's properties (types are 1..15)

cdef enum:
    # Negative results beside codec.pxd's ERR_INCOMPLETE, ERR_MALFORMED (a
    # Malformed Packet, reason code 0x81) and ERR_TOO_LARGE:
    ERR_PROTOCOL = -4         # a Protocol Error (reason code 0x82)

cdef enum:
    # Why a packet was refused (*reason); gw/packets5.py REASONS names them and
    # gives their class. 1-10: Malformed Packet, 11-19: Protocol Error.
    R5_NONE = 0
    R5_HEADER = 1             # reserved type 0, fixed-header flags (MQTT-2.1.3-1), DUP on QoS 0 (MQTT-3.3.1-2)
    R5_LENGTH = 2             # a field, property or property block past its end; trailing bytes;
                              # PINGREQ/PINGRESP not empty
    R5_VARINT = 3             # Variable Byte Integer over 4 bytes or not minimal (section 1.5.5, MQTT-1.5.5-1)
    R5_UTF8 = 4               # MQTT-1.5.4-1 (ill-formed, surrogates), MQTT-1.5.4-2 (U+0000), MQTT-1.5.7-1
    R5_CONTROL = 5            # a control character where the policy refuses them (section 1.5.4)
    R5_PROTOCOL = 6           # protocol name (MQTT-3.1.2-1), CONNECT reserved flag (MQTT-3.1.2-3), will
                              # QoS/Retain without the will (MQTT-3.1.2-11/13), CONNACK flags (MQTT-3.2.2-1)
    R5_QOS = 7                # PUBLISH QoS 3 (MQTT-3.3.1-4), will QoS 3 (MQTT-3.1.2-12)
    R5_TOPIC = 8              # empty topic or filter (MQTT-4.7.3-1), wildcard in a topic name
                              # (MQTT-3.3.2-2, MQTT-3.3.2-14, MQTT-3.1.3-11), filter syntax (MQTT-4.7.1-1/2),
                              # share name (MQTT-4.8.2-1/2)
    R5_PROPERTY = 9           # identifier unknown or not valid in this packet (section 2.2.2.2)
    R5_OPTIONS = 10           # subscription options reserved bits 6-7 (MQTT-3.8.3-5)
    R5_DUPLICATE_PROPERTY = 11   # a property twice, but User Property, and Subscription Identifier in PUBLISH
    R5_PROPERTY_VALUE = 12    # Receive Maximum, Maximum Packet Size, Topic Alias (MQTT-3.3.2-8) or
                              # Subscription Identifier 0; a 0-or-1 property above 1
    R5_PACKET_ID = 13         # packet identifier 0 (MQTT-2.2.1-3)
    R5_EMPTY = 14             # SUBSCRIBE/UNSUBSCRIBE without a filter (MQTT-3.8.3-2, MQTT-3.10.3-2),
                              # SUBACK/UNSUBACK without a reason code
    R5_REASON_CODE = 15       # a reason code the packet may not carry (MQTT-3.2.2-8, MQTT-3.4.2-1, ...)
    R5_SUBSCRIPTION = 16      # options QoS 3, Retain Handling 3 (3.8.3.1), No Local on a shared
                              # subscription (MQTT-3.8.3-4)
    R5_TOPIC_ALIAS = 17       # an empty topic name without a Topic Alias (3.3.2.1)
    R5_SESSION_PRESENT = 18   # CONNACK Session Present with a non-zero reason code (MQTT-3.2.2-6)
    R5_AUTHENTICATION = 19    # Authentication Data without Method (3.1.2.11.10, 3.2.2.3.18); AUTH
                              # without Method (3.15.2.2.2)

cdef enum:
    # Property identifiers (section 2.2.2.2, Table 2-4).
    P_PAYLOAD_FORMAT = 0x01
    P_MESSAGE_EXPIRY = 0x02
    P_CONTENT_TYPE = 0x03
    P_RESPONSE_TOPIC = 0x08
    P_CORRELATION_DATA = 0x09
    P_SUBSCRIPTION_ID = 0x0B
    P_SESSION_EXPIRY = 0x11
    P_ASSIGNED_CLIENT_ID = 0x12
    P_SERVER_KEEP_ALIVE = 0x13
    P_AUTH_METHOD = 0x15
    P_AUTH_DATA = 0x16
    P_REQUEST_PROBLEM = 0x17
    P_WILL_DELAY = 0x18
    P_REQUEST_RESPONSE = 0x19
    P_RESPONSE_INFO = 0x1A
    P_SERVER_REFERENCE = 0x1C
    P_REASON_STRING = 0x1F
    P_RECEIVE_MAXIMUM = 0x21
    P_TOPIC_ALIAS_MAXIMUM = 0x22
    P_TOPIC_ALIAS = 0x23
    P_MAXIMUM_QOS = 0x24
    P_RETAIN_AVAILABLE = 0x25
    P_USER_PROPERTY = 0x26
    P_MAXIMUM_PACKET_SIZE = 0x27
    P_WILDCARD_AVAILABLE = 0x28
    P_SUBSCRIPTION_ID_AVAILABLE = 0x29
    P_SHARED_AVAILABLE = 0x2A

cdef enum:
    # Reason codes the server sends most (section 2.4).
    RC_SUCCESS = 0x00
    RC_NO_MATCHING_SUBSCRIBERS = 0x10
    RC_UNSPECIFIED = 0x80
    RC_MALFORMED = 0x81
    RC_PROTOCOL_ERROR = 0x82
    RC_UNSUPPORTED_VERSION = 0x84
    RC_NOT_AUTHORIZED = 0x87
    RC_SERVER_SHUTTING_DOWN = 0x8B
    RC_BAD_AUTH_METHOD = 0x8C
    RC_KEEP_ALIVE_TIMEOUT = 0x8D
    RC_SESSION_TAKEN_OVER = 0x8E
    RC_TOPIC_FILTER_INVALID = 0x8F
    RC_PACKET_ID_NOT_FOUND = 0x92
    RC_PACKET_TOO_LARGE = 0x95
    RC_QUOTA_EXCEEDED = 0x97


cdef struct Props5:
    # A property block, validated. `present` has bit (1 << identifier) for each
    # property found; a field is meaningful only when its bit is set (the
    # decoders clear `present` alone, not the fields). Subscription
    # Identifiers (several in a PUBLISH) and User Properties: the count and,
    # for the first, its value here; all of them in order with prop_next().
    uint64_t present
    Slice raw                 # the properties, after the Property Length
    uint8_t payload_format
    uint8_t request_problem
    uint8_t request_response
    uint8_t maximum_qos
    uint8_t retain_available
    uint8_t wildcard_available
    uint8_t subscription_id_available
    uint8_t shared_available
    uint16_t server_keep_alive
    uint16_t receive_maximum
    uint16_t topic_alias_maximum
    uint16_t topic_alias
    uint32_t message_expiry
    uint32_t session_expiry
    uint32_t will_delay
    uint32_t maximum_packet_size
    uint32_t subscription_id
    uint32_t subscription_id_count
    uint32_t user_property_count
    Slice content_type
    Slice response_topic
    Slice correlation_data
    Slice assigned_client_id
    Slice auth_method
    Slice auth_data
    Slice response_info
    Slice server_reference
    Slice reason_string

cdef struct Connect5Packet:
    uint8_t clean_start
    uint8_t will_flag
    uint8_t will_qos
    uint8_t will_retain
    uint8_t has_username
    uint8_t has_password
    uint16_t keepalive
    Slice client_id
    Slice will_topic
    Slice will_message
    Slice username
    Slice password
    Props5 props
    Props5 will_props         # meaningful when will_flag

cdef struct Connack5Packet:
    uint8_t session_present
    uint8_t reason_code
    Props5 props

cdef struct Publish5Packet:
    uint8_t qos
    uint8_t retain
    uint8_t dup
    uint16_t packet_id        # 0 for QoS 0
    Slice topic               # may be empty: then props has a Topic Alias
    Slice payload
    Props5 props

cdef struct Ack5Packet:
    # PUBACK, PUBREC, PUBREL, PUBCOMP; DISCONNECT and AUTH (packet_id 0).
    uint16_t packet_id
    uint8_t reason_code
    Props5 props

cdef struct Entry5Iter:
    # Walks the entries of a SUBSCRIBE, UNSUBSCRIBE, SUBACK or UNSUBACK body.
    const uint8_t* p
    const uint8_t* end
    uint16_t packet_id
    uint8_t ptype

cdef struct PropIter:
    const uint8_t* p
    const uint8_t* end


# --- decoding ----------------------------------------------------------------

# The fixed header, as codec.pxd's decode_header, with MQTT 5.0's rules: type
# 15 is AUTH (flags 0), the Remaining Length is a minimal Variable Byte
# Integer (R5_VARINT), PINGREQ/PINGRESP are empty, every other size is checked
# by the body's decoder. Errors: ERR_INCOMPLETE, ERR_MALFORMED (*reason),
# ERR_TOO_LARGE (*first and *remaining set).
cdef int decode_header5(const uint8_t* buf, size_t n, uint32_t max_remaining,
                        uint8_t* first, uint32_t* remaining, int* reason) noexcept nogil

# The protocol level of a CONNECT body named "MQTT" or "MQIsdp" (5, 4, 3 or
# anything else the client wrote): which codec decodes the connection.
# ERR_MALFORMED when the name is neither or the body too short to say.
cdef int connect_protocol_level(const uint8_t* body, uint32_t n) noexcept nogil

# Every body decoder returns 0, ERR_MALFORMED or ERR_PROTOCOL (*reason set).
# CONNECT: also RC_UNSUPPORTED_VERSION (0x84) for a level other than 5.
cdef int decode_connect5(const uint8_t* body, uint32_t n, Connect5Packet* out, int* reason) noexcept nogil
cdef int decode_connack5(const uint8_t* body, uint32_t n, Connack5Packet* out, int* reason) noexcept nogil
cdef int decode_publish5(uint8_t first, const uint8_t* body, uint32_t n, Publish5Packet* out,
                         int* reason) noexcept nogil
# PUBACK, PUBREC, PUBREL, PUBCOMP (ptype): the reason code and properties may
# be left out (sections 3.4.2.1, 3.4.2.2.1).
cdef int decode_ack5(uint8_t ptype, const uint8_t* body, uint32_t n, Ack5Packet* out, int* reason) noexcept nogil
# DISCONNECT or AUTH (ptype); an empty body is reason code 0 without properties.
cdef int decode_disconnect5(uint8_t ptype, const uint8_t* body, uint32_t n, Ack5Packet* out,
                            int* reason) noexcept nogil
# SUBSCRIBE, UNSUBSCRIBE, SUBACK, UNSUBACK (ptype): the packet id and
# properties, with at least one entry following; then per entry
# subscribe5_next (filter, options byte), unsubscribe5_next (filter) or
# codes5_next (a reason code): 1 per entry, 0 at the end, or an error.
cdef int entries5_begin(uint8_t ptype, const uint8_t* body, uint32_t n, Entry5Iter* it, Props5* props,
                        int* reason) noexcept nogil
cdef int subscribe5_next(Entry5Iter* it, Slice* topic_filter, uint8_t* options, int* reason) noexcept nogil
cdef int unsubscribe5_next(Entry5Iter* it, Slice* topic_filter, int* reason) noexcept nogil
cdef int codes5_next(Entry5Iter* it, uint8_t* code, int* reason) noexcept nogil

# Walks a validated property block (Props5.raw) in order: 1 with the
# identifier and its value (*number for the integer types, *a for a string or
# binary, *a and *b for a User Property), 0 at the end.
cdef void prop_iter(PropIter* it, const Props5* props) noexcept nogil
cdef int prop_next(PropIter* it, uint8_t* ident, uint32_t* number, Slice* a, Slice* b) noexcept nogil

# 1 for a filter "$share/{ShareName}/{filter}" (checked by the decoders).
cdef bint is_shared_filter(const uint8_t* p, uint32_t n) noexcept nogil


# --- encoding ----------------------------------------------------------------

cdef uint32_t varint_size(uint32_t value) noexcept nogil
cdef uint32_t write_varint(uint8_t* out, uint32_t value) noexcept nogil

# Property writers: each writes identifier and value, returns the bytes written.
cdef uint32_t put_prop_u8(uint8_t* out, uint8_t ident, uint8_t value) noexcept nogil
cdef uint32_t put_prop_u16(uint8_t* out, uint8_t ident, uint16_t value) noexcept nogil
cdef uint32_t put_prop_u32(uint8_t* out, uint8_t ident, uint32_t value) noexcept nogil
cdef uint32_t put_prop_varint(uint8_t* out, uint8_t ident, uint32_t value) noexcept nogil
cdef uint32_t put_prop_bytes(uint8_t* out, uint8_t ident, const uint8_t* p, uint32_t n) noexcept nogil
cdef uint32_t put_prop_pair(uint8_t* out, const uint8_t* k, uint32_t kn, const uint8_t* v,
                            uint32_t vn) noexcept nogil

# `props`/`props_len`: a property block without its length (may be empty).
cdef uint32_t publish5_size(uint32_t topic_len, uint32_t props_len, uint32_t payload_len, uint8_t qos) noexcept nogil
cdef uint32_t encode_publish5(uint8_t* out, const uint8_t* topic, uint32_t topic_len,
                              const uint8_t* props, uint32_t props_len,
                              const uint8_t* payload, uint32_t payload_len,
                              uint8_t qos, uint8_t retain, uint8_t dup, uint16_t packet_id) noexcept nogil
cdef uint32_t connack5_size(uint32_t props_len) noexcept nogil
cdef uint32_t encode_connack5(uint8_t* out, uint8_t session_present, uint8_t reason_code,
                              const uint8_t* props, uint32_t props_len) noexcept nogil
# PUBACK, PUBREC, PUBREL, PUBCOMP: the short forms when reason 0 / no properties.
cdef uint32_t ack5_size(uint8_t reason_code, uint32_t props_len) noexcept nogil
cdef uint32_t encode_ack5(uint8_t* out, uint8_t ptype, uint16_t packet_id, uint8_t reason_code,
                          const uint8_t* props, uint32_t props_len) noexcept nogil
# SUBACK, UNSUBACK.
cdef uint32_t codes5_size(uint32_t count, uint32_t props_len) noexcept nogil
cdef uint32_t encode_codes5(uint8_t* out, uint8_t ptype, uint16_t packet_id, const uint8_t* props,
                            uint32_t props_len, const uint8_t* codes, uint32_t count) noexcept nogil
# DISCONNECT, AUTH: the empty form when reason 0 and no properties.
cdef uint32_t disconnect5_size(uint8_t reason_code, uint32_t props_len) noexcept nogil
cdef uint32_t encode_disconnect5(uint8_t* out, uint8_t ptype, uint8_t reason_code,
                                 const uint8_t* props, uint32_t props_len) noexcept nogil
