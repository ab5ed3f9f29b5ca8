# Included by loop.pyx. MQTT publishes on the telemetry topics
# (`{telemetry_topic}/{device_id}`, one level: what `telemetry/+` matches) go
# through the same schema as HTTP ingest (gw/ingest.py, `Ingest.mqtt`): a valid
# reading is routed in its normalised form (the server's ts filled in), so
# subscribers see one shape whichever way a reading came in; an invalid one is
# not routed, and is counted (TELEMETRY_MQTT_REJECTED) and logged. MQTT 3.1.1
# has no negative acknowledgement, so a QoS 1/2 publisher still gets its
# PUBACK/PUBREC: the reading was received, and refused.

cdef inline bint is_telemetry_topic(Worker w, const uint8_t* topic, uint32_t n) noexcept:
    cdef Py_ssize_t plen = PyBytes_GET_SIZE(w.telemetry_prefix)
    if plen == 0 or n <= plen or memcmp(topic, PyBytes_AS_STRING(w.telemetry_prefix), plen) != 0:
        return False
    return memchr(topic + plen, 47, n - plen) == NULL


cdef enum:
    TELEMETRY_INVALID = -2    # refused by the schema: not routed, acknowledged
    TELEMETRY_REFUSED = -1    # the log could not take it: not routed, not acknowledged


cdef bytes telemetry_accept(Worker w, const uint8_t* topic, uint32_t topic_len, const uint8_t* payload,
                           uint32_t payload_len, int64_t* end):
    """Validates a reading (gw/ingest.py) and takes it (ingest.pyx: into the
    write-ahead log). Returns it normalised, for the caller to route once it
    has answered the publisher, with *end its end offset in the log (what its
    acknowledgement waits for in ack mode sink; 0 without a log); or None with
    *end TELEMETRY_INVALID or TELEMETRY_REFUSED."""
    cdef Py_ssize_t plen = PyBytes_GET_SIZE(w.telemetry_prefix)
    cdef bytes device = PyBytes_FromStringAndSize(<char*>topic + plen, topic_len - plen)
    cdef object normalised
    cdef IngestBatch b
    end[0] = 0
    try:
        normalised = w.ingest.mqtt(device, PyBytes_FromStringAndSize(<char*>payload, payload_len))
    except Exception:
        w.log_limited(CR_PYTHON, "telemetry validation failed unexpectedly; reading not routed")
        end[0] = TELEMETRY_INVALID
        return None
    if normalised is None:
        w.log_limited(CR_TELEMETRY, "an MQTT reading on %s failed the telemetry schema; not routed"
                      % PyBytes_FromStringAndSize(<char*>topic, topic_len).decode("utf-8", "replace"))
        end[0] = TELEMETRY_INVALID
        return None
    b.end = 0
    b.duplicates = 0
    b.pending_here = False
    if ingest_reading(w, device, None, <bytes?>normalised, False, False, False, -1, &b) < 0:
        end[0] = TELEMETRY_REFUSED
        return None
    end[0] = b.end
    return normalised
