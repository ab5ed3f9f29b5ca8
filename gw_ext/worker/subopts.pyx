# Included by loop.pyx. MQTT 5.0 subscription options and Subscription
# Identifiers (section 3.8.3.1, 3.3.4).
#
# - Options are kept with each subscription in the worker's index
#   (topics.pxd: SubEntry.opts, SUBOPT_*; 0 for a 3.1.1 subscription):
#   No Local (the publisher's own subscriptions with it do not match its
#   PUBLISHes: route_local sets MatchResult.nolocal from Worker.route_nolocal,
#   set by publish_decoded; a client's sessions and subscriptions live on the
#   worker it is connected to, so it is a local check), Retain As Published
#   (MatchEntry.opts: a live delivery keeps the RETAIN flag it was published
#   with). Retain Handling is the SUBSCRIBE's own (handle_subscribe: 0 sends
#   the retained messages, 1 only for a subscription that did not exist, 2
#   never).
# - A SUBSCRIBE's Subscription Identifier is kept with each of its
#   subscriptions (SubEntry.subid); a session that ever had one is flagged
#   (Session.subids). The identifiers are found when a PUBLISH is written to
#   an MQTT 5.0 subscriber so flagged: subids_prepare walks its subscriptions
#   (topics_subscriber_ids) and writes the properties into this module's
#   scratch, which publish_out_size and publish_out_encode add to the PUBLISH
#   (subid_props_size, subid_props_put), so a message queued or in flight needs
#   nothing stored with it. A 3.1.1 subscriber, or one without identifiers,
#   costs a test of the flag.
# - Both survive a move to another worker and the data dir (session_state.pyx,
#   layout 5).

cdef enum:
    SUBID_MAX = 32          # Subscription Identifiers written in one PUBLISH (5 bytes each at most)

cdef uint8_t subid_props_buf[SUBID_MAX * 5]
cdef uint32_t subid_props_len = 0


cdef void subids_prepare(Worker w, Conn* c, const uint8_t* topic, uint32_t topic_len) noexcept:
    """Before publish_out_size and publish_out_encode write a PUBLISH on topic
    to c: the Subscription Identifier properties of c's session's matching
    subscriptions (MQTT-3.3.4-3), none for 3.1.1 or a session without any."""
    cdef int cut = subids_compute(w, c, topic, topic_len)
    if cut:
        w.counters[MQTT5_SUBIDS_CUT] += 1
    if subid_props_len:
        w.counters[MQTT5_SUBID_PUBLISHES] += 1


cdef int subids_compute(Worker w, Conn* c, const uint8_t* topic, uint32_t topic_len) noexcept:
    """subids_prepare's scratch, not counted (a size asked ahead, msg_too_large,
    clears it after). 1: there were more than SUBID_MAX."""
    global subid_props_len
    cdef uint32_t[SUBID_MAX] ids
    cdef uint32_t n, i, k = 0
    cdef Session* s
    cdef int cut = 0
    subid_props_len = 0
    if not conn_v5(c) or c.session < 0:
        return 0
    s = &w.sessions[c.session]
    if not s.subids:
        return 0
    n = topics_subscriber_ids(w.index, <uint32_t>c.session, topic, topic_len, ids, SUBID_MAX)
    if n > SUBID_MAX:
        cut = 1
        n = SUBID_MAX
    for i in range(n):
        subid_props_buf[k] = P_SUBSCRIPTION_ID
        k += 1 + write_varint(subid_props_buf + k + 1, ids[i])
    subid_props_len = k
    return cut


cdef void subids_clear() noexcept nogil:
    """The prepared identifiers are not to be written (the PUBLISH was not)."""
    global subid_props_len
    subid_props_len = 0


cdef inline uint32_t subid_props_size() noexcept nogil:
    """The bytes subid_props_put writes (publish_out_size)."""
    return subid_props_len


cdef inline uint32_t subid_props_put(uint8_t* out) noexcept nogil:
    """Writes the prepared Subscription Identifiers (publish_out_encode);
    they are used once."""
    global subid_props_len
    cdef uint32_t k = subid_props_len
    if k:
        memcpy(out, subid_props_buf, k)
        subid_props_len = 0
    return k


cdef inline uint8_t subopts_of(uint8_t options) noexcept nogil:
    """A SUBSCRIBE entry's options byte as the index keeps them (SUBOPT_*)."""
    return (SUBOPT_NO_LOCAL if options & 4 else 0) | (SUBOPT_RAP if options & 8 else 0)
