# Included by loop.pyx. MQTT 5.0 wills held for their Will Delay Interval
# (section 3.1.3.2.2, MQTT-3.1.2-8, -3.1.3-9).
#
# The will of a v5 connection that ends without DISCONNECT 0x00 (or with 0x04,
# Disconnect with Will Message) goes out once its Will Delay Interval has
# passed or its session ends, whichever comes first: a session with Session
# Expiry 0 ends with the connection (the will at once, session_detach); a
# persistent one keeps the will in Session.will meanwhile, its deadline (the
# delay, or the session's expiry when that is sooner) on the worker's second
# timing wheel (`will_wheel`, the same wheel.pyx: one node per held will, in a
# WillTimer of its own, since the session table moves when it grows). Nothing
# of this is on a message's path: a will is held at a disconnect, and fires,
# is cancelled or goes out early once.
#
# - Cancelled (not published) when its client connects again and continues
#   the session (Clean Start 0) within the delay: here (connect_settle_here),
#   or on another worker, whose claim makes the id's home evict this one
#   (registry_hand_over: the session moves, its will does not).
# - Published early when the session ends first: it expired (sessions_expire),
#   or a CONNECT with Clean Start 1 took the id (here or on another worker:
#   the session is discarded, MQTT-3.1.2-4; as Mosquitto does).
# - Bounded by max_delayed_wills per worker: past it, a will goes out at once
#   (never dropped), counted.
# - On a graceful stop (SIGTERM, the drain) every held will is published at the
#   drain's start, before the connections close, so subscribers connected then
#   get it and persistent subscribers have it in their saved queues: held
#   wills are not saved in data_dir, so this is the session end they get (as
#   Mosquitto publishes its delayed wills when it stops). A crash loses them.


cdef void will_publish(Worker w, Session* s):
    """The session's will goes out now (when the ACL still allows it: a reload
    may have revoked it meanwhile), and is released."""
    cdef Msg* will = s.will
    if will == NULL:
        return
    if will_allowed(w, s):
        w.counters[WILLS_PUBLISHED] += 1
        will_expiry_starts(will)
        route_publish(w, will.data, will.topic_len, will.data + will.topic_len,
                      will.payload_len, s.will_qos, s.will_retain, True, w.now_ns,
                      will.data + will.topic_len + will.payload_len, will.ext_len)
    s.will = NULL
    msg_release(will)


cdef bint will_delay_start(Worker w, int slot) except -1:
    """The session's client went without DISCONNECT: its will is held for its
    Will Delay Interval (True), or must go out now (False: no delay, a session
    that ends now, or max_delayed_wills held already)."""
    cdef Session* s = &w.sessions[slot]
    cdef WillTimer* t
    cdef uint64_t delay_ms
    if s.will_delay_s == 0 or s.clean or s.will == NULL:
        return False
    if w.ndelayed_wills >= w.max_delayed_wills:
        w.counters[WILLS_DELAY_OVER_LIMIT] += 1
        w.log_limited(CR_LIMIT, "max_delayed_wills (%d) wills held: a will went out without its Will Delay Interval"
                      % w.max_delayed_wills)
        return False
    t = <WillTimer*>calloc(1, sizeof(WillTimer))
    if t == NULL:
        return False
    t.slot = slot
    delay_ms = <uint64_t>s.will_delay_s * 1000
    if s.version == 5 and s.expiry_s != 0xFFFFFFFF and <uint64_t>s.expiry_s * 1000 < delay_ms:
        delay_ms = <uint64_t>s.expiry_s * 1000      # the session ends first (sessions_expire frees it)
    s.will_timer = t
    w.ndelayed_wills += 1
    w.counters[WILLS_DELAYED] += 1
    w.counters[WILLS_DELAY_PENDING] = w.ndelayed_wills
    wheel_schedule(&w.will_wheel, &t.node, w.now_ms + delay_ms)
    return True


cdef inline void will_timer_drop(Worker w, Session* s) noexcept:
    cdef WillTimer* t = s.will_timer
    if t == NULL:
        return
    s.will_timer = NULL
    wheel_cancel(&w.will_wheel, &t.node)
    free(t)
    w.ndelayed_wills -= 1
    w.counters[WILLS_DELAY_PENDING] = w.ndelayed_wills


cdef void will_delay_cancel(Worker w, Session* s):
    """The client is back within the delay, continuing its session (here, or
    on another worker the session moves to): the held will is not published
    (MQTT-3.1.3-9)."""
    if s.will_timer == NULL:
        return
    will_timer_drop(w, s)
    w.counters[WILLS_DELAY_CANCELLED] += 1
    msg_release(s.will)
    s.will = NULL


cdef void will_delay_end(Worker w, int slot, int counter):
    """The held will goes out now: its delay passed (WILLS_DELAY_ELAPSED), its
    session ends (WILLS_DELAY_SESSION_END), the server stops (WILLS_DELAY_SHUTDOWN)."""
    cdef Session* s = &w.sessions[slot]
    if s.will_timer == NULL:
        return
    will_timer_drop(w, s)
    w.counters[counter] += 1
    will_publish(w, &w.sessions[slot])


cdef void wills_delayed_due(Worker w):
    """Worker.run_timers: the held wills whose delay passed go out, one timer
    at a time off the wheel's expired list."""
    cdef TimerNode* node
    cdef WillTimer* t
    cdef Session* s
    cdef int slot
    if w.will_wheel.count == 0:
        return
    wheel_expire(&w.will_wheel, w.now_ms)
    while True:
        try:
            while True:
                node = wheel_pop_expired(&w.will_wheel)
                if node == NULL:
                    return
                t = <WillTimer*>node
                slot = t.slot
                if 0 <= slot < <int>w.nsessions and w.sessions[slot].will_timer == t:
                    s = &w.sessions[slot]
                    # Its deadline was the session's expiry when that came first.
                    will_delay_end(w, slot, WILLS_DELAY_SESSION_END
                                   if s.version == 5 and s.expiry_s != 0xFFFFFFFF and s.expiry_s < s.will_delay_s
                                   else WILLS_DELAY_ELAPSED)
        except Exception:
            w.contained(-1, "publishing a will after its Will Delay Interval")


cdef void wills_delayed_flush(Worker w):
    """The server drains: every held will goes out now (see above)."""
    cdef uint32_t slot
    if w.ndelayed_wills == 0:
        return
    for slot in range(w.nsessions):
        if w.sessions[slot].in_use and w.sessions[slot].will_timer != NULL:
            will_delay_end(w, slot, WILLS_DELAY_SHUTDOWN)
