"""Takeovers across workers, each interleaving played out deterministically:
one real Worker (gw_ext/loop.pyx) driven a loop turn at a time with real
client sockets, and the other worker played by the test over a real
SOCK_SEQPACKET socketpair (fuzz/common.py's harness), so the frames between
the two arrive in exactly the order that makes the case. With two workers,
client id c0's home is worker 1 (the played one), c4's is worker 0 (the
real one).

What must hold in each: the id's home keeps naming the worker whose
connection holds the session, so that the next CONNECT with that id, on any
worker, closes it (MQTT-3.1.4-2)."""

from __future__ import annotations

import textwrap

from test_fuzz_regressions import run_worker_script

# Shared by the scripts: the played worker's end of the channel.
PLAYED_PEER = """
    import time

    def frames_from(peer):
        '''The frames the worker sent to the played peer since the last call.'''
        out = []
        while True:
            try:
                dgram = peer.theirs.recv(1 << 22)
            except BlockingIOError:
                return out
            pos = 0
            while pos + 8 <= len(dgram):
                ftype, _flags, _tlen, blen = struct.unpack_from("<BBHI", dgram, pos)
                out.append((ftype, dgram[pos + 8:pos + 8 + blen]))
                pos += 8 + blen

    def turns(wut, n=4):
        for _ in range(n):
            wut.worker.run_once(0)

    def connected(wut, cid, clean=True):
        c = Client(wut.ports["mqtt"])
        turns(wut)
        c.stream += connect_packet(cid, clean=clean)
        c.send(0)
        turns(wut)
        return c

    def played_claim(wut, peer, token, clean, cid, holder):
        '''A client of the played worker connects with cid: its CLAIM reaches
        the home (the real worker), whose GRANT names holder, the worker that
        held cid before (-1: none). The frames the home sent.'''
        peer.send(frame(FR_CLAIM, struct.pack("<IB", token, clean) + bytes(3) + cid))  # no user name
        turns(wut)
        got = frames_from(peer)
        assert (FR_GRANT, struct.pack("<Ib", token, holder) + cid) in got, got
        return got

    def settled_alone(wut, c):
        '''Turns until c's CONNECT settled without its session: a new one.'''
        deadline = time.monotonic() + SETTLE_SECONDS
        while not c.received and time.monotonic() < deadline:
            wut.worker.run_once(SETTLE_WAIT_MS)
            c.drain()
        assert bytes(c.received) == CONNACK_NEW, bytes(c.received)

    def assert_taken_over(c):
        c.drain()
        assert not c.open, "B still open after its takeover"
        assert h.counter("TAKEOVERS") == 1

    # A persistent session's state as a worker sends it (session_state.pyx):
    # version 2, one subscription (t/x, QoS 1), next packet id 1, no message, no QoS 2 id.
    STATE = struct.pack("<BI", 2, 1) + struct.pack("<H", 3) + b"t/x\\x01" + struct.pack("<HI", 1, 0) \\
        + struct.pack("<I", 0)
    CONNACK_PRESENT = b"\\x20\\x02\\x01\\x00"      # accepted, session present
"""


def test_clean_session_ending_while_a_claim_of_its_worker_is_on_its_way():
    """A clean session's connection (A) ends on a worker while a later CONNECT
    (B) with its id, on that worker, waits for the home's answer. The end of
    A's session told the home to forget that worker, after B's claim had
    named it again: B, connected, was forgotten, and a CONNECT elsewhere did
    not close it. The home must still name the worker once B is connected."""
    run_worker_script(textwrap.dedent(PLAYED_PEER) + textwrap.dedent("""
        wut = WorkerUnderTest(h, nworkers=2, protos=("mqtt",), peer_answers=False)
        peer = wut.peers[1]
        registry = {}       # the home's record (worker 1 is c0's home), by registry.pyx's rules
        grants = []

        def home_reads():
            for ftype, body in frames_from(peer):
                if ftype == FR_CLAIM:
                    token, _clean = struct.unpack_from("<IB", body)
                    cid = body[8:]          # past the user field (anonymous: has 0, length 0)
                    prev = registry.get(cid, -1)
                    registry[cid] = 0
                    grants.append(frame(FR_GRANT, struct.pack("<Ib", token, prev) + cid))
                elif ftype == FR_RELEASE:
                    if registry.get(body[1:]) == body[0]:
                        del registry[body[1:]]

        def home_answers():
            for f in grants:
                peer.send(f)
            grants.clear()
            turns(wut)

        a = connected(wut, b"c0")
        home_reads()
        home_answers()
        a.drain()
        assert bytes(a.received) == CONNACK_NEW, bytes(a.received)
        b = connected(wut, b"c0", clean=False)
        home_reads()                # B's claim: the home names worker 0 (again); its GRANT is on its way
        a.close()                   # meanwhile A leaves: its clean session ends
        turns(wut)
        home_reads()
        home_answers()              # B's GRANT: worker 0 had it, B settles at once
        b.drain()
        assert bytes(b.received) == CONNACK_NEW, bytes(b.received)
        assert registry.get(b"c0") == 0, f"the home forgot that worker 0 holds c0: {registry}"
        # A client of worker 1 connects with c0: the home evicts worker 0's.
        peer.send(frame(FR_EVICT, struct.pack("<BIB", 1, 7, 1) + b"c0"))
        turns(wut)
        sessions = [body for ftype, body in frames_from(peer) if ftype == FR_SESSION]
        assert [struct.unpack_from("<I", s)[0] for s in sessions] == [7], sessions
        assert_taken_over(b)
        wut.close()
    """))


def test_connect_left_before_its_session_came_while_a_later_one_waits():
    """At c4's home: a CONNECT (P) takes the id over from worker 1 and waits
    for the session; its client resets the connection, which is closed then
    (it was not: epoll reported the hang-up every turn, and the loop spun). A later CONNECT (B) on the same
    worker waits behind P. The session comes (none: clean): P's settling
    without its client must not make the home forget the id's owner (B
    took it), so that the next CONNECT elsewhere (worker 1) closes B."""
    run_worker_script(textwrap.dedent(PLAYED_PEER) + textwrap.dedent("""
        wut = WorkerUnderTest(h, nworkers=2, protos=("mqtt",), peer_answers=False)
        peer = wut.peers[1]
        # Worker 1 holds c4: its client connected there.
        played_claim(wut, peer, 50, 1, b"c4", -1)
        p = connected(wut, b"c4")
        evicts = [body for ftype, body in frames_from(peer) if ftype == FR_EVICT]
        assert len(evicts) == 1, evicts
        _claimant, p_token, _clean = struct.unpack_from("<BIB", evicts[0])
        p.close(reset=True)         # gone before its session came
        turns(wut)
        assert (h.counter("CONNS_CURRENT"), h.counter("CLOSED_ERROR")) == (0, 1)    # noticed, closed
        b = connected(wut, b"c4", clean=False)
        b.drain()
        assert bytes(b.received) == b"", bytes(b.received)      # behind P
        # Worker 1 closed its client and hands over: no session (it was clean).
        peer.send(frame(FR_SESSION, struct.pack("<IBH", p_token, 0, 2) + b"c4"))
        turns(wut)
        b.drain()
        assert bytes(b.received) == CONNACK_NEW, bytes(b.received)
        frames_from(peer)
        # Worker 1's client connects with c4 again: B is taken over.
        got = played_claim(wut, peer, 51, 1, b"c4", 0)
        sessions = [body for ftype, body in got if ftype == FR_SESSION]
        assert [struct.unpack_from("<I", s)[0] for s in sessions] == [51], got
        assert_taken_over(b)
        wut.close()
    """))


def test_session_of_a_departed_connect_arriving_after_a_later_one_settled_alone():
    """As above, but B's session question is not answered within
    connect_settle_timeout: B settles as a new session. P's persistent session arrives after
    that: dropped and counted (B's client was told it has none). Kept, it was
    a second session of c4 on the worker, in B's place in the id's table, so
    B was no longer found: the next CONNECT elsewhere took over the stale one
    and left B open."""
    run_worker_script(textwrap.dedent(PLAYED_PEER) + textwrap.dedent("""
        import dataclasses
        from gw.worker import apply_limits
        wut = WorkerUnderTest(h, nworkers=2, protos=("mqtt",), peer_answers=False)
        # B's wait, shorter than by default (3 s): the setting reaches the worker.
        apply_limits(wut.worker, dataclasses.replace(h.cfg, connect_settle_timeout=0.3))
        assert wut.worker.settle_timeout_ms == 300
        peer = wut.peers[1]
        played_claim(wut, peer, 50, 0, b"c4", -1)
        p = connected(wut, b"c4", clean=False)
        evicts = [body for ftype, body in frames_from(peer) if ftype == FR_EVICT]
        assert len(evicts) == 1, evicts
        _claimant, p_token, _clean = struct.unpack_from("<BIB", evicts[0])
        p.close(reset=True)
        turns(wut)
        assert h.counter("CONNS_CURRENT") == 0
        b = connected(wut, b"c4", clean=False)
        settled_alone(wut, b)
        # Now worker 1's answer to P: the persistent session.
        peer.send(frame(FR_SESSION, struct.pack("<IBH", p_token, 1, 2) + b"c4" + STATE))
        turns(wut)
        b.stream += PINGREQ
        b.send(0)
        turns(wut)
        b.drain()
        assert bytes(b.received) == CONNACK_NEW + b"\\xd0\\x00", bytes(b.received)
        frames_from(peer)
        played_claim(wut, peer, 51, 0, b"c4", 0)
        assert_taken_over(b)
        assert h.counter("SESSIONS_LATE") == 1      # P's, dropped: B had settled without it
        assert h.counter("SESSIONS_AWAY") == 0
        wut.close()
    """))


def test_connect_whose_client_left_never_answered_settles_by_its_deadline():
    """A CONNECT (P) whose client reset the connection while it waited lost
    its settle timer with the connection. Never answered (the worker that
    held the session is gone or far behind), it waited forever, and so did
    every EVICT for its id queued behind it: a later connection with the id
    (B, settled on its own) was never closed by a takeover elsewhere. P
    settles by its deadline."""
    run_worker_script(textwrap.dedent(PLAYED_PEER) + textwrap.dedent("""
        import dataclasses
        from gw.worker import apply_limits
        wut = WorkerUnderTest(h, nworkers=2, protos=("mqtt",), peer_answers=False)
        apply_limits(wut.worker, dataclasses.replace(h.cfg, connect_settle_timeout=0.3))
        peer = wut.peers[1]
        played_claim(wut, peer, 50, 1, b"c4", -1)
        p = connected(wut, b"c4")
        assert [ftype for ftype, _body in frames_from(peer)] == [FR_EVICT]
        p.close(reset=True)
        turns(wut)
        assert h.counter("CONNS_CURRENT") == 0
        b = connected(wut, b"c4", clean=False)
        # Worker 1 never answers P. B settles on its own, P by its deadline (earlier than B's).
        settled_alone(wut, b)
        turns(wut)
        frames_from(peer)
        # Worker 1's client connects with c4: B is taken over.
        got = played_claim(wut, peer, 51, 1, b"c4", 0)
        assert [struct.unpack_from("<I", body)[0] for ftype, body in got if ftype == FR_SESSION] == [51], got
        assert_taken_over(b)
        wut.close()
    """))


def test_a_claim_by_another_user_waits_for_what_the_owner_holds():
    """Authentication on; at the home of the ids (worker 0, the real one),
    worker 1 (played) is on record for them, as alice. bob's CONNECT for one
    is not decided on that record: the home asks worker 1 (FR_CHECK) and
    waits. Its answer decides: its client had gone (its RELEASE first, then
    "nothing"): bob is in; it holds a session: bob is refused (0x05); no
    answer at all (worker 1 hung): refused within three quarters of
    connect_settle_timeout, before bob's CONNECT would settle alone as a new
    session. An answer to a check already settled is dropped."""
    run_worker_script(textwrap.dedent(PLAYED_PEER) + textwrap.dedent("""
        import dataclasses
        from zlib import crc32
        from gw.worker import apply_limits
        wut = WorkerUnderTest(h, nworkers=2, protos=("mqtt",), peer_answers=False)
        apply_limits(wut.worker, dataclasses.replace(h.cfg, connect_settle_timeout=0.4))
        wut.worker.auth_required = True
        peer = wut.peers[1]
        gone, kept, hung = [cid for cid in (b"c%d" % i for i in range(40)) if crc32(cid) % 2 == 0][:3]

        def user_field(name):
            return struct.pack("<BH", 1, len(name)) + name

        def connect_as(cid, user):
            body = (b"\\x00\\x04MQTT\\x04\\x82\\x00\\x3c" + struct.pack("!H", len(cid)) + cid
                    + struct.pack("!H", len(user)) + user)
            return bytes([0x10, len(body)]) + body

        def bob_asks(cid):
            '''bob connects with cid, on record for alice at worker 1: the home
            sends worker 1 a CHECK, and bob waits.'''
            peer.send(frame(FR_REGISTER, b"\\x01" + user_field(b"alice") + cid))
            turns(wut)
            c = Client(wut.ports["mqtt"])
            turns(wut)
            c.stream += connect_as(cid, b"bob")
            c.send(0)
            turns(wut)
            checks = [body for ftype, body in frames_from(peer) if ftype == FR_CHECK]
            assert len(checks) == 1 and checks[0][9:] == cid, checks
            check, claimant, _token = struct.unpack_from("<IBI", checks[0])
            assert claimant == 0
            c.drain()
            assert bytes(c.received) == b"", bytes(c.received)        # not decided on the record
            return c, check

        # alice's client on worker 1 has gone: its RELEASE, then its answer.
        c, check = bob_asks(gone)
        peer.send(frame(FR_RELEASE, b"\\x01" + gone) + frame(FR_CHECKED, struct.pack("<IB", check, 0) + gone))
        turns(wut)
        c.drain()
        assert bytes(c.received) == CONNACK_NEW, bytes(c.received)
        peer.send(frame(FR_CHECKED, struct.pack("<IB", check, 1) + gone))      # settled already: dropped
        turns(wut)
        c.drain()
        assert c.open and bytes(c.received) == CONNACK_NEW
        # alice's session is still on worker 1: refused.
        c, check = bob_asks(kept)
        peer.send(frame(FR_CHECKED, struct.pack("<IB", check, 1) + kept))
        turns(wut)
        c.drain()
        assert bytes(c.received) == b"\\x20\\x02\\x00\\x05" and not c.open, bytes(c.received)
        # Worker 1 never answers: refused before bob's own settle timeout.
        c, check = bob_asks(hung)
        deadline = time.monotonic() + SETTLE_SECONDS
        while c.open and time.monotonic() < deadline:
            wut.worker.run_once(SETTLE_WAIT_MS)
            c.drain()
        assert bytes(c.received) == b"\\x20\\x02\\x00\\x05", bytes(c.received)
        assert h.counter("AUTH_REFUSED_TAKEOVER") == 2
        wut.close()
    """))


def test_takeover_waiting_behind_a_connect_is_not_queued_behind_a_later_one():
    """At c4's home (worker 0, the real one), three CONNECTs take c4 in turn:
    P here (from worker 1, which held the persistent session), then worker 1's
    client again (its EVICT waits here behind P, which is still waiting for
    the session), then Q here (from worker 1 again, whose answer waits there
    behind its own CONNECT). P's session comes: P gets its CONNACK and hands
    the session on to worker 1 at once. That hand-over was queued behind Q,
    granted after it, which waited for worker 1, which waited for the hand-over:
    each worker's CONNECT settled alone at connect_settle_timeout, and the
    session coming late was dropped."""
    run_worker_script(textwrap.dedent(PLAYED_PEER) + textwrap.dedent("""
        wut = WorkerUnderTest(h, nworkers=2, protos=("mqtt",), peer_answers=False)
        assert wut.worker.settle_timeout_ms >= 3000     # no turn below comes near it
        peer = wut.peers[1]
        # Worker 1 holds c4's persistent session.
        played_claim(wut, peer, 50, 0, b"c4", -1)
        p = connected(wut, b"c4", clean=False)
        evicts = [body for ftype, body in frames_from(peer) if ftype == FR_EVICT]
        assert len(evicts) == 1, evicts
        p_token = struct.unpack_from("<BIB", evicts[0])[1]
        # Worker 1's client connects again: the home names worker 0, whose
        # hand-over waits for P's session.
        got = played_claim(wut, peer, 51, 0, b"c4", 0)
        assert FR_SESSION not in [ftype for ftype, _body in got], got
        # Q here: worker 1 holds it now (its answer waits behind its CONNECT 51).
        q = connected(wut, b"c4", clean=False)
        evicts = [body for ftype, body in frames_from(peer) if ftype == FR_EVICT]
        assert len(evicts) == 1, evicts
        q_token = struct.unpack_from("<BIB", evicts[0])[1]
        # P's session comes: P gets it, then worker 1's CONNECT takes it over.
        peer.send(frame(FR_SESSION, struct.pack("<IBH", p_token, 1, 2) + b"c4" + STATE))
        turns(wut)
        sessions = [body for ftype, body in frames_from(peer) if ftype == FR_SESSION]
        assert [struct.unpack_from("<IB", s) for s in sessions] == [(51, 1)], sessions
        p.drain()
        assert bytes(p.received) == CONNACK_PRESENT and not p.open, (bytes(p.received), p.open)
        # Worker 1's CONNECT settled; its answer to Q's EVICT: the session again.
        peer.send(frame(FR_SESSION, struct.pack("<IBH", q_token, 1, 2) + b"c4" + STATE))
        turns(wut)
        q.drain()
        assert bytes(q.received) == CONNACK_PRESENT and q.open, (bytes(q.received), q.open)
        assert h.counter("TAKEOVERS") == 1
        assert h.counter("SESSIONS_LATE") == 0
        wut.close()
    """))


def test_connects_on_one_worker_take_over_in_turn_when_the_session_comes():
    """As above on one worker: P waits for c4's session from worker 1; B then C,
    here, each wait behind the one before. When the session comes, P, B and C
    each get it in turn (CONNACK, then taken over), at once: B's takeover of
    P waited for C, which waited for B, until connect_settle_timeout."""
    run_worker_script(textwrap.dedent(PLAYED_PEER) + textwrap.dedent("""
        wut = WorkerUnderTest(h, nworkers=2, protos=("mqtt",), peer_answers=False)
        assert wut.worker.settle_timeout_ms >= 3000
        peer = wut.peers[1]
        played_claim(wut, peer, 50, 0, b"c4", -1)
        p = connected(wut, b"c4", clean=False)
        evicts = [body for ftype, body in frames_from(peer) if ftype == FR_EVICT]
        assert len(evicts) == 1, evicts
        p_token = struct.unpack_from("<BIB", evicts[0])[1]
        b = connected(wut, b"c4", clean=False)
        c = connected(wut, b"c4", clean=False)
        for x in (p, b, c):
            x.drain()
            assert bytes(x.received) == b"", bytes(x.received)
        peer.send(frame(FR_SESSION, struct.pack("<IBH", p_token, 1, 2) + b"c4" + STATE))
        turns(wut)
        for x in (p, b, c):
            x.drain()
        got = [(bytes(x.received), x.open) for x in (p, b, c)]
        assert got == [(CONNACK_PRESENT, False), (CONNACK_PRESENT, False), (CONNACK_PRESENT, True)], got
        assert h.counter("TAKEOVERS") == 2
        assert h.counter("SESSIONS_LATE") == 0
        # The id stayed here: nothing for its home (its subscription's interest, announced, aside).
        left = [ftype for ftype, _body in frames_from(peer)
                if ftype in (FR_CLAIM, FR_EVICT, FR_SESSION, FR_RELEASE, FR_REGISTER)]
        assert left == [], left
        wut.close()
    """))


def test_connect_at_once_then_a_stale_evict_then_the_home_order():
    """c0's home is worker 1 (played). A clean CONNECT here (X) is answered in
    its own turn, before its home has seen its claim; so is the next one (A),
    which takes X over here. Worker 1's client (B) claimed c0 at the home
    before A's claim got there: the home, which had X on record, evicts
    worker 0 for B. That EVICT names X, which A has already taken over: A
    stays, B gets no session. Then the home processes A's claim: it names
    worker 1 (B), and evicts B there. A later claim (C) then takes A over."""
    run_worker_script(textwrap.dedent(PLAYED_PEER) + textwrap.dedent("""
        wut = WorkerUnderTest(h, nworkers=2, protos=("mqtt",), peer_answers=False)
        assert wut.worker.connect_at_once
        peer = wut.peers[1]

        def claims():
            got = []
            for ftype, body in frames_from(peer):
                if ftype == FR_CLAIM:
                    got.append((struct.unpack_from("<I", body)[0], body[8:]))
            return got

        x = connected(wut, b"c0")
        x.drain()
        assert bytes(x.received) == CONNACK_NEW, bytes(x.received)      # before any GRANT
        assert h.counter("CONNECTS_AT_ONCE") == 1
        [(x_token, cid)] = claims()
        assert cid == b"c0"
        peer.send(frame(FR_GRANT, struct.pack("<Ib", x_token, -1) + b"c0"))     # the home: X, new
        turns(wut)
        a = connected(wut, b"c0")
        a.drain()
        x.drain()
        assert bytes(a.received) == CONNACK_NEW and a.open and not x.open
        [(a_token, _cid)] = claims()
        # B's claim reached the home first: worker 0 (X on record) is evicted for it.
        peer.send(frame(FR_EVICT, struct.pack("<BIB", 1, 900, 1) + b"c0"))
        turns(wut)
        a.drain()
        assert a.open, "A was taken over by an EVICT that named the connection it replaced"
        assert h.counter("EVICTS_STALE") == 1
        sessions = [body for ftype, body in frames_from(peer) if ftype == FR_SESSION]
        assert [struct.unpack_from("<IB", s) for s in sessions] == [(900, 0)], sessions
        # The home now processes A's claim (B on record: evicted over there).
        peer.send(frame(FR_GRANT, struct.pack("<Ib", a_token, 1) + b"c0"))
        turns(wut)
        a.stream += PINGREQ
        a.send(0)
        turns(wut)
        a.drain()
        assert bytes(a.received) == CONNACK_NEW + b"\\xd0\\x00" and a.open
        # C, on worker 1, claims c0 after A: A is taken over.
        peer.send(frame(FR_EVICT, struct.pack("<BIB", 1, 901, 1) + b"c0"))
        turns(wut)
        a.drain()
        assert not a.open, "A still open after a takeover the home ordered after it"
        sessions = [body for ftype, body in frames_from(peer) if ftype == FR_SESSION]
        assert [struct.unpack_from("<IB", s) for s in sessions] == [(901, 0)], sessions
        assert h.counter("EVICTS_STALE") == 1
        assert h.counter("SESSIONS_LATE") == 0
        wut.close()
    """))


def test_connect_at_once_only_for_clean_sessions_and_when_enabled():
    """A clean_session=0 CONNECT whose id's home is the other worker waits for
    the home (its session and session present come from the previous owner);
    with connect_at_once off, a clean one waits too."""
    run_worker_script(textwrap.dedent(PLAYED_PEER) + textwrap.dedent("""
        wut = WorkerUnderTest(h, nworkers=2, protos=("mqtt",), peer_answers=False)
        peer = wut.peers[1]
        p = connected(wut, b"c0", clean=False)
        p.drain()
        assert bytes(p.received) == b"", bytes(p.received)
        [body] = [body for ftype, body in frames_from(peer) if ftype == FR_CLAIM]
        peer.send(frame(FR_GRANT, struct.pack("<Ib", struct.unpack_from("<I", body)[0], -1) + b"c0"))
        turns(wut)
        p.drain()
        assert bytes(p.received) == CONNACK_NEW, bytes(p.received)
        wut.worker.connect_at_once = False
        q = connected(wut, b"c2")       # c2's home: worker 1 too
        q.drain()
        assert bytes(q.received) == b"", bytes(q.received)
        [body] = [body for ftype, body in frames_from(peer) if ftype == FR_CLAIM]
        assert body[8:] == b"c2"
        peer.send(frame(FR_GRANT, struct.pack("<Ib", struct.unpack_from("<I", body)[0], -1) + b"c2"))
        turns(wut)
        q.drain()
        assert bytes(q.received) == CONNACK_NEW, bytes(q.received)
        assert h.counter("CONNECTS_AT_ONCE") == 0
        wut.close()
    """))
