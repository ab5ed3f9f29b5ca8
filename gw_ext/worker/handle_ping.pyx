# Included by loop.pyx. PINGREQ: answered with PINGRESP. What keeps the
# connection alive is not here: every complete packet, a PINGREQ as much as a
# PUBLISH, stores its arrival time (Conn.last_rx_ms), which the keepalive timer
# checks (keepalive.pyx).

cdef int handle_ping(Worker w, Conn* c):
    return w.send_empty(c, PINGRESP)
