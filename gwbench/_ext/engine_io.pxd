# What both load generator engines (gwbench/_ext/ingest_engine.pyx,
# gwbench/_ext/pubsub_engine.pyx) do the same way on their hot loop: the
# monotonic clock, an output buffer that grows, the events epoll watches on a
# connection, a non-blocking send and receive. Inline: no call per message.

from libc.errno cimport errno, EAGAIN, EINTR
from libc.stdint cimport int64_t, uint8_t, uint32_t
from libc.stdlib cimport realloc
from libc.string cimport memmove
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC

from gw_ext.netio cimport EPOLL_CTL_MOD, EPOLLIN, EPOLLOUT, MSG_NOSIGNAL, epoll_ctl, epoll_event
from gw_ext.netio cimport recv as c_recv, send as c_send


cdef inline int64_t mono_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <int64_t>ts.tv_sec * 1000000000 + ts.tv_nsec


cdef inline int out_reserve(uint8_t** buf, size_t* cap, size_t used, size_t extra) noexcept nogil:
    """Room for `extra` bytes after the `used` ones of a buffer of *cap bytes
    (not 0), its capacity doubled until they fit: 0, or -1 when out of memory
    (the buffer kept as it was)."""
    cdef size_t grown
    cdef uint8_t* p
    if used + extra <= cap[0]:
        return 0
    grown = cap[0] * 2
    while grown < used + extra:
        grown *= 2
    p = <uint8_t*>realloc(buf[0], grown)
    if p == NULL:
        return -1
    buf[0] = p
    cap[0] = grown
    return 0


cdef inline void watch_events(int epfd, int fd, uint32_t index, uint32_t* watched,
                              uint32_t events) noexcept nogil:
    """epoll watches `events` on fd (whose event carries its index in the
    engine's table) from now on; *watched is what it watches."""
    cdef epoll_event ev
    if watched[0] == events:
        return
    ev.events = events
    ev.data.u64 = 0
    ev.data.u32 = index
    epoll_ctl(epfd, EPOLL_CTL_MOD, fd, &ev)
    watched[0] = events


cdef inline ssize_t send_some(int fd, const uint8_t* buf, size_t n) noexcept nogil:
    """One non-blocking send of buf[0:n]: the bytes sent (0 when the socket is
    full or the call was interrupted), or -1 with errno when the connection
    broke."""
    cdef ssize_t r = c_send(fd, buf, n, MSG_NOSIGNAL)
    if r < 0:
        return 0 if errno == EAGAIN or errno == EINTR else -1
    return r


cdef inline void out_consumed(uint8_t* buf, size_t* used, size_t sent) noexcept nogil:
    """Drops the `sent` bytes from the front of a buffer of *used bytes."""
    if sent < used[0]:
        memmove(buf, buf + sent, used[0] - sent)
    used[0] -= sent


cdef inline void out_sent(int epfd, int fd, uint32_t index, uint32_t* watched, uint8_t* buf,
                          size_t* used, size_t sent) noexcept nogil:
    """After a send of `sent` bytes (0 too) from a connection's output buffer
    of *used bytes: drops them, and epoll watches EPOLLOUT on the connection
    while bytes remain (stops once the buffer is empty)."""
    if sent:
        out_consumed(buf, used, sent)
    if used[0]:
        watch_events(epfd, fd, index, watched, EPOLLIN | EPOLLOUT)
    elif watched[0] & EPOLLOUT:
        watch_events(epfd, fd, index, watched, EPOLLIN)


# recv_some's answers besides the bytes received.
cdef enum:
    RECV_CLOSED = 0     # the peer closed its side
    RECV_EMPTY = -1     # nothing to read now
    RECV_FAILED = -2    # the connection broke (errno says why)


cdef inline ssize_t recv_some(int fd, uint8_t* buf, size_t n) noexcept nogil:
    """One non-blocking receive into buf[0:n] (an interrupted call is
    retried): the bytes received, or RECV_CLOSED, RECV_EMPTY, RECV_FAILED."""
    cdef ssize_t r
    while True:
        r = c_recv(fd, buf, n, 0)
        if r >= 0:
            return r
        if errno == EINTR:
            continue
        return RECV_EMPTY if errno == EAGAIN else RECV_FAILED
