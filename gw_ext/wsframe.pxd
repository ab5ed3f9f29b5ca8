# WebSocket frames (RFC 6455 section 5), as the server sees them: client
# frames decoded in place, server frames' headers encoded. No I/O and no
# Python objects on the C path: the worker (gw_ext/worker/websocket.pyx)
# feeds it the bytes it read; tests and fuzzers use the Python API of
# wsframe.pyx (Decoder, encode_frame).
#
# Decoding is streaming and in place: the payloads of data frames (binary
# and continuation) are unmasked and moved down over the frame headers, so
# the data of any number of frames (and of a frame cut anywhere) ends up
# contiguous in the caller's buffer, where the MQTT framing reads it. What
# is left undecoded (an incomplete header, an incomplete control frame) stays
# where it was, for the next call with more bytes after it.

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t

cdef enum:
    WS_OP_CONT = 0
    WS_OP_TEXT = 1
    WS_OP_BINARY = 2
    WS_OP_CLOSE = 8
    WS_OP_PING = 9
    WS_OP_PONG = 10
    WS_MAX_CONTROL = 125        # a control frame's payload, at most (RFC 6455 5.5)
    WS_MAX_HEADER = 14          # a client frame's header: 2 + 8 (length) + 4 (mask)

# Close codes the server sends (RFC 6455 7.4.1).
cdef enum:
    WS_CLOSE_NORMAL = 1000
    WS_CLOSE_GOING_AWAY = 1001
    WS_CLOSE_PROTOCOL = 1002
    WS_CLOSE_UNSUPPORTED = 1003     # a text frame: MQTT goes in binary frames only (MQTT-6.0.0-1)
    WS_CLOSE_INVALID_DATA = 1007    # a Close frame's reason not UTF-8
    WS_CLOSE_POLICY = 1008
    WS_CLOSE_TOO_BIG = 1009         # a frame or message over the bound (max_packet_size)
    WS_CLOSE_INTERNAL = 1011

# What ws_decode stopped for.
cdef enum:
    WSE_MORE = 0        # every byte decoded, or the rest is an incomplete header or control frame (at `pos`)
    WSE_PING = 1        # a Ping: its payload (unmasked in place) at ctrl, ctrl_len bytes
    WSE_PONG = 2        # a Pong: the same
    WSE_CLOSE = 3       # a valid Close: `code` (0: none given), its reason at ctrl + 2
    WSE_ERROR = 4       # a protocol error: close with `code`; the offending frame at frame_at, not consumed
    WSE_MESSAGE_END = 5 # (only with WSD_REPORT_ENDS) a data message just ended at `out`

# WsDecoder.flags
cdef enum:
    WSD_IN_FRAME = 1        # a data frame's payload is being streamed (remaining bytes to come)
    WSD_IN_MESSAGE = 2      # a fragmented message is open: continuation frames expected
    WSD_LAST = 4            # the frame being streamed is the last of its message (FIN)
    WSD_REPORT_ENDS = 8     # stop with WSE_MESSAGE_END at each message's end (tests: message boundaries)

# A connection's decoding state between reads: 16 bytes.
cdef struct WsDecoder:
    uint32_t remaining      # payload bytes of the current data frame still to come
    uint32_t message_len    # bytes of the current message so far (bounded by max_message)
    uint8_t[4] mask         # the current data frame's masking key
    uint8_t mask_pos        # which of its bytes unmasks the next payload byte
    uint8_t flags           # WSD_*

cdef struct WsStep:
    Py_ssize_t out          # decoded data now ends here
    Py_ssize_t pos          # input consumed up to here
    Py_ssize_t frame_at     # control frame or error: where its header begins
    Py_ssize_t ctrl         # WSE_PING / PONG / CLOSE: offset of its (unmasked) payload
    uint32_t ctrl_len
    uint16_t code           # WSE_CLOSE: the peer's code (0: none); WSE_ERROR: the code to close with
    uint8_t event           # WSE_*

cdef void ws_decode(WsDecoder* d, uint8_t* buf, Py_ssize_t out, Py_ssize_t pos, Py_ssize_t n,
                    uint64_t max_message, WsStep* step) noexcept nogil
cdef uint32_t ws_header_size(uint64_t length) noexcept nogil
cdef uint32_t ws_write_header(uint8_t* out, uint8_t first, uint64_t length) noexcept nogil
cdef bint ws_close_code_valid(uint32_t code) noexcept nogil
cdef bint ws_utf8_valid(const uint8_t* p, Py_ssize_t n) noexcept nogil
cdef void ws_accept_key(const uint8_t* key, Py_ssize_t n, char* out28) noexcept nogil
