# Included by loop.pyx. Every deadline a connection has, on the worker's timing
# wheel (gw_ext/wheel.pyx: one TimerNode per connection, the first member of
# its Conn, so a connection has one deadline at a time):
#
#   accepted -> connect_timeout (the TLS handshake and the CONNECT, or an HTTP
#               request, must arrive within it)
#   CONNECT read, its session settling across workers -> connect_settle_timeout
#               (registry.pyx; then it settles as a new session)
#   connected -> MQTT: 1.5 x the keepalive it asked for (MQTT-3.1.2-24; 0: none);
#               JSON lines: json_timeout
#   closing (flushing its last bytes) -> CLOSE_GRACE_MS
#   HTTP: http_timeout, the keep-alive idle time, the lingering close and the
#         drain grace are scheduled by http.pyx and fire in http_on_timer.
#
# Packets do not touch the wheel: the framing only stores when the last
# complete packet arrived (Conn.last_rx_ms, Worker.process_mqtt and
# process_json_lines); when the timer fires, on_timer reschedules it if the
# connection was active since, so the per-packet cost is one store. A PINGREQ
# is such a packet like any other (handle_ping.pyx).

cdef enum:
    CLOSE_GRACE_MS = 2000     # how long a closing connection may take to flush


cdef inline uint32_t mqtt_idle_limit_ms(uint16_t keepalive) noexcept nogil:
    """How long a connected MQTT client may stay silent, in ms: 1.5 x its
    keepalive, which is in seconds (MQTT-3.1.2-24); 0 (no limit) for 0."""
    return <uint32_t>keepalive * 1500


cdef void become_connected(Worker w, Conn* c, uint32_t timeout_ms):
    """CONNECT accepted: from now on the idle timeout applies instead of the
    connect timeout (0 disables it)."""
    c.state = ST_CONNECTED
    c.timeout_ms = timeout_ms
    c.last_rx_ms = w.now_ms
    w.counters[SESSIONS_CURRENT] += 1
    if timeout_ms:
        wheel_schedule(&w.wheel, &c.timer, w.now_ms + timeout_ms)
    else:
        wheel_cancel(&w.wheel, &c.timer)


cdef inline void schedule_connect_timeout(Worker w, Conn* c) noexcept:
    """A new socket: the connect timeout covers the TLS handshake and the CONNECT."""
    wheel_schedule(&w.wheel, &c.timer, w.now_ms + w.connect_timeout_ms)


cdef inline void schedule_settle_timeout(Worker w, Conn* c) noexcept:
    wheel_schedule(&w.wheel, &c.timer, w.now_ms + w.settle_timeout_ms)


cdef inline void schedule_close_grace(Worker w, Conn* c) noexcept:
    wheel_schedule(&w.wheel, &c.timer, w.now_ms + CLOSE_GRACE_MS)


cdef void on_timer(Worker w, Conn* c):
    """A connection's deadline passed (Worker.run_timers)."""
    cdef uint64_t deadline
    if c.flags & F_RATE_PAUSED and rate_hold_timer(w, c):
        return      # not read because of a rate limit: not the client's silence (rate_limits.pyx)
    if c.store_flags & SF_HELD and store_hold_timer(w, c):
        return      # not read while the store is behind: not the client's silence (backpressure.pyx)
    if c.state == ST_CONNECTED:
        deadline = c.last_rx_ms + c.timeout_ms
        if deadline > w.now_ms:
            wheel_schedule(&w.wheel, &c.timer, deadline)     # it was active
        else:
            w.close_conn(c, CR_TIMEOUT)
    elif c.state == ST_CLOSING:
        w.close_conn(c, c.close_reason, c.close_detail)      # could not flush in time
    elif c.state == ST_SETTLING and c.pending_token == 0:
        # Held for its password check (auth.pyx) past the connect timeout: the
        # auth threads are that far behind. Told so as when too many wait
        # (CONNACK 0x03 / 0x88, the JSON busy Error), then closed; the check's
        # answer will find it gone.
        auth_refuse(w, c, CONNACK_UNAVAILABLE, AUTH_LOG_BUSY)
    elif c.state == ST_SETTLING:
        # The worker that held its session did not answer (it died): start afresh.
        w.log_limited(CR_CHANNEL, "a CONNECT's session could not be settled in time; new session")
        connect_settle(w, c.pending_token, None)
    elif c.state == ST_AWAIT_CONNECT and c.proto == PROTO_HTTP:
        http_on_timer(w, c)
    elif c.state == ST_TLS_HANDSHAKE or c.state == ST_AWAIT_CONNECT:
        w.close_conn(c, CR_CONNECT_TIMEOUT)
