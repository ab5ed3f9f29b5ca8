# cython: language_level=3
"""Frame types and the frame header (frames.pxd), for Python.

The FR_* numbers, PIECE_* flags and FRAME_HEADER are module constants; `frame`
and `publish_frame` build frames with the header code the workers use, so the
master (the pipeline's alerts), the fuzzing harness and the tests never
write a frame by hand.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.stdint cimport uint8_t, uint64_t
from libc.string cimport memcpy

# The largest topic a frame's header can say (u16).
MAX_TOPIC = 0xFFFF


def frame(int ftype, bytes body=b"", int flags=0, Py_ssize_t topic_len=0):
    """One frame: the header, then `body` (whose first topic_len bytes are a topic)."""
    cdef bytes out
    cdef uint8_t* p
    if not 0 <= ftype <= 0xFF or not 0 <= flags <= 0xFF:
        raise ValueError("a frame's type and flags are bytes")
    if not 0 <= topic_len <= MAX_TOPIC or topic_len > len(body) or len(body) > 0xFFFFFFFF:
        raise ValueError("a frame's topic length must fit its body and 16 bits")
    out = PyBytes_FromStringAndSize(NULL, FRAME_HEADER + len(body))
    p = <uint8_t*>PyBytes_AS_STRING(out)
    frame_header_put(p, <uint8_t>ftype, <uint8_t>flags, <uint32_t>topic_len, <uint32_t>len(body))
    memcpy(p + FRAME_HEADER, PyBytes_AS_STRING(body), len(body))
    return out


def publish_frame(bytes topic, bytes payload, int qos=0, bint retain=False, uint64_t origin_ns=0,
                  bytes ext=b""):
    """An FR_PUBLISH frame, as a peer worker forwards one: origin_ns (the
    publish-to-deliver histogram's start, 0: unknown), topic, payload; `ext`:
    an MQTT 5.0 message's extras (expiry u64 wall-clock ms, property block),
    empty for none."""
    if not 0 <= qos <= 2:
        raise ValueError("QoS is 0, 1 or 2")
    if ext:
        return frame(FR_PUBLISH, origin_ns.to_bytes(8, "little") + topic + payload + ext
                     + len(ext).to_bytes(4, "little"), qos | (<int>retain << 2) | PUB_EXT, len(topic))
    return frame(FR_PUBLISH, origin_ns.to_bytes(8, "little") + topic + payload,
                 qos | (<int>retain << 2), len(topic))
