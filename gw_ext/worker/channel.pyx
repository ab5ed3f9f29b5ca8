# Included by loop.pyx. The links between workers.
#
# The master makes one SOCK_SEQPACKET socketpair per pair of workers before
# forking and keeps every end, so a respawned worker inherits the same links.
# Frames to a peer are appended to its batch during the loop turn and sent at
# the end of it, as datagrams of whole frames (at most CHANNEL_DATAGRAM bytes,
# or one larger frame alone). The frames and their header: gw_ext/frames.pxd.
#
# A datagram larger than the socket's send buffer cannot be sent at all
# (EMSGSIZE), so a link's largest datagram (Peer.dgram) follows from the
# SO_SNDBUF its socket got. A frame larger than that (a big PUBLISH forwarded,
# a session moving with its queue) goes in pieces: consecutive datagrams each
# holding one FR_PIECE frame whose body is the next slice of the whole frame,
# the first flagged PIECE_FIRST, the last PIECE_LAST; nothing else is sent on
# the link in between. The receiver puts them together (bounded by
# CHANNEL_MAX_PENDING, the largest frame a sender can queue) and handles the
# whole frame. Any other datagram in the middle means the sender started a new
# life (its HELLO): the pieces held are dropped and counted, as are pieces
# without their beginning (the receiver started a new life) and every frame
# or datagram that does not add up.
#
# What travels: PUBLISH forwards (only to workers that announced a matching
# filter), subscription interest (a filter gaining its first or losing its
# last local subscriber), retained-message updates, and HELLO, which a worker
# sends when it starts so its peers forget what they knew of its previous
# life and tell it their interests.

cdef enum:
    CHANNEL_DATAGRAM = 65536          # small frames are batched into datagrams of at most this
    CHANNEL_DATAGRAM_MIN = 1024       # Peer.dgram's bounds, whatever SO_SNDBUF says
    CHANNEL_DATAGRAM_MAX = 1 << 20    # (also the receive buffer's size: bounded)
    CHANNEL_MAX_PENDING = 64 << 20
    CHANNEL_READS_PER_TURN = 64


cdef uint32_t channel_datagram_size(int fd) noexcept:
    """The largest datagram to send on a link: Linux refuses a datagram over
    the socket's SO_SNDBUF less 32 bytes (EMSGSIZE), and one that takes the whole
    buffer waits for the peer to read everything before it; half leaves room
    for the next. SO_SNDBUF as the socket got it (the kernel doubles the value
    asked for and caps it at net.core.wmem_max)."""
    cdef int sndbuf = 0
    cdef socklen_t len_ = sizeof(sndbuf)
    cdef int64_t size
    if getsockopt(fd, SOL_SOCKET, SO_SNDBUF, &sndbuf, &len_) != 0 or sndbuf <= 0:
        return CHANNEL_DATAGRAM_MIN
    size = (<int64_t>sndbuf - 32) // 2
    if size < CHANNEL_DATAGRAM_MIN:
        return CHANNEL_DATAGRAM_MIN
    if size > CHANNEL_DATAGRAM_MAX:
        return CHANNEL_DATAGRAM_MAX
    return <uint32_t>size


cdef uint8_t* channel_frame(Worker w, int p, uint8_t ftype, uint8_t flags, uint32_t topic_len,
                            uint32_t body_len):
    """Room for one frame's body in peer p's batch; NULL (counted) when the
    peer has not read CHANNEL_MAX_PENDING bytes already."""
    cdef Peer* peer = &w.peers[p]
    cdef uint32_t need = FRAME_HEADER + body_len
    cdef uint32_t cap
    cdef uint8_t* grown
    cdef uint8_t* hdr
    if peer.fd < 0:
        return NULL
    if peer.outlen + need > CHANNEL_MAX_PENDING:
        w.counters[CHANNEL_DROPS] += 1
        w.log_limited(CR_CHANNEL, "worker %d is not reading its channel: dropping forwards" % p)
        return NULL
    if peer.outlen + need > peer.outcap:
        cap = peer.outcap if peer.outcap else 4096
        while cap < peer.outlen + need:
            cap *= 2
        grown = <uint8_t*>realloc(peer.out, cap)
        if grown == NULL:
            w.counters[CHANNEL_DROPS] += 1
            return NULL
        peer.out = grown
        peer.outcap = cap
    hdr = peer.out + peer.outlen
    frame_header_put(hdr, ftype, flags, topic_len, body_len)
    peer.outlen += need
    w.peers_dirty |= (<uint64_t>1) << p
    return hdr + FRAME_HEADER


cdef void channel_broadcast(Worker w, uint8_t ftype, uint8_t flags, const uint8_t* topic, uint32_t topic_len,
                            const uint8_t* rest, uint32_t rest_len):
    cdef int p
    cdef uint8_t* body
    for p in range(w.npeers):
        if p == w.worker_index:
            continue
        body = channel_frame(w, p, ftype, flags, topic_len, topic_len + rest_len)
        if body != NULL:
            if topic_len:               # FR_PAUSE/FR_RESUME have none (topic NULL: memcpy's UB)
                memcpy(body, topic, topic_len)
            if rest_len:
                memcpy(body + topic_len, rest, rest_len)


cdef void channels_flush(Worker w):
    """Sends every pending batch (end of the loop turn)."""
    cdef int p
    cdef uint64_t dirty = w.peers_dirty
    w.peers_dirty = 0
    p = 0
    while dirty:
        if dirty & 1:
            if not w.peers[p].blocked:
                channel_send(w, p)
        dirty >>= 1
        p += 1


cdef void channel_send(Worker w, int p):
    cdef Peer* peer = &w.peers[p]
    cdef uint32_t pos = 0, end, flen, batch
    cdef ssize_t n
    cdef int r
    batch = CHANNEL_DATAGRAM if peer.dgram > CHANNEL_DATAGRAM else peer.dgram
    while pos < peer.outlen:
        flen = FRAME_HEADER + frame_body_len(peer.out + pos)
        if flen > peer.dgram:
            # Too large for one datagram: in pieces (it may have begun in an earlier turn).
            r = channel_send_pieces(w, p, pos, flen)
            if r < 0:
                break               # the peer is behind: the rest waits for EPOLLOUT
            pos += flen
            continue
        # A datagram: whole frames up to `batch` (one bigger frame goes alone).
        end = pos + flen
        while end < peer.outlen:
            flen = FRAME_HEADER + frame_body_len(peer.out + end)
            if end + flen - pos > batch:
                break
            end += flen
        n = send(peer.fd, peer.out + pos, end - pos, MSG_DONTWAIT | MSG_NOSIGNAL)
        if n < 0:
            if errno == EAGAIN or errno == EINTR:
                # The peer is behind: keep the rest, wait for the socket to drain.
                peer.blocked = 1
                channel_pollout(w, p, True)
                break
            # A dead peer's socket (or a buffer that shrank under us).
            w.counters[CHANNEL_DROPS] += 1
            w.log_limited(CR_CHANNEL, "channel to worker %d: send failed (errno %d); frames dropped" % (p, errno))
            pos = end
            continue
        w.counters[CHANNEL_BYTES_OUT] += n
        pos = end
    if pos >= peer.outlen:
        peer.outlen = 0
        if peer.outcap > 1 << 20:
            free(peer.out)          # a burst grew it; don't keep megabytes per peer
            peer.out = NULL
            peer.outcap = 0
    elif pos > 0:
        memmove(peer.out, peer.out + pos, peer.outlen - pos)
        peer.outlen -= pos


cdef int channel_send_pieces(Worker w, int p, uint32_t pos, uint32_t flen):
    """Sends the frame at peer.out[pos:pos + flen] as FR_PIECE datagrams, from
    where an earlier turn stopped (peer.piece_sent). 0: all sent (or dropped,
    counted); -1: the socket is full, EPOLLOUT armed."""
    cdef Peer* peer = &w.peers[p]
    cdef uint8_t[FRAME_HEADER] hdr
    cdef iovec[2] iov
    cdef msghdr msg
    cdef uint32_t k, room = peer.dgram - FRAME_HEADER
    cdef ssize_t n
    memset(&msg, 0, sizeof(msg))
    msg.msg_iov = iov
    msg.msg_iovlen = 2
    while peer.piece_sent < flen:
        k = flen - peer.piece_sent
        if k > room:
            k = room
        frame_header_put(hdr, FR_PIECE, (PIECE_FIRST if peer.piece_sent == 0 else 0)
                         | (PIECE_LAST if peer.piece_sent + k == flen else 0), 0, k)
        iov[0].iov_base = hdr
        iov[0].iov_len = FRAME_HEADER
        iov[1].iov_base = peer.out + pos + peer.piece_sent
        iov[1].iov_len = k
        n = sendmsg(peer.fd, &msg, MSG_DONTWAIT | MSG_NOSIGNAL)
        if n < 0:
            if errno == EAGAIN or errno == EINTR:
                peer.blocked = 1
                channel_pollout(w, p, True)
                return -1
            # The receiver drops the pieces it holds when the next datagram is no piece.
            w.counters[CHANNEL_DROPS] += 1
            w.log_limited(CR_CHANNEL, "channel to worker %d: send failed (errno %d); a frame of %d bytes "
                          "dropped" % (p, errno, flen))
            peer.piece_sent = 0
            return 0
        w.counters[CHANNEL_BYTES_OUT] += n
        peer.piece_sent += k
    peer.piece_sent = 0
    w.counters[CHANNEL_FRAGMENTED] += 1
    return 0


cdef void channel_pollout(Worker w, int p, bint on):
    cdef epoll_event ev
    ev.events = EPOLLIN | EPOLLOUT if on else EPOLLIN
    ev.data.u64 = 0
    ev.data.fd = w.peers[p].fd
    epoll_ctl(w.epfd, EPOLL_CTL_MOD, w.peers[p].fd, &ev)


cdef void channel_writable(Worker w, int p):
    w.peers[p].blocked = 0
    channel_pollout(w, p, False)
    channel_send(w, p)


cdef void channel_readable(Worker w, int p):
    cdef int k
    cdef ssize_t n
    cdef Peer* peer = &w.peers[p]
    cdef uint8_t* grown
    # A datagram is read whole or not at all: the buffer holds the largest one
    # any link sends (Peer.dgram, at most CHANNEL_DATAGRAM_MAX, or a batch).
    if w.chan_buf == NULL:
        w.chan_buf = <uint8_t*>malloc(w.chan_buf_size)
        if w.chan_buf == NULL:
            return
    for k in range(CHANNEL_READS_PER_TURN):
        # MSG_TRUNC: the datagram's real length, even when it did not fit.
        n = recv(peer.fd, w.chan_buf, w.chan_buf_size, MSG_DONTWAIT | MSG_TRUNC)
        if n <= 0:
            return
        w.counters[CHANNEL_BYTES_IN] += n
        if <size_t>n > w.chan_buf_size:
            channel_malformed(w, p, "a datagram larger than the largest a link sends was cut")
            channel_drop_pieces(w, p)
            continue
        channel_datagram(w, p, w.chan_buf, n)


cdef void channel_malformed(Worker w, int p, str why):
    w.counters[CHANNEL_MALFORMED] += 1
    w.log_limited(CR_CHANNEL, "channel from worker %d: %s; dropped" % (p, why))


cdef void channel_drop_pieces(Worker w, int p):
    cdef Peer* peer = &w.peers[p]
    if peer.asm != NULL:
        free(peer.asm)
        peer.asm = NULL
        peer.asm_len = peer.asm_total = 0


cdef void channel_datagram(Worker w, int p, const uint8_t* buf, ssize_t n):
    """One datagram from peer p: a piece of a larger frame, or whole frames."""
    cdef uint32_t body_len
    if n >= FRAME_HEADER and buf[0] == FR_PIECE:
        body_len = frame_body_len(buf)
        if <uint64_t>body_len + FRAME_HEADER != <uint64_t>n:
            channel_malformed(w, p, "a piece of a frame that does not fill its datagram")
            channel_drop_pieces(w, p)
            return
        channel_piece(w, p, buf[1], buf + FRAME_HEADER, body_len)
        return
    if w.peers[p].asm != NULL:
        # A sender never interleaves: it died half-way through a frame and its new life speaks now.
        channel_malformed(w, p, "a frame cut short (%d of its %d bytes arrived)"
                          % (w.peers[p].asm_len, w.peers[p].asm_total))
        channel_drop_pieces(w, p)
    channel_frames(w, p, buf, n)


cdef void channel_piece(Worker w, int p, uint8_t flags, const uint8_t* piece, uint32_t k):
    cdef Peer* peer = &w.peers[p]
    cdef uint32_t body_len
    cdef uint64_t total
    cdef uint8_t* whole
    if flags & PIECE_FIRST:
        if peer.asm != NULL:
            channel_malformed(w, p, "a frame cut short (%d of its %d bytes arrived)" % (peer.asm_len, peer.asm_total))
            channel_drop_pieces(w, p)
        if k < FRAME_HEADER:
            channel_malformed(w, p, "a frame's first piece without its header")
            return
        body_len = frame_body_len(piece)
        total = <uint64_t>FRAME_HEADER + body_len
        if total > CHANNEL_MAX_PENDING or total < k or piece[0] == FR_PIECE:
            channel_malformed(w, p, "a frame in pieces of %d bytes (at most %d)" % (total, CHANNEL_MAX_PENDING))
            return
        peer.asm = <uint8_t*>malloc(total)
        if peer.asm == NULL:
            w.counters[DROPPED_NOMEM] += 1
            return
        peer.asm_total = <uint32_t>total
        peer.asm_len = 0
    elif peer.asm == NULL:
        channel_malformed(w, p, "a piece of a frame without its beginning")
        return
    if <uint64_t>peer.asm_len + k > peer.asm_total:
        channel_malformed(w, p, "pieces adding up to more than their frame (%d bytes)" % peer.asm_total)
        channel_drop_pieces(w, p)
        return
    memcpy(peer.asm + peer.asm_len, piece, k)
    peer.asm_len += k
    if not (flags & PIECE_LAST):
        return
    if peer.asm_len != peer.asm_total:
        channel_malformed(w, p, "a frame's last piece before its end (%d of %d bytes)"
                          % (peer.asm_len, peer.asm_total))
        channel_drop_pieces(w, p)
        return
    whole = peer.asm
    total = peer.asm_total
    peer.asm = NULL
    peer.asm_len = peer.asm_total = 0
    channel_frames(w, p, whole, <ssize_t>total)
    free(whole)


cdef inline int frame_ext(const uint8_t* body, uint32_t body_len, uint64_t fixed, uint8_t flags,
                          uint32_t* ext_len) noexcept nogil:
    """An FR_PUBLISH or FR_RETAIN body's extras (flag PUB_EXT): their length,
    the body's last 4 bytes, checked to fit between the `fixed` bytes before
    the payload (at most body_len, checked by the caller) and that length, and
    to hold at least the expiry. 0 and *ext_len (0: none); -1 if they do not fit."""
    ext_len[0] = 0
    if not (flags & PUB_EXT):
        return 0
    if <uint64_t>body_len < fixed + 4:
        return -1
    memcpy(ext_len, body + body_len - 4, 4)
    if ext_len[0] < EXT_HEADER or <uint64_t>ext_len[0] > <uint64_t>body_len - fixed - 4:
        return -1
    return 0


cdef void channel_frames(Worker w, int p, const uint8_t* buf, ssize_t n):
    """Whole frames: every length is checked against the datagram (or the
    reassembled frame) before it is used; a frame that does not add up ends
    the datagram, counted."""
    cdef ssize_t pos = 0
    cdef uint32_t body_len, topic_len, ext_len, payload_len
    cdef uint64_t origin_ns
    cdef uint8_t ftype, flags
    cdef const uint8_t* body
    while pos < n:
        if n - pos < FRAME_HEADER:
            channel_malformed(w, p, "a truncated frame header")
            return
        ftype = buf[pos]
        flags = buf[pos + 1]
        topic_len = frame_topic_len(buf + pos)
        body_len = frame_body_len(buf + pos)
        body = buf + pos + FRAME_HEADER
        if <uint64_t>body_len > <uint64_t>(n - pos - FRAME_HEADER) or topic_len > body_len:
            channel_malformed(w, p, "a truncated frame")
            return
        if p >= w.npeers and ftype != FR_PUBLISH:
            # The pipeline process's link (a peer that only publishes alerts).
            channel_malformed(w, p, "a frame of type %d on a link that only carries PUBLISH" % ftype)
        elif ftype == FR_PUBLISH:
            if (<uint64_t>body_len < 8 + <uint64_t>topic_len or (flags & 3) == 3
                    or frame_ext(body, body_len, 8 + topic_len, flags, &ext_len) < 0):
                channel_malformed(w, p, "a PUBLISH frame too short for its topic or properties, or with QoS 3")
            else:
                w.counters[CHANNEL_MSGS_IN] += 1
                memcpy(&origin_ns, body, 8)
                payload_len = body_len - 8 - topic_len - (ext_len + 4 if ext_len else 0)
                route_publish(w, body + 8, topic_len, body + 8 + topic_len, payload_len,
                              flags & 3, (flags >> 2) & 1, False, origin_ns,
                              body + 8 + topic_len + payload_len, ext_len)
                if p >= w.npeers and w.worker_index == 0 and w.share_index.subscriptions:
                    # The pipeline sends its alerts to every worker: the first gives them to the groups.
                    route_shared(w, body + 8, topic_len, body + 8 + topic_len, payload_len, flags & 3,
                                 (flags >> 2) & 1, origin_ns,
                                 body + 8 + topic_len + payload_len, ext_len)
        elif ftype == FR_SUB_ADD:
            topics_add_peer_interest(w.index, body, body_len, <uint8_t>p)
        elif ftype == FR_SUB_DEL:
            topics_remove_peer_interest(w.index, body, body_len, <uint8_t>p)
        elif ftype == FR_RETAIN:
            if (flags & 3) == 3 or frame_ext(body, body_len, topic_len, flags, &ext_len) < 0:
                channel_malformed(w, p, "a retained message with QoS 3, or too short for its properties")
            else:
                payload_len = body_len - topic_len - (ext_len + 4 if ext_len else 0)
                retain_store(w, body, topic_len, body + topic_len, payload_len, flags & 3, False,
                             body + topic_len + payload_len, ext_len)
        elif ftype == FR_HELLO:
            peer_restarted(w, p)
            subsync_peer_restarted(w, p)
        elif ftype == FR_SUB_SYNC:
            subsync_answer(w, p, body, body_len)
        elif ftype == FR_SUB_SYNCED:
            subsync_confirmed(w, p, body, body_len)
        elif ftype == FR_PAUSE or ftype == FR_RESUME:
            peer_congestion(w, p, ftype == FR_PAUSE)
        elif ftype == FR_SHARED_COUNT or ftype == FR_SHARED_PUBLISH:
            shared_frame(w, p, ftype, flags, body, body_len, topic_len)
        elif FR_CLAIM <= ftype <= FR_REGISTER or ftype == FR_CHECK or ftype == FR_CHECKED:
            registry_frame(w, p, ftype, body, body_len)
        else:
            channel_malformed(w, p, "a frame of unknown type %d" % ftype)
        pos += FRAME_HEADER + body_len


cdef void announce_filter(void* ctx, const uint8_t* topic_filter, uint32_t n, uint8_t qos) noexcept nogil:
    """topics_filters callback: tell one peer about one of our filters."""
    cdef PeerTarget* target = <PeerTarget*>ctx
    cdef uint8_t* body
    if is_share(topic_filter, n):
        return          # a member's whole shared filter: its group is told by FR_SHARED_COUNT
    with gil:
        body = channel_frame(<Worker>target.worker, target.peer, FR_SUB_ADD, 0, 0, n)
        if body != NULL:
            memcpy(body, topic_filter, n)


cdef struct PeerTarget:
    void* worker
    int peer


cdef void channels_hello(Worker w):
    """This worker (re)started: HELLO to every peer, then every filter we have."""
    cdef int p
    cdef PeerTarget target
    target.worker = <void*>w
    for p in range(w.npeers):
        if p != w.worker_index and w.peers[p].fd >= 0:
            # HELLO goes first: a peer that reads it forgets what we announced
            # before, including what sessions restored from disk queued just now;
            # so every filter we have is announced again after it.
            w.peers[p].outlen = 0
            channel_frame(w, p, FR_HELLO, 0, 0, 0)
            target.peer = p
            topics_filters(w.index, announce_filter, &target)
            shared_hello(w, p)


cdef void peer_restarted(Worker w, int p):
    """Worker p (re)started: what it announced before died with it; tell it
    what we subscribe to, and the retained messages it may have missed."""
    cdef PeerTarget target
    topics_clear_peer(w.index, <uint8_t>p)
    peer_congestion(w, p, False)
    if w.congested:
        channel_frame(w, p, FR_PAUSE, 0, 0, 0)
    target.worker = <void*>w
    target.peer = p
    topics_filters(w.index, announce_filter, &target)
    retain_sync_to(w, p)
    shared_peer_restarted(w, p)
    registry_peer_restarted(w, p)
