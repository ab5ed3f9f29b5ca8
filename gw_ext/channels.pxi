# Included by loop.pyx. The links between workers.
#
# The master makes one SOCK_SEQPACKET socketpair per pair of workers before
# forking and keeps every end, so a respawned worker inherits the same links.
# Frames to a peer are appended to its batch during the loop turn and sent at
# the end of it, as datagrams of whole frames (at most CHANNEL_DATAGRAM bytes,
# or one larger frame alone). A frame: 8-byte header [type u8][flags u8]
# [topic length u16][body length u32], then the body.
#
# What travels: PUBLISH forwards (only to workers that announced a matching
# filter), subscription interest (a filter gaining its first or losing its
# last local subscriber), retained-message updates, and HELLO, which a worker
# sends when it starts so its peers forget what they knew of its previous
# life and tell it their interests.

cdef enum:
    FR_PUBLISH = 1            # flags: qos | retain << 2; body: origin_ns (8 bytes), topic, payload
    FR_SUB_ADD = 2            # body: a topic filter
    FR_SUB_DEL = 3
    FR_HELLO = 4              # body: empty
    FR_RETAIN = 5             # flags: qos; body: topic, payload (empty: clear)
    FRAME_HEADER = 8
    CHANNEL_DATAGRAM = 65536
    CHANNEL_MAX_PENDING = 64 << 20
    CHANNEL_READS_PER_TURN = 64


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
    hdr[0] = ftype
    hdr[1] = flags
    hdr[2] = <uint8_t>(topic_len & 0xFF)
    hdr[3] = <uint8_t>(topic_len >> 8)
    memcpy(hdr + 4, &body_len, 4)
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
    cdef uint32_t pos = 0, end, flen
    cdef ssize_t n
    cdef uint32_t body_len
    while pos < peer.outlen:
        # A datagram: whole frames up to CHANNEL_DATAGRAM (one bigger frame goes alone).
        end = pos
        while end < peer.outlen:
            memcpy(&body_len, peer.out + end + 4, 4)
            flen = FRAME_HEADER + body_len
            if end > pos and end + flen - pos > CHANNEL_DATAGRAM:
                break
            end += flen
        n = send(peer.fd, peer.out + pos, end - pos, MSG_DONTWAIT | MSG_NOSIGNAL)
        if n < 0:
            if errno == EAGAIN or errno == EINTR:
                # The peer is behind: keep the rest, wait for the socket to drain.
                peer.blocked = 1
                channel_pollout(w, p, True)
                break
            # EMSGSIZE (a frame over the socket's buffer) or a dead peer's socket.
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
    cdef size_t need = w.max_packet_size + CHANNEL_DATAGRAM + FRAME_HEADER
    cdef uint8_t* grown
    # A datagram is read whole or truncated, so the buffer must hold the
    # largest one: a batch, or one frame as large as the largest packet.
    if w.chan_buf_size < need:
        grown = <uint8_t*>realloc(w.chan_buf, need)
        if grown == NULL:
            return
        w.chan_buf = grown
        w.chan_buf_size = need
    for k in range(CHANNEL_READS_PER_TURN):
        n = recv(peer.fd, w.chan_buf, w.chan_buf_size, MSG_DONTWAIT)
        if n <= 0:
            return
        w.counters[CHANNEL_BYTES_IN] += n
        channel_frames(w, p, w.chan_buf, n)


cdef void channel_frames(Worker w, int p, const uint8_t* buf, ssize_t n):
    cdef ssize_t pos = 0
    cdef uint32_t body_len, topic_len
    cdef uint64_t origin_ns
    cdef uint8_t ftype, flags
    cdef const uint8_t* body
    while pos + FRAME_HEADER <= n:
        ftype = buf[pos]
        flags = buf[pos + 1]
        topic_len = buf[pos + 2] | (<uint32_t>buf[pos + 3] << 8)
        memcpy(&body_len, buf + pos + 4, 4)
        body = buf + pos + FRAME_HEADER
        if pos + FRAME_HEADER + body_len > n or topic_len > body_len:
            w.log_limited(CR_CHANNEL, "channel from worker %d: truncated frame dropped" % p)
            return
        if ftype == FR_PUBLISH:
            w.counters[CHANNEL_MSGS_IN] += 1
            if body_len < 8 + topic_len:
                w.log_limited(CR_CHANNEL, "channel from worker %d: truncated PUBLISH frame dropped" % p)
                return
            memcpy(&origin_ns, body, 8)
            route_publish(w, body + 8, topic_len, body + 8 + topic_len, body_len - 8 - topic_len,
                          flags & 3, (flags >> 2) & 1, False, origin_ns)
        elif ftype == FR_SUB_ADD:
            topics_add_peer_interest(w.index, body, body_len, <uint8_t>p)
        elif ftype == FR_SUB_DEL:
            topics_remove_peer_interest(w.index, body, body_len, <uint8_t>p)
        elif ftype == FR_RETAIN:
            retain_store(w, body, topic_len, body + topic_len, body_len - topic_len, flags & 3)
        elif ftype == FR_HELLO:
            peer_restarted(w, p)
            subsync_peer_restarted(w, p)
        elif ftype == FR_SUB_SYNC:
            subsync_answer(w, p, body, body_len)
        elif ftype == FR_SUB_SYNCED:
            subsync_confirmed(w, p, body, body_len)
        elif ftype == FR_PAUSE or ftype == FR_RESUME:
            peer_congestion(w, p, ftype == FR_PAUSE)
        elif FR_CLAIM <= ftype <= FR_REGISTER:
            registry_frame(w, p, ftype, body, body_len)
        pos += FRAME_HEADER + body_len


cdef void announce_filter(void* ctx, const uint8_t* topic_filter, uint32_t n, uint8_t qos) noexcept nogil:
    """topics_filters callback: tell one peer about one of our filters."""
    cdef PeerTarget* target = <PeerTarget*>ctx
    cdef uint8_t* body
    with gil:
        body = channel_frame(<Worker>target.worker, target.peer, FR_SUB_ADD, 0, 0, n)
        if body != NULL:
            memcpy(body, topic_filter, n)


cdef struct PeerTarget:
    void* worker
    int peer


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
    registry_peer_restarted(w, p)
