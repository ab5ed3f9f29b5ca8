# Included by loop.pyx. DISCONNECT: a clean goodbye, so the will is discarded
# (MQTT-3.14.4-3): the connection closes for CR_DISCONNECT, which
# Worker.finish_close passes on to session_detach (sessions.pyx) as graceful.

cdef int handle_disconnect(Worker w, Conn* c):
    w.close_conn(c, CR_DISCONNECT)
    return -1
