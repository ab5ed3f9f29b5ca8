# Included by loop.pyx. An accepted reading has one owner, whatever brought it
# in: HTTP ingest (http.pyx), an MQTT publish on the telemetry topics
# (telemetry.pyx) or a JSON-lines Data message (jsonlines.pyx). Python
# (gw/ingest.py, `Ingest`) validates it against the schema and hands back its
# normalised JSON; here it is checked against the idempotency table (HTTP:
# `(device_id, seq)`; MQTT has its own QoS for redelivery, JSON lines none),
# appended to the write-ahead log and routed on `{telemetry_topic}/{device_id}`;
# the end offset it returns is what an answer in ack mode sink waits for
# (durable_ack.pyx). The transports only frame their answer.

cdef extern from "wal_records.h":
    const int GW_WAL_REC_HDR          # the log's record header, bytes

cdef enum IngestOutcome:
    INGEST_TAKEN = 0            # appended (with a log) and routed
    INGEST_DUPLICATE = 1        # seen before: acknowledged, neither appended nor routed again
    INGEST_LOG_FULL = -1        # the log refused it (counted): not acknowledged
    INGEST_IN_PROGRESS = -2     # another worker's first copy is not durable yet (ack mode sink)

cdef enum:
    INGEST_TOPIC_STACK = 256    # a routing topic up to this long is built on the stack


cdef int ingest_reading(Worker w, bytes device, object seq, bytes reading, bint idempotent, bint sink,
                        bint room_checked, int route_qos, IngestBatch* b) except -3:
    """Takes one normalised reading: the idempotency table (when `idempotent`
    and it has a seq), the log, then routing on {telemetry_topic}/{device} at
    route_qos (-1: the caller routes it, after answering). b.end grows to the
    reading's end offset in the log; b.pending_here is set for a duplicate
    whose first copy is in this worker's log, maybe not durable yet."""
    cdef int seen
    cdef int64_t end = 0
    cdef bint recorded = False
    if idempotent and seq is not None and w.dedup is not None:
        seen = w.dedup.seen_c(<const uint8_t*>PyBytes_AS_STRING(device), <size_t>PyBytes_GET_SIZE(device),
                              <uint64_t>seq, w.now_ms)
        if seen == GWD_NEW:
            recorded = True
        elif seen == GWD_DUPLICATE:
            return INGEST_DUPLICATE         # the first copy is durable: nothing to wait for
        elif seen == GWD_PENDING_HERE:
            b.pending_here = True           # the first copy is in our log, maybe not durable
            return INGEST_DUPLICATE
        elif seen == GWD_PENDING_ELSEWHERE:
            if sink:
                # Another worker has the first copy and not on disk yet; it may still
                # be lost: no 200 for it before it is durable. The client retries.
                w.counters[INGEST_RECORDS_PENDING] += 1
                return INGEST_IN_PROGRESS
            return INGEST_DUPLICATE         # enqueue: acknowledged once in a log's buffer, as the first was
        else:
            w.counters[DEDUP_FULL] += 1     # not recorded (the table is full there): taken
    if w.wal is not None:
        end = wal_append(w, <const uint8_t*>PyBytes_AS_STRING(reading), <uint32_t>PyBytes_GET_SIZE(reading),
                         room_checked)
        if end < 0:     # the log failed (for HTTP: between the room check and the append)
            if recorded:
                w.dedup.abandon_c()
            return INGEST_LOG_FULL
        b.end = end
    if recorded:
        w.dedup.commit_at_c(<uint64_t>end)  # seen for good once the log is durable past it
    if route_qos >= 0:
        ingest_route(w, device, reading, <uint8_t>route_qos)
    return INGEST_TAKEN


cdef void ingest_route(Worker w, bytes device, bytes reading, uint8_t qos) except *:
    """Routes a reading on {telemetry_topic}/{device} to every worker."""
    cdef char[INGEST_TOPIC_STACK] stack
    cdef Py_ssize_t plen = PyBytes_GET_SIZE(w.telemetry_prefix)
    cdef Py_ssize_t dlen = PyBytes_GET_SIZE(device)
    cdef bytes joined
    cdef const uint8_t* topic
    if plen + dlen <= INGEST_TOPIC_STACK:
        memcpy(stack, PyBytes_AS_STRING(w.telemetry_prefix), plen)
        memcpy(stack + plen, PyBytes_AS_STRING(device), dlen)
        topic = <const uint8_t*>stack
    else:
        joined = w.telemetry_prefix + device
        topic = <const uint8_t*>PyBytes_AS_STRING(joined)
    route_publish(w, topic, <uint32_t>(plen + dlen), <const uint8_t*>PyBytes_AS_STRING(reading),
                  <uint32_t>PyBytes_GET_SIZE(reading), qos, False, True, w.now_ns, NULL, 0)


cdef int ingest_records(Worker w, list records, bint sink, IngestBatch* b) except -3:
    """The readings of one HTTP request, [(device_id, seq, normalised JSON)]:
    room in the log for all of them is checked first (so a refusal leaves no
    trace in the idempotency table), then each is taken in order and routed
    at QoS 1. Returns INGEST_TAKEN with b.duplicates, or the refusal that
    stopped the request (what was taken before it in a batch stays, and is a
    duplicate when the batch is sent again). Counted: accepted, duplicates."""
    cdef Py_ssize_t n = len(records), room = 0
    cdef int r = INGEST_TAKEN, taken = 0
    cdef tuple rec
    for rec in records:
        room += PyBytes_GET_SIZE(<bytes>rec[2]) + GW_WAL_REC_HDR
    room -= GW_WAL_REC_HDR                  # the log adds one record's header itself
    if n == 0 or not wal_room(w, <int>room if room < 0x7fffffff else 0x7fffffff):
        return INGEST_LOG_FULL if n else INGEST_TAKEN
    for rec in records:
        r = ingest_reading(w, <bytes>rec[0], rec[1], <bytes>rec[2], True, sink, True, 1, b)
        if r == INGEST_TAKEN:
            taken += 1
        elif r == INGEST_DUPLICATE:
            b.duplicates += 1
        else:
            break
    if b.pending_here and w.wal is not None:
        b.end = <int64_t>w.wal.appended_c()     # its answer waits past the first copies
    w.counters[INGEST_RECORDS_ACCEPTED] += taken
    if b.duplicates and r >= 0:
        w.counters[INGEST_RECORDS_DUPLICATE] += b.duplicates
    return r if r < 0 else INGEST_TAKEN
