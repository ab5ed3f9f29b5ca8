# Included by loop.pyx. Client ids across workers: who holds which session.
#
# Every client id has a home worker (crc32(id) % workers) that records which
# worker owns its session. A CONNECT claims the id at its home; the home
# answers the claimant (GRANT, naming the previous owner) and, when another
# worker owned it, tells that one to give it up (EVICT): it closes the old
# connection (MQTT-3.1.4-2) and sends the session (subscriptions, messages in
# flight with their packet ids, the queue, QoS 2 ids awaiting PUBREL) to the
# claimant (SESSION). The claimant's connection reads nothing meanwhile; the
# CONNACK goes out when its session is settled. An EVICT can reach a worker
# whose own CONNECT for the id, granted earlier, still waits for its SESSION:
# the eviction then waits too, and runs once that CONNECT settled (it gets
# its CONNACK, then is taken over), so the session follows the home's order:
# at once then, not behind a CONNECT of ours the home granted after the
# claimant's (connect_settle).
#
# A worker that (re)starts says HELLO: peers drop the entries they hold for
# it (its sessions died with it) and re-register their own clients whose home
# it is (its registry died with it).
#
# With authentication on, a claim by another user than the one the home has
# on record is not decided on the record alone: the record may name an owner
# whose client has just gone (its RELEASE on its way, or its DISCONNECT not
# read yet, while the same client connects again elsewhere at once). The home
# asks the owner (CHECK); the owner answers (CHECKED) once no connection of
# the id is open there, or after half connect_settle_timeout, whichever comes
# first: it holds nothing (the claim goes on as if the id were free) or it
# holds a session (a connection, or a persistent session: the claim is
# refused). Channels keep their order, so a RELEASE the owner sent comes
# before its answer. Claims of the id that come meanwhile wait behind the
# one asked about, in order.

from zlib import crc32

# The frames (FR_CLAIM ... FR_REGISTER) and their bodies: gw_ext/frames.pxd.
# A claim unanswered for connect_settle_timeout (a peer died, or is that far
# behind) settles as a new session (keepalive.pyx); a session coming after
# that is dropped, counted (sessions_late).


cdef enum:
    GRANT_REFUSED = -3        # a GRANT's previous owner: the claim is refused (another user's id)

    # What an owner holds of a client id (hold_state, FR_CHECKED).
    HOLD_NOTHING = 0          # no session, no connection, no CONNECT settling
    HOLD_SESSION = 1          # a session: another user may not take it over
    HOLD_LIVE = 2             # a connection, or a CONNECT settling (not sent: the answer waits for it to end)
    HOLD_UNKNOWN = 3          # registry_decide: the owner was not asked


cdef class PendingConnect:
    """A CONNECT waiting for its session to be settled (fields: loop.pxd)."""


cdef class ClaimCheck:
    """A claim by another user at its client id's home, waiting for the id's
    owner to say what it holds (fields: loop.pxd)."""


cdef inline int home_of(Worker w, bytes client_id):
    return crc32(client_id) % w.npeers


cdef object read_user_field(bytes data, Py_ssize_t at):
    """user_field's name at `at` (None: anonymous); False when it runs past the frame."""
    cdef Py_ssize_t ulen
    if len(data) < at + 3:
        return False
    ulen = data[at + 1] | (data[at + 2] << 8)
    if not data[at]:
        return None if ulen == 0 else False
    if len(data) < at + 3 + ulen:
        return False
    return data[at + 3:at + 3 + ulen]


cdef void send_small(Worker w, int p, uint8_t ftype, bytes head, bytes client_id):
    cdef uint8_t* body = channel_frame(w, p, ftype, 0, 0, len(head) + len(client_id))
    if body != NULL:
        memcpy(body, PyBytes_AS_STRING(head), len(head))
        memcpy(body + len(head), PyBytes_AS_STRING(client_id), len(client_id))


cdef int connect_claim(Worker w, Conn* c, PendingConnect pc):
    """Settles c's session: in this turn when the id's home is this worker and
    no other holds it, or when the CONNECT may be settled at once (connect_at_once);
    otherwise the connection stops reading until its home answered."""
    cdef int home = home_of(w, pc.client_id)
    w.settle_token += 1
    token = w.settle_token
    c.state = ST_SETTLING
    c.pending_token = token
    if home != w.worker_index and w.peers[home].fd >= 0:
        if connect_at_once(w, pc):
            connect_settle_at_once(w, c, pc, home, token)
            return 0
        w.pending[token] = pc
        w.update_events(c)       # ST_SETTLING: not read until settled
        schedule_settle_timeout(w, c)
        send_small(w, home, FR_CLAIM, struct_pack("<IB", token, pc.clean) + user_field(pc.username),
                   pc.client_id)
        return 0
    w.pending[token] = pc
    registry_claim(w, w.worker_index, token, pc.clean, pc.client_id, pc.username)
    if token in w.pending:
        # Waits for the session from the worker that held it.
        w.update_events(c)
        schedule_settle_timeout(w, c)
    return 0


cdef inline bint connect_at_once(Worker w, PendingConnect pc):
    """Whether a CONNECT whose id's home is another worker settles now, its
    claim sent after it (ARCHITECTURE.md, "A CONNECT in one turn"): with a
    clean session there is no session to receive (session present is 0 whoever
    held the id), so the home's answer could only refuse it, which it does
    only with authentication on (another user's id); and not behind a CONNECT
    of ours for the id still waiting, so ours settle in the home's order."""
    return (w.connect_at_once and pc.clean and not w.auth_required
            and not settling_here(w, pc.client_id))


cdef void connect_settle_at_once(Worker w, Conn* c, PendingConnect pc, int home, uint32_t token):
    """CONNACK now; the claim goes to the home, which answers it (GRANT) and
    evicts the previous owner as for any claim. Until the GRANT is back an
    EVICT of the id here comes from a claim the home ordered before this one:
    it names a connection this one has already taken over (registry_evict)."""
    w.pending[token] = pc
    w.unconfirmed[pc.client_id] = token
    w.counters[CONNECTS_AT_ONCE] += 1
    send_small(w, home, FR_CLAIM, struct_pack("<IB", token, pc.clean) + user_field(pc.username),
               pc.client_id)
    connect_settle(w, token, None)


cdef bytes user_field(bytes username):
    """A user name in a registry frame: has u8, length u16, the name."""
    if username is None:
        return b"\0\0\0"
    return struct_pack("<BH", 1, len(username)) + username


cdef void registry_claim(Worker w, int claimant, uint32_t token, uint8_t clean, bytes client_id,
                         object username):
    """At the id's home: record the new owner, answer, evict the old one
    (registry_decide); behind a claim whose owner is being asked, in order."""
    cdef ClaimCheck check = w.claim_checks.get(client_id)
    if check is not None:
        check.claims.append((claimant, token, clean, username))
        return
    registry_decide(w, claimant, token, clean, client_id, username, HOLD_UNKNOWN)


cdef void registry_decide(Worker w, int claimant, uint32_t token, uint8_t clean, bytes client_id,
                          object username, int held):
    """A claim at the id's home. With authentication on, an id on record for
    another user is first asked about at its owner (held: its answer, or
    HOLD_UNKNOWN): holding nothing, the id is free; holding a session, the
    claimant is refused (GRANT_REFUSED) and nothing changes."""
    cdef int prev = w.registry.get(client_id, -1)
    cdef ClaimCheck check
    if prev >= 0 and prev != claimant and prev != w.worker_index and w.peers[prev].fd < 0:
        prev = -1           # no such worker any more
    if w.auth_required and prev >= 0 and w.registry_users.get(client_id) != username and held != HOLD_NOTHING:
        if held == HOLD_SESSION:
            deliver_grant(w, claimant, token, GRANT_REFUSED, client_id)
            return
        w.check_number += 1
        check = ClaimCheck()
        check.check = w.check_number
        check.owner = prev
        check.deadline_ms = w.now_ms + w.settle_timeout_ms * 3 // 4     # before the claimant settles alone
        check.claims = [(claimant, token, clean, username)]
        w.claim_checks[client_id] = check
        if prev == w.worker_index:
            registry_check(w, prev, check.check, claimant, token, client_id)
        else:
            send_small(w, prev, FR_CHECK, struct_pack("<IBI", check.check, claimant, token), client_id)
        return
    w.registry[client_id] = claimant
    w.registry_users[client_id] = username
    deliver_grant(w, claimant, token, prev, client_id)
    if prev >= 0 and prev != claimant:
        if prev == w.worker_index:
            registry_evict(w, claimant, token, clean, client_id)
        else:
            send_small(w, prev, FR_EVICT, struct_pack("<BIB", claimant, token, clean), client_id)


cdef void registry_recheck(Worker w, bytes client_id, int held):
    """The claims waiting on a CHECK of client_id go on: the first with the
    owner's answer (HOLD_UNKNOWN: the record changed meanwhile, decide on it
    again), the others as they came."""
    cdef ClaimCheck check = w.claim_checks.pop(client_id, None)
    if check is None:
        return
    claimant, token, clean, username = check.claims[0]
    registry_decide(w, claimant, token, clean, client_id, username, held)
    for claimant, token, clean, username in check.claims[1:]:
        registry_claim(w, claimant, token, clean, client_id, username)


cdef int hold_state(Worker w, bytes client_id, int claimant, uint32_t token):
    """What this worker holds of client_id, for its home (the claimant's own
    CONNECT, settling here, aside)."""
    cdef int slot = w.client_sessions.get(client_id, -1)
    cdef PendingConnect pc
    if slot >= 0 and w.sessions[slot].fd >= 0:
        return HOLD_LIVE
    for key, pc in w.pending.items():
        if pc.client_id == client_id and not (claimant == w.worker_index and key == token):
            return HOLD_LIVE
    return HOLD_SESSION if slot >= 0 else HOLD_NOTHING


cdef void registry_check(Worker w, int home, uint32_t check, int claimant, uint32_t token, bytes client_id):
    """At the owner on record: a CHECK from client_id's home. A connection of
    the id still open may be one whose client has just left (its DISCONNECT
    or EOF not read yet): the answer waits for it to end (registry_checks_due)."""
    cdef int held = hold_state(w, client_id, claimant, token)
    if held == HOLD_LIVE:
        w.held_checks.append((home, check, claimant, token, client_id, w.now_ms + w.settle_timeout_ms // 2))
    else:
        check_answer(w, home, check, held, client_id)


cdef void check_answer(Worker w, int home, uint32_t check, int held, bytes client_id):
    if home == w.worker_index:
        on_checked(w, check, held, client_id)
    else:
        send_small(w, home, FR_CHECKED, struct_pack("<IB", check, held), client_id)


cdef void on_checked(Worker w, uint32_t check, int held, bytes client_id):
    """At the home: the owner's answer (dropped when the check was settled
    otherwise meanwhile: a RELEASE, a REGISTER, the owner restarted)."""
    cdef ClaimCheck pending = w.claim_checks.get(client_id)
    if pending is not None and pending.check == check:
        registry_recheck(w, client_id, held)


cdef void registry_checks_due(Worker w):
    """Every turn while checks wait (at the top of the turn: it may settle
    CONNECTs): an owner's answers whose connection ended or whose time is up
    (a connection still open after half connect_settle_timeout is a live one:
    the claim is refused); at a home, checks the owner did not answer within
    three quarters of it (it hung): refused, before the claimant's own
    connect_settle_timeout would settle it as a new session."""
    cdef list left = []
    cdef list due = []
    cdef int held
    cdef ClaimCheck check
    cdef object entry
    for entry in w.held_checks:
        held = hold_state(w, entry[4], entry[2], entry[3])
        if held == HOLD_LIVE and <uint64_t>entry[5] > w.now_ms:
            left.append(entry)
        else:
            due.append((entry, HOLD_SESSION if held == HOLD_LIVE else held))
    w.held_checks = left
    for entry, held in due:
        check_answer(w, entry[0], entry[1], held, entry[4])
    for client_id, check in list(w.claim_checks.items()):
        if check.deadline_ms <= w.now_ms and w.claim_checks.get(client_id) is check:
            w.log_limited(CR_CHANNEL, "worker %d did not say in time what it holds of a client id another "
                          "user claimed: refused" % check.owner)
            registry_recheck(w, client_id, HOLD_SESSION)


cdef void deliver_grant(Worker w, int claimant, uint32_t token, int prev, bytes client_id):
    if claimant == w.worker_index:
        on_grant(w, token, prev)
    else:
        send_small(w, claimant, FR_GRANT, struct_pack("<Ib", token, prev), client_id)


cdef void on_grant(Worker w, uint32_t token, int prev):
    cdef PendingConnect pc = w.pending.get(token)
    if pc is None:
        return
    cdef PendingConnect waiting
    cdef Conn* c
    if prev == GRANT_REFUSED:
        # Another user's session holds the id (registry_claim): CONNACK 0x05.
        del w.pending[token]
        c = &w.conns[pc.fd]
        if c.state == ST_SETTLING and c.gen == pc.gen and c.pending_token == token:
            auth_refuse(w, c, CONNACK_NOT_AUTHORIZED, AUTH_LOG_TAKEOVER)
        else:
            w.counters[AUTH_REFUSED_TAKEOVER] += 1      # its client left meanwhile
        return
    if prev == w.worker_index:
        waiting = granted_pending(w, pc.client_id, pc)
        if waiting is not None:
            # An earlier CONNECT of ours for this id still waits for its session:
            # this one takes it over once it settled (registry_evict hands it the
            # session, here), not the other way round.
            pc.prev_owner = prev
            if waiting.evictions is None:
                waiting.evictions = []
            waiting.evictions.append((w.worker_index, token, pc.clean))
            return
    if prev == -1 or prev == w.worker_index:
        # No other worker had it: settle here (a local session may exist).
        connect_settle(w, token, None)
    else:
        pc.prev_owner = prev      # the SESSION frame from `prev` settles it


cdef PendingConnect granted_pending(Worker w, bytes client_id, PendingConnect exclude):
    """A CONNECT of ours for client_id (but `exclude`) granted by its home
    and still waiting for its session (the latest, if several)."""
    cdef PendingConnect pc, found = None
    cdef object token, best = None
    for token, pc in w.pending.items():
        if (pc is not exclude and pc.prev_owner >= 0 and pc.client_id == client_id
                and (best is None or token > best)):
            found, best = pc, token
    return found


cdef void registry_evict(Worker w, int claimant, uint32_t token, uint8_t clean, bytes client_id):
    """We owned client_id; it connected elsewhere. Close ours and hand over.
    When our own CONNECT for it is still waiting for the session (the home
    granted it before the claimant's), the eviction waits for that: it gets
    its CONNACK and the session, then is taken over and hands the session on
    (connect_settle), as the home ordered the two CONNECTs (MQTT-3.1.4-2)."""
    cdef PendingConnect waiting
    if w.unconfirmed and client_id in w.unconfirmed:
        # The home ordered the claimant's CONNECT before ours settled at once
        # (whose GRANT would have come first): the connection it names is one
        # ours has taken over already; ours stays, and takes the claimant's
        # over in its turn (the home evicts it for ours). The claimant waiting
        # for a session gets none: ours, clean, ended it.
        w.counters[EVICTS_STALE] += 1
        send_session(w, claimant, token, 0, b"", client_id)
        return
    # (A CONNECT of ours taking over one of ours is not waiting for itself.)
    waiting = granted_pending(
        w, client_id, w.pending.get(token) if claimant == w.worker_index else None)
    if waiting is not None:
        if waiting.evictions is None:
            waiting.evictions = []
        waiting.evictions.append((claimant, token, clean))
        return
    registry_hand_over(w, claimant, token, clean, client_id)


cdef void registry_hand_over(Worker w, int claimant, uint32_t token, uint8_t clean, bytes client_id):
    """Closes our connection of client_id and sends its session to the
    claimant, now: its turn has come (registry_evict found no CONNECT of ours
    before it, or the one it waited for has just settled, connect_settle)."""
    cdef int slot
    cdef bytes state = b""
    cdef uint8_t present = 0
    slot = w.client_sessions.get(client_id, -1)
    if slot >= 0 and w.sessions[slot].fd >= 0:
        w.close_taken_over(&w.conns[w.sessions[slot].fd])
        slot = w.client_sessions.get(client_id, -1)
    if slot >= 0:
        if not clean and not w.sessions[slot].clean:
            state = session_serialize(w, slot)
            present = 1
        session_free(w, slot, False, not present)
    send_session(w, claimant, token, present, state, client_id)


cdef void send_session(Worker w, int claimant, uint32_t token, uint8_t present, bytes state, bytes client_id):
    """The claimant's SESSION: what we held of client_id (present 0: nothing)."""
    if claimant == w.worker_index:
        on_session(w, token, present, state)
        return
    head = struct_pack("<IBH", token, present, len(client_id))
    cdef uint8_t* body = channel_frame(w, claimant, FR_SESSION, 0, 0, len(head) + len(client_id) + len(state))
    if body != NULL:
        memcpy(body, PyBytes_AS_STRING(head), len(head))
        memcpy(body + len(head), PyBytes_AS_STRING(client_id), len(client_id))
        memcpy(body + len(head) + len(client_id), PyBytes_AS_STRING(state), len(state))


cdef void on_session(Worker w, uint32_t token, uint8_t present, bytes state):
    cdef PendingConnect pc = w.pending.get(token)
    if pc is None:
        # Its CONNECT settled without it (its settle timeout): the client was told it
        # has no session, and may hold another by now.
        if present:
            session_came_late(w)
        return
    connect_settle(w, token, state if present else None)


cdef bint settling_here(Worker w, bytes client_id):
    """Whether a CONNECT of ours for client_id waits for its session."""
    cdef PendingConnect pc
    for pc in w.pending.values():
        if pc.client_id == client_id:
            return True
    return False


cdef void settle_orphans_due(Worker w):
    """CONNECTs whose connection closed while they waited for their session
    lost their timer with it: unanswered by its deadline, each settles now as
    the timer would have settled it (the client gone), so the evictions
    waiting behind it go on, and a later EVICT is not queued behind it."""
    cdef list due = []
    cdef list left = []
    cdef object entry
    for entry in w.settle_orphans:
        if entry[0] not in w.pending or <uint64_t>entry[1] <= w.now_ms:
            break
    else:
        return                          # none due yet (the usual turn: nothing built)
    for entry in w.settle_orphans:
        if entry[0] not in w.pending:
            continue                    # answered meanwhile
        if <uint64_t>entry[1] <= w.now_ms:
            due.append(entry[0])
        else:
            left.append(entry)
    w.settle_orphans = left
    for token in due:
        w.log_limited(CR_CHANNEL, "a CONNECT's session could not be settled in time; its client had left")
        connect_settle(w, token, None)


cdef void session_came_late(Worker w):
    w.counters[SESSIONS_LATE] += 1
    w.log_limited(CR_CHANNEL, "a session from another worker came after its CONNECT had settled without it; "
                  "dropped")


cdef void registry_release(Worker w, bytes client_id):
    """A session of ours ended: its home forgets us (unless someone else has it now).
    Not while this worker still holds the id or is about to: another session
    of it here, or a CONNECT of ours for it settling, whose claim (sent before
    this release would be) names us at the home again; a release arriving
    after it would erase that, and the next CONNECT with the id elsewhere
    would not close ours (MQTT-3.1.4-2). The last of them to end releases."""
    cdef int home = home_of(w, client_id)
    if client_id in w.client_sessions or settling_here(w, client_id):
        return
    if home == w.worker_index or w.peers[home].fd < 0:
        if w.registry.get(client_id) == w.worker_index:
            del w.registry[client_id]
            w.registry_users.pop(client_id, None)
    else:
        send_small(w, home, FR_RELEASE, struct_pack("<B", w.worker_index), client_id)


cdef void registry_register(Worker w, bytes client_id):
    """Tells client_id's home that this worker holds its session."""
    cdef int home = home_of(w, client_id)
    cdef int slot = w.client_sessions.get(client_id, -1)
    username = session_username(&w.sessions[slot]) if slot >= 0 else None
    if home == w.worker_index or w.peers[home].fd < 0:
        w.registry[client_id] = w.worker_index
        w.registry_users[client_id] = username
    else:
        send_small(w, home, FR_REGISTER, struct_pack("<B", w.worker_index) + user_field(username), client_id)


cdef void registry_register_restored(Worker w):
    """Sessions loaded from the data dir (Worker.restore_sessions): their ids'
    homes learn they are here (once the peers heard our HELLO)."""
    cdef bytes cid
    for cid in w.restored:
        registry_register(w, cid)
    w.restored = []


cdef void registry_peer_restarted(Worker w, int p):
    """Worker p (re)started: its sessions are gone; our clients homed there re-register."""
    cdef bytes cid
    cdef int slot
    cdef ClaimCheck check
    for cid in [k for k, v in w.registry.items() if v == p]:
        del w.registry[cid]
        w.registry_users.pop(cid, None)
    # Our CONNECTs settled at once whose claim p will not answer (its registry
    # died with it): the REGISTER below puts them on its record.
    for cid in [k for k in w.unconfirmed if home_of(w, k) == p]:
        del w.unconfirmed[cid]
    # Checks p was asked (it will not answer) and p asked of us (it forgot them).
    w.held_checks = [entry for entry in w.held_checks if entry[0] != p]
    for cid, check in list(w.claim_checks.items()):
        if check.owner == p and w.claim_checks.get(cid) is check:
            registry_recheck(w, cid, HOLD_UNKNOWN)
    for cid, slot in w.client_sessions.items():
        if home_of(w, cid) == p:
            send_small(w, p, FR_REGISTER,
                       struct_pack("<B", w.worker_index) + user_field(session_username(&w.sessions[slot])), cid)


cdef inline bint is_worker(Worker w, int p) noexcept:
    """Whether p names a worker: this one, or a peer with a channel."""
    return 0 <= p < w.npeers and (p == w.worker_index or w.peers[p].fd >= 0)


cdef void registry_frame(Worker w, int p, uint8_t ftype, const uint8_t* body, uint32_t n):
    """A registry frame from worker p. Every worker index in it is checked
    (it indexes the peers' table), and every length against the frame."""
    cdef bytes data = PyBytes_FromStringAndSize(<char*>body, n)
    cdef uint32_t token, check
    cdef int prev, owner, claimant, clean, present, idlen, held
    if ftype == FR_CLAIM and n >= 8:
        token, clean = struct_unpack_from("<IB", data)
        username = read_user_field(data, 5)
        if username is False:
            channel_malformed(w, p, "a CLAIM whose user name runs past it")
            return
        registry_claim(w, p, token, clean, data[8 + (len(username) if username is not None else 0):], username)
    elif ftype == FR_GRANT and n >= 5:
        token, prev = struct_unpack_from("<Ib", data)
        if (prev < -1 and prev != GRANT_REFUSED) or prev >= w.npeers:
            channel_malformed(w, p, "a GRANT naming worker %d" % prev)
            return
        on_grant(w, token, prev)
        if w.unconfirmed and w.unconfirmed.get(data[5:]) == token:
            del w.unconfirmed[data[5:]]       # our CONNECT settled at once is in the home's order now
    elif ftype == FR_EVICT and n >= 6:
        claimant, token, clean = struct_unpack_from("<BIB", data)
        if not is_worker(w, claimant):
            channel_malformed(w, p, "an EVICT for worker %d" % claimant)
            return
        registry_evict(w, claimant, token, clean, data[6:])
    elif ftype == FR_SESSION and n >= 7:
        token, present, idlen = struct_unpack_from("<IBH", data)
        if 7 + idlen > n:
            channel_malformed(w, p, "a SESSION frame shorter than its client id")
            return
        on_session(w, token, present, data[7 + idlen:])
    elif ftype == FR_RELEASE and n >= 1:
        owner = data[0]
        if not is_worker(w, owner):
            channel_malformed(w, p, "a registry frame naming worker %d" % owner)
        elif w.registry.get(data[1:]) == owner:
            del w.registry[data[1:]]
            w.registry_users.pop(data[1:], None)
            if w.claim_checks:
                registry_recheck(w, data[1:], HOLD_UNKNOWN)     # a claim waiting on this owner goes on
    elif ftype == FR_REGISTER and n >= 4:
        owner = data[0]
        username = read_user_field(data, 1)
        if not is_worker(w, owner):
            channel_malformed(w, p, "a registry frame naming worker %d" % owner)
        elif username is False:
            channel_malformed(w, p, "a REGISTER whose user name runs past it")
        else:
            cid = data[4 + (len(username) if username is not None else 0):]
            w.registry[cid] = owner
            w.registry_users[cid] = username
            if w.claim_checks:
                registry_recheck(w, cid, HOLD_UNKNOWN)
    elif ftype == FR_CHECK and n >= 9:
        check, claimant, token = struct_unpack_from("<IBI", data)
        if not is_worker(w, claimant):
            channel_malformed(w, p, "a CHECK for worker %d" % claimant)
            return
        registry_check(w, p, check, claimant, token, data[9:])
    elif ftype == FR_CHECKED and n >= 5:
        check, held = struct_unpack_from("<IB", data)
        if held != HOLD_NOTHING and held != HOLD_SESSION:
            channel_malformed(w, p, "a CHECKED answer %d" % held)
            return
        on_checked(w, check, held, data[5:])
    else:
        channel_malformed(w, p, "a registry frame (type %d) of %d bytes" % (ftype, n))


# --- settling a CONNECT ----------------------------------------------------------

cdef void connect_settle(Worker w, uint32_t token, object state):
    """The session question is answered: settle the CONNECT, then hand the
    session on to whoever claimed the id meanwhile (registry_evict)."""
    cdef PendingConnect pc = w.pending.get(token)
    cdef int claimant
    cdef uint32_t etoken
    cdef uint8_t eclean
    if pc is None:
        return
    connect_settle_here(w, token, state)
    if pc.evictions is not None:
        # Granted right after this one: their turn, now. Not behind a CONNECT of
        # ours granted later (registry_evict would find it waiting too): that one
        # waits, in the end, for this hand-over; both would wait until
        # connect_settle_timeout, and the session coming after it be dropped.
        for claimant, etoken, eclean in pc.evictions:
            if claimant == w.worker_index and etoken not in w.pending:
                continue        # ours, settled meanwhile on its own (its settle timeout)
            registry_hand_over(w, claimant, etoken, eclean, pc.client_id)


cdef void connect_settle_here(Worker w, uint32_t token, object state):
    """Builds or resumes the session, CONNACK, and goes on with whatever the
    client sent after its CONNECT."""
    cdef PendingConnect pc = w.pending.pop(token, None)
    cdef Conn* c
    cdef int slot
    cdef Session* s
    cdef uint8_t present = 0
    cdef uint8_t* out
    cdef bytes will_ext
    if pc is None:
        return
    c = &w.conns[pc.fd]
    if c.state != ST_SETTLING or c.gen != pc.gen:
        # The client left while we waited. A transferred persistent session
        # stays here, waiting for it.
        if state is not None and pc.client_id in w.client_sessions:
            # A later CONNECT of ours for the id settled first, on its own (its
            # settle timeout): the id's session here is its, not this one.
            session_came_late(w)
        elif state is not None:
            slot = session_new(w, <const uint8_t*>PyBytes_AS_STRING(pc.client_id), len(pc.client_id), 0)
            if slot >= 0:
                session_restore(w, slot, state)
                w.counters[SESSIONS_AWAY] += 1
                w.sessions[slot].away_since_ms = w.now_ms
        else:
            registry_release(w, pc.client_id)
        return
    slot = w.client_sessions.get(pc.client_id, -1)
    if slot >= 0 and w.sessions[slot].fd >= 0:
        # The same client id connected twice on this worker: the first goes (MQTT-3.1.4-2).
        w.close_taken_over(&w.conns[w.sessions[slot].fd])
        slot = w.client_sessions.get(pc.client_id, -1)
    if slot >= 0:
        if pc.clean or w.sessions[slot].clean:
            session_free(w, slot, False)            # MQTT-3.1.2-6
            slot = -1
        else:
            present = 1                             # MQTT-3.2.2-2
            w.counters[SESSIONS_AWAY] -= 1
            # Back within its will's delay: the held will is not published
            # (MQTT-3.1.3-9; will_delay.pyx).
            will_delay_cancel(w, &w.sessions[slot])
    if slot < 0:
        slot = session_new(w, <const uint8_t*>PyBytes_AS_STRING(pc.client_id), len(pc.client_id), pc.clean)
        if slot < 0:
            w.close_conn(c, CR_SERVER)
            return
        if state is not None and not pc.clean:
            session_restore(w, slot, state)
            present = 1
    s = &w.sessions[slot]
    s.version = pc.version
    if pc.version == 5:
        # MQTT 5.0: the session outlives the connection for its Session Expiry
        # Interval (worker/mqtt5.pyx); 0 ends it with the connection.
        s.clean = pc.session_expiry == 0
        s.expiry_s = pc.session_expiry
    else:
        s.clean = pc.clean
    s.fd = c.fd
    if s.nshared:
        shared_session_changed(w, slot)         # its groups count one more connected member
    if session_set_username(s, pc.username) < 0:
        w.close_conn(c, CR_SERVER)
        return
    session_changed(w, s)
    c.session = slot
    s.will_delay_s = 0
    if pc.will_flag:
        will_ext = pc.will_ext if pc.will_ext is not None else b""
        s.will = msg_new_ext(<const uint8_t*>PyBytes_AS_STRING(pc.will_topic), len(pc.will_topic),
                             <const uint8_t*>PyBytes_AS_STRING(pc.will_message), len(pc.will_message),
                             <const uint8_t*>PyBytes_AS_STRING(will_ext), len(will_ext),
                             pc.will_qos, pc.will_retain)
        s.will_qos = pc.will_qos
        s.will_retain = pc.will_retain
        s.will_delay_s = pc.will_delay
        if not will_allowed(w, s):
            # Accepted with the CONNECT (as Mosquitto does), never published.
            msg_release(s.will)
            s.will = NULL
    c.keepalive = pc.keepalive
    become_connected(w, c, mqtt_idle_limit_ms(pc.keepalive))
    w.counters[MQTT_CONNECTED] += 1
    if pc.version == 5:
        if send_connack5(w, c, pc, present) < 0:
            return
    else:
        out = w.reserve(c, 4)
        if out == NULL:
            return
        encode_connack(out, present, CONNACK_ACCEPTED)
        w.counters[PKT_OUT + CONNACK] += 1
    if present:
        session_resume(w, s)
    w.update_events(c)
    if w.publishers_paused and c.flags & F_PUBLISHER:
        pause_conn(w, c)
    if c.inlen:
        # Packets the client sent right after CONNECT, held while we settled: at
        # the end of this phase of the turn, not here (the connection's own
        # input may be on the stack: a CONNECT settled at once, locally).
        w.resume_later(c)
