# Included by loop.pyx. The ACL enforced (the file: gw/acl.py; the rules
# tries and the per-session cache: gw_ext/acl.pyx). Worker.acl is the version
# in force (None: no acl_file, everything allowed but $SYS publishes).
#
# - PUBLISH (write): refused publishes are acknowledged as usual (3.1.1 has no
#   negative acknowledgement), then dropped; a retained one leaves the store
#   as it was. `$SYS` topics belong to the server: no client publishes there,
#   whatever the ACL says.
# - SUBSCRIBE (read): a filter no readable topic can match gets SUBACK 0x80; a
#   wider one is granted and each message is checked at delivery.
# - Delivery (read): every message to a subscriber, in the worker that holds
#   it: live, retained on subscribe, leaving a queue (a reload may have
#   revoked the grant meanwhile), from another worker.
# - Wills (write): checked at CONNECT (a refused will is accepted, never
#   published) and again when published (a reload may have revoked it).
# Each refusal is counted and logged at most once per 10 s (CR_ACL), with the
# client's address.

cdef inline bint is_sys_topic(const uint8_t* topic, uint32_t n) noexcept nogil:
    return n >= 4 and topic[0] == 36 and topic[1] == 83 and topic[2] == 89 and topic[3] == 83 and (
        n == 4 or topic[4] == 47)      # "$SYS" or "$SYS/..."


cdef inline bint session_may(Worker w, Session* s, const uint8_t* topic, uint32_t n, uint8_t access) except -1:
    """The session's identity may have `access` on topic (no ACL: yes)."""
    if w.acl is None:
        return True
    return acl_allowed(w.acl, &s.acl, s.username, s.username_len, s.username != NULL,
                       s.client_id, s.client_id_len, topic, n, access) == 1


cdef inline bint may_deliver(Worker w, Session* s, const uint8_t* topic, uint32_t n) except -1:
    """A message on topic may go to this subscriber; counted (and logged) when not."""
    if w.acl is None or session_may(w, s, topic, n, ACL_READ):
        return True
    w.counters[ACL_DELIVERY_DENIED] += 1
    _log_refusal(w, &w.conns[s.fd] if s.fd >= 0 else NULL, s, topic, n, "may not read it (ACL): not delivered")
    return False


cdef bint publish_refused(Worker w, Conn* c, Session* s, const uint8_t* topic, uint32_t n) except -1:
    """True (counted, logged) when the client may not publish on topic."""
    cdef str why
    if is_sys_topic(topic, n):
        w.counters[ACL_SYS_PUBLISH_REFUSED] += 1
        why = "publishes on $SYS (the server's topics): dropped"
    elif w.acl is not None and not session_may(w, s, topic, n, ACL_WRITE):
        w.counters[ACL_PUBLISH_DENIED] += 1
        why = "may not publish there (ACL): dropped"
    else:
        return False
    _log_refusal(w, c, s, topic, n, why)
    return True


cdef bint may_subscribe(Worker w, Conn* c, Session* s, const uint8_t* f, uint32_t n) except -1:
    """A SUBSCRIBE filter the client may read something of (no ACL: any).
    Not on the message path: the whole filter against the identity's rules."""
    cdef bytes user
    if w.acl is None:
        return True
    user = PyBytes_FromStringAndSize(s.username, s.username_len) if s.username != NULL else None
    if w.acl.file.may_subscribe(user, PyBytes_FromStringAndSize(s.client_id, s.client_id_len),
                                PyBytes_FromStringAndSize(<char*>f, n)):
        return True
    w.counters[ACL_SUBSCRIBE_DENIED] += 1
    _log_refusal(w, c, s, f, n, "may not read anything of this filter (ACL): SUBACK 0x80")
    return False


cdef bint will_allowed(Worker w, Session* s) except -1:
    """The session's will may be published (its topic writable); counted and
    logged when not. Asked at CONNECT and when the will goes out."""
    cdef Conn* c = &w.conns[s.fd] if s.fd >= 0 else NULL
    if s.will == NULL:
        return True
    if is_sys_topic(s.will.data, s.will.topic_len):
        w.counters[ACL_SYS_PUBLISH_REFUSED] += 1
    elif w.acl is not None and not session_may(w, s, s.will.data, s.will.topic_len, ACL_WRITE):
        w.counters[ACL_PUBLISH_DENIED] += 1
    else:
        return True
    _log_refusal(w, c, s, s.will.data, s.will.topic_len, "may not publish its will there: never published")
    return False


cdef void _log_refusal(Worker w, Conn* c, Session* s, const uint8_t* topic, uint32_t n, str why) except *:
    # Formatting (the address is a syscall) only when the line is logged.
    cdef int reason = CR_ACL
    if w.last_log_ms[reason] != 0 and w.now_ms - w.last_log_ms[reason] < 10000:
        w.suppressed[reason] += 1
        return
    w.log_limited(CR_ACL, "ACL: client %r (user %s)%s on %r %s" % (
        PyBytes_FromStringAndSize(s.client_id, s.client_id_len).decode("utf-8", "replace"),
        repr(PyBytes_FromStringAndSize(s.username, s.username_len).decode("utf-8", "replace"))
        if s.username != NULL else "none",
        " from " + peer_address(c.fd) if c != NULL else "",
        PyBytes_FromStringAndSize(<char*>topic, n).decode("utf-8", "replace"), why))
