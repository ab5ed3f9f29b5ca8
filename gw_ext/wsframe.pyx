# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""WebSocket frames (RFC 6455): the decoder of client frames the worker runs
in place on what it read (wsframe.pxd says how), the header of the frames it
sends, the handshake's accept key, close codes and UTF-8.

Python API (tests, the fuzz target, the load generator): `Decoder` feeds
bytes and returns what they meant; `encode_frame` builds a frame, masked
like a client's or not like a server's; `accept_key`."""

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize

cdef extern from "openssl/sha.h" nogil:
    unsigned char* SHA1(const unsigned char* d, size_t n, unsigned char* md)

cdef extern from "openssl/evp.h" nogil:
    int EVP_EncodeBlock(unsigned char* t, const unsigned char* f, int n)

cdef const char* WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


cdef inline void unmask_move(uint8_t* dst, const uint8_t* src, Py_ssize_t k, const uint8_t* mask,
                             uint8_t* phase) noexcept nogil:
    """dst[0:k] = src[0:k] unmasked, the mask starting at phase[0]; dst <= src
    (moving down, forward: each byte is read before it can be overwritten)."""
    cdef Py_ssize_t i = 0
    cdef uint8_t p = phase[0]
    cdef uint32_t m32
    cdef uint64_t m64, v
    while i < k and p != 0:
        dst[i] = src[i] ^ mask[p]
        p = (p + 1) & 3
        i += 1
    if i + 8 <= k:
        memcpy(&m32, mask, 4)
        m64 = (<uint64_t>m32) | ((<uint64_t>m32) << 32)
        while i + 8 <= k:
            memcpy(&v, src + i, 8)
            v ^= m64
            memcpy(dst + i, &v, 8)
            i += 8
    while i < k:
        dst[i] = src[i] ^ mask[p]
        p = (p + 1) & 3
        i += 1
    phase[0] = p


cdef inline void step_error(WsStep* step, Py_ssize_t out, Py_ssize_t at, uint16_t code) noexcept nogil:
    step.event = WSE_ERROR
    step.code = code
    step.out = out
    step.pos = at
    step.frame_at = at


cdef void ws_decode(WsDecoder* d, uint8_t* buf, Py_ssize_t out, Py_ssize_t pos, Py_ssize_t n,
                    uint64_t max_message, WsStep* step) noexcept nogil:
    """Decodes client frames from buf[pos:n]; the data frames' payloads are
    written (unmasked) from buf[out] on, out <= pos. Stops at the end of the
    input, at an incomplete header or control frame (left at step.pos), at a
    control frame (consumed; its payload unmasked in place at step.ctrl, to be
    used before the next call, whose output may overwrite it) or at a
    protocol error (step.code; the frame not consumed and the state not
    changed, so the same bytes give the same error again).

    Every length comes from the peer: a 64-bit length with its top bit set is
    an error; a frame, or the message it belongs to, over max_message is
    WS_CLOSE_TOO_BIG before any of its payload is taken; a control frame must
    be complete within 14 + 125 bytes."""
    cdef Py_ssize_t avail, hl, k
    cdef uint8_t b0, b1, op, phase
    cdef uint64_t length, msg
    cdef uint32_t code
    cdef bint fin
    step.ctrl = 0
    step.ctrl_len = 0
    step.code = 0
    while True:
        if d.flags & WSD_IN_FRAME:
            if d.remaining:
                k = n - pos
                if k == 0:
                    break
                if k > <Py_ssize_t>d.remaining:
                    k = d.remaining
                unmask_move(buf + out, buf + pos, k, d.mask, &d.mask_pos)
                out += k
                pos += k
                d.remaining -= <uint32_t>k
                if d.remaining:
                    break           # the input is used up
            d.flags &= ~WSD_IN_FRAME
            if d.flags & WSD_LAST and d.flags & WSD_REPORT_ENDS:
                d.flags &= ~WSD_LAST
                step.event = WSE_MESSAGE_END
                step.out = out
                step.pos = pos
                return
            continue
        avail = n - pos
        if avail < 2:
            break
        b0 = buf[pos]
        b1 = buf[pos + 1]
        op = b0 & 0x0F
        fin = (b0 & 0x80) != 0
        if b0 & 0x70:
            step_error(step, out, pos, WS_CLOSE_PROTOCOL)       # RSV bits: no extension was agreed
            return
        if not (b1 & 0x80):
            step_error(step, out, pos, WS_CLOSE_PROTOCOL)       # a client's frames are masked (5.1)
            return
        length = b1 & 0x7F
        hl = 6
        if length == 126:
            hl = 8
            if avail < hl:
                break
            length = (<uint64_t>buf[pos + 2] << 8) | buf[pos + 3]
        elif length == 127:
            hl = 14
            if avail < hl:
                break
            if buf[pos + 2] & 0x80:
                step_error(step, out, pos, WS_CLOSE_PROTOCOL)   # the most significant bit must be 0 (5.2)
                return
            length = 0
            for k in range(8):
                length = (length << 8) | buf[pos + 2 + k]
        if avail < hl:
            break
        if op >= 8:
            if op != WS_OP_CLOSE and op != WS_OP_PING and op != WS_OP_PONG:
                step_error(step, out, pos, WS_CLOSE_PROTOCOL)   # reserved control opcode
                return
            if not fin or length > WS_MAX_CONTROL:
                step_error(step, out, pos, WS_CLOSE_PROTOCOL)   # control frames: whole, <= 125 bytes (5.5)
                return
            if <uint64_t>avail < <uint64_t>hl + length:
                break
            phase = 0
            unmask_move(buf + pos + hl, buf + pos + hl, <Py_ssize_t>length, buf + pos + hl - 4, &phase)
            if op == WS_OP_CLOSE:
                if length == 1:
                    step_error(step, out, pos, WS_CLOSE_PROTOCOL)
                    return
                if length >= 2:
                    code = (<uint32_t>buf[pos + hl] << 8) | buf[pos + hl + 1]
                    if not ws_close_code_valid(code):
                        step_error(step, out, pos, WS_CLOSE_PROTOCOL)
                        return
                    if not ws_utf8_valid(buf + pos + hl + 2, <Py_ssize_t>length - 2):
                        step_error(step, out, pos, WS_CLOSE_INVALID_DATA)
                        return
                    step.code = <uint16_t>code
                step.event = WSE_CLOSE
            else:
                step.event = WSE_PING if op == WS_OP_PING else WSE_PONG
            step.frame_at = pos
            step.ctrl = pos + hl
            step.ctrl_len = <uint32_t>length
            step.out = out
            step.pos = pos + hl + <Py_ssize_t>length
            return
        # A data frame.
        if op != WS_OP_CONT and op != WS_OP_TEXT and op != WS_OP_BINARY:
            step_error(step, out, pos, WS_CLOSE_PROTOCOL)       # reserved data opcode
            return
        if op == WS_OP_CONT:
            if not (d.flags & WSD_IN_MESSAGE):
                step_error(step, out, pos, WS_CLOSE_PROTOCOL)   # nothing to continue
                return
        elif d.flags & WSD_IN_MESSAGE:
            step_error(step, out, pos, WS_CLOSE_PROTOCOL)       # a new message inside a fragmented one
            return
        if op == WS_OP_TEXT:
            step_error(step, out, pos, WS_CLOSE_UNSUPPORTED)    # MQTT is carried in binary frames only
            return
        msg = length if op == WS_OP_BINARY else <uint64_t>d.message_len + length
        if length > max_message or msg > max_message:
            step_error(step, out, pos, WS_CLOSE_TOO_BIG)
            return
        d.message_len = <uint32_t>msg
        if fin:
            d.flags = (d.flags & ~WSD_IN_MESSAGE) | WSD_LAST
        else:
            d.flags = (d.flags | WSD_IN_MESSAGE) & ~WSD_LAST
        memcpy(d.mask, buf + pos + hl - 4, 4)
        d.mask_pos = 0
        d.remaining = <uint32_t>length
        d.flags |= WSD_IN_FRAME
        pos += hl
    step.event = WSE_MORE
    step.out = out
    step.pos = pos


cdef uint32_t ws_header_size(uint64_t length) noexcept nogil:
    """A server frame's header (unmasked, the shortest length form: 5.2)."""
    if length < 126:
        return 2
    if length < 65536:
        return 4
    return 10


cdef uint32_t ws_write_header(uint8_t* out, uint8_t first, uint64_t length) noexcept nogil:
    """Writes a server frame's header (first byte: FIN, RSV, opcode); returns its size."""
    cdef int k
    out[0] = first
    if length < 126:
        out[1] = <uint8_t>length
        return 2
    if length < 65536:
        out[1] = 126
        out[2] = <uint8_t>(length >> 8)
        out[3] = <uint8_t>length
        return 4
    out[1] = 127
    for k in range(8):
        out[2 + k] = <uint8_t>(length >> (56 - 8 * k))
    return 10


cdef bint ws_close_code_valid(uint32_t code) noexcept nogil:
    """A code a peer may send in a Close frame (7.4.1, 7.4.2 and IANA's registry):
    1000-1003, 1007-1014, 3000-4999."""
    if 1000 <= code <= 1003:
        return True
    if 1007 <= code <= 1014:
        return True
    return 3000 <= code <= 4999


cdef bint ws_utf8_valid(const uint8_t* p, Py_ssize_t n) noexcept nogil:
    """Well-formed UTF-8 (no overlong forms, no surrogates, at most U+10FFFF)."""
    cdef Py_ssize_t i = 0
    cdef uint8_t c, c1
    cdef int need
    while i < n:
        c = p[i]
        if c < 0x80:
            i += 1
            continue
        if 0xC2 <= c <= 0xDF:
            need = 1
        elif 0xE0 <= c <= 0xEF:
            need = 2
        elif 0xF0 <= c <= 0xF4:
            need = 3
        else:
            return False
        if n - i - 1 < need:
            return False
        c1 = p[i + 1]
        if (c1 & 0xC0) != 0x80:
            return False
        if c == 0xE0 and c1 < 0xA0:
            return False        # overlong
        if c == 0xED and c1 > 0x9F:
            return False        # surrogates
        if c == 0xF0 and c1 < 0x90:
            return False        # overlong
        if c == 0xF4 and c1 > 0x8F:
            return False        # over U+10FFFF
        if need >= 2 and (p[i + 2] & 0xC0) != 0x80:
            return False
        if need == 3 and (p[i + 3] & 0xC0) != 0x80:
            return False
        i += need + 1
    return True


cdef void ws_accept_key(const uint8_t* key, Py_ssize_t n, char* out28) noexcept nogil:
    """Sec-WebSocket-Accept for a Sec-WebSocket-Key (4.2.2): base64(SHA-1(key +
    GUID)), 28 characters (and a NUL) at out28. n is at most 64 (the caller checks)."""
    cdef uint8_t[100] joined
    cdef uint8_t[20] digest
    cdef uint8_t[32] text
    memcpy(joined, key, n)
    memcpy(joined + n, WS_GUID, 36)
    SHA1(joined, n + 36, digest)
    EVP_EncodeBlock(text, digest, 20)
    memcpy(out28, text, 29)


# --- the Python API --------------------------------------------------------------

def accept_key(bytes key):
    """Sec-WebSocket-Accept for a Sec-WebSocket-Key."""
    cdef char[32] out
    if len(key) > 64:
        raise ValueError("key too long")
    ws_accept_key(<const uint8_t*>PyBytes_AS_STRING(key), len(key), out)
    return PyBytes_FromStringAndSize(out, 28)


def encode_frame(int opcode, bytes payload=b"", bint fin=True, object mask=None, int rsv=0):
    """A frame: masked with the 4-byte `mask` (a client's), or unmasked (None: a server's)."""
    cdef uint8_t[16] head
    cdef uint32_t hl
    cdef Py_ssize_t i, n = len(payload)
    if not 0 <= opcode <= 15 or not 0 <= rsv <= 7:
        raise ValueError("bad opcode or rsv")
    hl = ws_write_header(head, <uint8_t>((0x80 if fin else 0) | (rsv << 4) | opcode), n)
    if mask is None:
        return PyBytes_FromStringAndSize(<char*>head, hl) + payload
    mask = bytes(mask)
    if len(mask) != 4:
        raise ValueError("the mask has 4 bytes")
    head[1] |= 0x80
    body = bytearray(payload)
    for i in range(n):
        body[i] ^= mask[i & 3]
    return PyBytes_FromStringAndSize(<char*>head, hl) + mask + bytes(body)


def close_code_valid(int code):
    return ws_close_code_valid(code) if code >= 0 else False


def utf8_valid(bytes data):
    return ws_utf8_valid(<const uint8_t*>PyBytes_AS_STRING(data), len(data))


EVENT_NAMES = {WSE_PING: "ping", WSE_PONG: "pong", WSE_CLOSE: "close", WSE_ERROR: "error",
               WSE_MESSAGE_END: "end"}


cdef class Decoder:
    """Feeds client bytes, in any pieces, through ws_decode as the worker does
    (the undecoded tail kept, decoded data moved down in place). feed() returns
    the events in order: ("data", bytes) for payload bytes, ("end",) at each
    message's end (report_ends), ("ping", payload), ("pong", payload),
    ("close", code, reason), ("error", code); after an error or a Close it
    takes no more."""
    cdef WsDecoder d
    cdef bytearray pending
    cdef uint64_t max_message
    cdef public bint done

    def __init__(self, uint64_t max_message=1 << 20, bint report_ends=True):
        self.d.remaining = 0
        self.d.message_len = 0
        self.d.mask_pos = 0
        self.d.flags = WSD_REPORT_ENDS if report_ends else 0
        self.pending = bytearray()
        self.max_message = max_message
        self.done = False

    def feed(self, data):
        cdef WsStep step
        cdef Py_ssize_t pos = 0, out = 0, n
        cdef uint8_t* buf
        events = []
        if self.done:
            return events
        self.pending += data
        n = len(self.pending)
        if n == 0:
            return events
        buf = <uint8_t*><char*>self.pending
        while True:
            ws_decode(&self.d, buf, out, pos, n, self.max_message, &step)
            if step.out > out:
                events.append(("data", bytes(self.pending[out:step.out])))
            out = step.out
            pos = step.pos
            if step.event == WSE_MORE:
                break
            if step.event == WSE_MESSAGE_END:
                events.append(("end",))
            elif step.event == WSE_PING or step.event == WSE_PONG:
                events.append((EVENT_NAMES[step.event], bytes(self.pending[step.ctrl:step.ctrl + step.ctrl_len])))
            elif step.event == WSE_CLOSE:
                events.append(("close", step.code,
                               bytes(self.pending[step.ctrl + 2:step.ctrl + step.ctrl_len])
                               if step.ctrl_len >= 2 else b""))
                self.done = True
                break
            else:
                events.append(("error", step.code))
                self.done = True
                break
            # decoded data is handed out: what follows is decoded from `out` again
        del self.pending[:pos]
        return events
