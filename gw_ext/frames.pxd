# The frames between gw's processes, in one place: what the workers send each
# other over their SOCK_SEQPACKET links (gw_ext/worker/channel.pyx sends,
# batches, cuts into pieces, reads and dispatches them), and what the pipeline
# process sends into every worker (FR_PUBLISH only: its alerts, built by
# gw/master.py's alert_publisher with gw_ext.frames.publish_frame).
#
# A frame is an 8-byte header, then its body:
#
#   [type u8][flags u8][topic length u16 LE][body length u32 LE] body
#
# The topic length says how much of the body is a topic (0 when it holds
# none). A datagram holds whole frames, one after the other; a frame too
# large for one datagram travels as consecutive FR_PIECE frames, each alone in
# its datagram, whose bodies put back together are the whole frame (header
# included). Every length is checked against its datagram before it is used.
#
# The numbers are exported to Python by frames.pyx (gw_ext.frames.FR_PUBLISH,
# ...), for the master, the fuzzing harness and the tests: no other file
# writes a frame type as a number.

from libc.stdint cimport uint8_t, uint32_t
from libc.string cimport memcpy

cpdef enum:
    FRAME_HEADER = 8          # bytes before a frame's body

    # Messages and interest (gw_ext/worker/channel.pyx, router.pyx, retained.pyx).
    FR_PUBLISH = 1            # flags: qos | retain << 2 | PUB_EXT; topic length; body: origin_ns u64 (CLOCK_MONOTONIC
                              # of the loop turn that read it, 0: unknown), topic, payload; with PUB_EXT (an MQTT 5.0
                              # message's properties) then its extras (gw_ext/loop.pxd, Msg: expiry u64, property
                              # block) and their length u32 last, at least EXT_HEADER
    PUB_EXT = 8               # FR_PUBLISH, FR_RETAIN flags: the body ends with the message's extras and their length
    FR_SUB_ADD = 2            # body: a topic filter gaining its first subscriber on the sender
    FR_SUB_DEL = 3            # body: a topic filter losing its last subscriber on the sender
    FR_HELLO = 4              # body: empty. "I (re)started: forget what I said before; tell me yours."
    FR_RETAIN = 5             # flags: qos | PUB_EXT; topic length; body: topic, payload (empty: clear the topic);
                              # with PUB_EXT then the extras and their length u32, as FR_PUBLISH

    # The client-id registry (gw_ext/worker/registry.pyx); FR_CLAIM..FR_REGISTER are
    # contiguous: the channel hands that range to the registry. Integers little-endian.
    FR_CLAIM = 6              # body: token u32, clean u8, user (has u8, len u16, name), client id
    FR_GRANT = 7              # body: token u32, previous owner i8 (-1: none, -3: refused, another user's id), client id
    FR_EVICT = 8              # body: new owner u8, token u32, new clean u8, client id
    FR_SESSION = 9            # body: token u32, present u8, id length u16, client id, session state
                              # (gw_ext/worker/session_state.pyx)
    FR_RELEASE = 10           # body: owner u8, client id
    FR_REGISTER = 11          # body: owner u8, user (has u8, len u16, name), client id

    # Backpressure (gw_ext/worker/backpressure.pyx).
    FR_PAUSE = 12             # body: empty. "My subscribers are behind: hold your publishers."
    FR_RESUME = 13            # body: empty

    # SUBACK after every peer applied the interest (gw_ext/worker/handle_subscribe.pyx).
    FR_SUB_SYNC = 14          # body: token u32. "Answer once you have applied what I sent before."
    FR_SUB_SYNCED = 15        # body: token u32

    # A frame larger than a datagram (gw_ext/worker/channel.pyx).
    FR_PIECE = 16             # flags: PIECE_FIRST | PIECE_LAST; body: the next slice of the whole frame
    PIECE_FIRST = 1
    PIECE_LAST = 2

    # A claim by another user, asked of the id's owner first (gw_ext/worker/registry.pyx).
    FR_CHECK = 17             # body: check u32, claimant u8, token u32, client id. "What do you hold of this
                              # id? Answer once no connection of it is open, or within half connect_settle_timeout."
    FR_CHECKED = 18           # body: check u32, held u8 (0: nothing, 1: a session or connection), client id

    # Shared subscriptions (gw_ext/worker/shared.pyx). Integers little-endian.
    FR_SHARED_COUNT = 19      # body: slot u32, gen u32, online u32, total u32, key ($share/{name}/{filter}).
                              # "I hold total members of this group, online connected; it is my slot/gen."
    FR_SHARED_PUBLISH = 20    # flags: qos | retain << 2 (as published: a member with Retain As Published
                              # gets it) | PUB_EXT; topic length; body: slot u32, gen u32 (the group's on
                              # the receiver), hops u8, origin_ns u64, topic, payload (then the extras as
                              # FR_PUBLISH). "Give this to one of your members."


cdef inline void frame_header_put(uint8_t* hdr, uint8_t ftype, uint8_t flags, uint32_t topic_len,
                                  uint32_t body_len) noexcept nogil:
    """Writes a frame's header at hdr (FRAME_HEADER bytes)."""
    hdr[0] = ftype
    hdr[1] = flags
    hdr[2] = <uint8_t>(topic_len & 0xFF)
    hdr[3] = <uint8_t>(topic_len >> 8)
    memcpy(hdr + 4, &body_len, 4)


cdef inline uint32_t frame_body_len(const uint8_t* hdr) noexcept nogil:
    """The body length in the header at hdr."""
    cdef uint32_t body_len
    memcpy(&body_len, hdr + 4, 4)
    return body_len


cdef inline uint32_t frame_topic_len(const uint8_t* hdr) noexcept nogil:
    """The topic length in the header at hdr."""
    return hdr[2] | (<uint32_t>hdr[3] << 8)
