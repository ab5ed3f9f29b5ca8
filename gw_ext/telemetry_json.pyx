# cython: language_level=3
"""Decoded telemetry records normalised to their published JSON in C (the
accepting path of gw/ingest.py's `Ingest.batch` and `Ingest.mqtt`).

gw/ingest.py decodes a body with msgspec's typed decoder, then checks what the
types cannot express (device id and key patterns, U+0000), fills in `ts` and
encodes a `Telemetry` per record: about 1.8 us of Python objects and calls
per reading, a fifth of a core at 100,000 readings/s. Here the same checks
run over the decoded structs in C and each record's JSON is written straight
into one buffer, byte for byte what msgspec writes for the `Telemetry`:

    {"device_id":"...","ts":"YYYY-MM-DDTHH:MM:SS[.ffffff]Z","seq":N|null,
     "metrics":{"name":number,...},"tags":{...},"payload":<the raw JSON>}

numbers as msgspec writes a double (the shortest text that reads back, in
msgspec's layout: `1e16`, `0.00001`, `1e-7`), tags through the caller's
encoder when a string would need an escape.

Anything off the common path (a check that fails, a `ts` that needs its time
zone converted or is a number, a payload that might hold `\\u0000`, a string
that is not valid UTF-8) makes the function return None: the caller then runs
the Python path over the whole input, which words every error exactly as
before. So the result is the reference's or nothing, never a third answer
(tests/test_telemetry_json.py holds the two to each other).
"""

from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE
from cpython.datetime cimport (import_datetime, datetime, datetime_tzinfo, PyDateTime_CheckExact,
                               PyDateTime_GET_YEAR, PyDateTime_GET_MONTH, PyDateTime_GET_DAY,
                               PyDateTime_DATE_GET_HOUR, PyDateTime_DATE_GET_MINUTE,
                               PyDateTime_DATE_GET_SECOND, PyDateTime_DATE_GET_MICROSECOND)
from cpython.dict cimport PyDict_Next
from cpython.float cimport PyFloat_AS_DOUBLE
from cpython.long cimport PyLong_AsLongLong
from cpython.mem cimport PyMem_Free
from cpython.object cimport PyObject
from libc.math cimport isfinite, nearbyint, signbit
from libc.stdint cimport int64_t
from libc.stdlib cimport realloc, free, strtol
from libc.string cimport memcpy, memchr

from datetime import timezone

import_datetime()

cdef extern from "Python.h":
    const char *PyUnicode_AsUTF8AndSize(object s, Py_ssize_t *size) except NULL
    char *PyOS_double_to_string(double val, char format_code, int precision, int flags, int *ptype) except NULL

cdef object UTC = timezone.utc

cdef enum:
    DEVICE_MAX = 64          # the device id's length, at most (the decoder checks it in characters)
    KEY_MAX = 32             # a metric or tag key's length, at most
    F64_MAX = 32             # one double's text, at most (msgspec writes at most 24)
    TS_MAX = 32              # "YYYY-MM-DDTHH:MM:SS.ffffffZ" with its quotes: 29
    INT_MAX_TEXT = 24        # a seq in [0, 2**63-1]: 19 digits

cdef double POW10[10]
POW10[:] = [1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9]


# --- the output buffer -----------------------------------------------------------------

cdef struct Out:
    char *p
    Py_ssize_t n, cap


cdef int reserve(Out *o, Py_ssize_t more) except -1:
    """Room for `more` bytes at o.p + o.n (more is bounded by the caller's input)."""
    cdef Py_ssize_t need = o.n + more, cap
    cdef char *p
    if need <= o.cap:
        return 0
    cap = o.cap * 2 if o.cap else 1024
    while cap < need:
        cap *= 2
    p = <char *>realloc(o.p, cap)
    if p == NULL:
        raise MemoryError()
    o.p = p
    o.cap = cap
    return 0


cdef inline void put(Out *o, const char *s, Py_ssize_t n):
    """n bytes, room for them reserved before."""
    memcpy(o.p + o.n, s, n)
    o.n += n


# --- the checks (gw/ingest.py's patterns) ------------------------------------------------

cdef inline bint is_lower_digit_us(unsigned char c):
    return (97 <= c <= 122) or (48 <= c <= 57) or c == 95


cdef bint key_ok(const char *s, Py_ssize_t n):
    """^[a-z][a-z0-9_]{0,31}$ (KEY_PATTERN) on the key's UTF-8 bytes."""
    cdef Py_ssize_t i
    if n < 1 or n > KEY_MAX or not (97 <= <unsigned char>s[0] <= 122):
        return False
    for i in range(1, n):
        if not is_lower_digit_us(<unsigned char>s[i]):
            return False
    return True


cdef bint device_ok(const char *s, Py_ssize_t n):
    """^[A-Za-z0-9_-]{1,64}$ (DEVICE_ID_PATTERN) on the id's UTF-8 bytes."""
    cdef Py_ssize_t i
    cdef unsigned char c
    if n < 1 or n > DEVICE_MAX:
        return False
    for i in range(n):
        c = <unsigned char>s[i]
        if not ((65 <= c <= 90) or (97 <= c <= 122) or (48 <= c <= 57) or c == 95 or c == 45):
            return False
    return True


# --- numbers and times as msgspec writes them ------------------------------------------------

cdef Py_ssize_t layout(char *out, const char *digits, int length, int kk):
    """msgspec's layout of a double (ryu.h write_f64) from its shortest digits
    (no sign, no leading or trailing zero) and kk, the position of the decimal
    point (value = 0.digits x 10^kk): fixed for -5 < kk <= 16, else d.ddde[-]x."""
    cdef int i, n = 0, e
    if length <= kk <= 16:                    # XYZ00.0
        memcpy(out, digits, length)
        for i in range(length, kk):
            out[i] = 48
        out[kk] = 46
        out[kk + 1] = 48
        return kk + 2
    if 0 < kk <= 16:                          # XY.Z
        memcpy(out, digits, kk)
        out[kk] = 46
        memcpy(out + kk + 1, digits + kk, length - kk)
        return length + 1
    if -5 < kk <= 0:                          # 0.0XYZ
        out[0] = 48
        out[1] = 46
        n = 2
        for i in range(-kk):
            out[n] = 48
            n += 1
        memcpy(out + n, digits, length)
        return n + length
    out[0] = digits[0]                        # X.YZe123, Xe123
    n = 1
    if length > 1:
        out[1] = 46
        memcpy(out + 2, digits + 1, length - 1)
        n = length + 1
    out[n] = 101
    n += 1
    e = kk - 1
    if e < 0:
        out[n] = 45
        n += 1
        e = -e
    if e >= 100:
        out[n] = 48 + e // 100
        n += 1
    if e >= 10:
        out[n] = 48 + (e // 10) % 10
        n += 1
    out[n] = 48 + e % 10
    return n + 1


cdef Py_ssize_t put_f64(char *out, double v) except -1:
    """v's JSON text as msgspec writes it (at most F64_MAX bytes at out): null
    when not finite; else the shortest digits that read back as v, found
    directly for a decimal of up to 9 fraction digits below 2^50 (sensor values),
    else from Python's repr (the same shortest digits: both round correctly)."""
    cdef char digits[F64_MAX]
    cdef char *s
    cdef char *p
    cdef int d, length = 0, kk = 0, k, lead, intlen, i
    cdef int64_t q
    cdef double x, p10
    cdef Py_ssize_t sign = 0
    if not isfinite(v):
        memcpy(out, b"null", 4)
        return 4
    if signbit(v):
        out[0] = 45
        sign = 1
        v = -v
    if v == 0.0:
        memcpy(out + sign, b"0.0", 3)
        return sign + 3
    for d in range(10):
        p10 = POW10[d]
        x = v * p10
        if not (x < 1125899906842624.0):
            break                             # 2^50: below it at most one such decimal reads back as v
        x = nearbyint(x)
        if x == 0.0 or x / p10 != v:
            continue
        # v is the double nearest to q / 10^d: its shortest digits are q's
        # without trailing zeros (fewer fraction digits did not read back).
        q = <int64_t>x
        k = 0
        while q:
            digits[k] = 48 + <char>(q % 10)
            q //= 10
            k += 1
        intlen = k - d                        # digits before the point (<= 0: none)
        for i in range(k // 2):               # most significant first
            digits[i], digits[k - 1 - i] = digits[k - 1 - i], digits[i]
        while k > 1 and digits[k - 1] == 48:
            k -= 1
        return sign + layout(out + sign, digits, k, intlen)
    s = PyOS_double_to_string(v, 114, 0, 0, NULL)        # 'r': "1.2345e+17", "123.45", "1e-07"
    try:
        p = s
        lead = -1                             # digits before '.', once seen
        while p[0] and p[0] != 101:           # up to 'e'
            if p[0] == 46:
                lead = length
            elif length or p[0] != 48:        # leading zeros are not digits
                if length < F64_MAX - 1:
                    digits[length] = p[0]
                    length += 1
            elif lead >= 0:
                kk -= 1                       # a zero after "0.": the point moves right
            p += 1
        if lead < 0:
            lead = length
        if lead > 0 and s[0] != 48:
            kk = lead
        if p[0] == 101:
            kk += <int>strtol(p + 1, NULL, 10)      # "+16", "-07"
        while length > 1 and digits[length - 1] == 48:
            length -= 1
        return sign + layout(out + sign, digits, length, kk)
    finally:
        PyMem_Free(s)


cdef inline void two(char *out, int v):
    out[0] = 48 + v // 10
    out[1] = 48 + v % 10


cdef Py_ssize_t put_utc(char *out, datetime dt):
    """An aware UTC datetime quoted as msgspec writes it: "YYYY-MM-DDTHH:MM:SS[.ffffff]Z"."""
    cdef int y = PyDateTime_GET_YEAR(dt), us = PyDateTime_DATE_GET_MICROSECOND(dt), i
    out[0] = 34
    out[1] = 48 + y // 1000
    out[2] = 48 + (y // 100) % 10
    out[3] = 48 + (y // 10) % 10
    out[4] = 48 + y % 10
    out[5] = 45
    two(out + 6, PyDateTime_GET_MONTH(dt))
    out[8] = 45
    two(out + 9, PyDateTime_GET_DAY(dt))
    out[11] = 84
    two(out + 12, PyDateTime_DATE_GET_HOUR(dt))
    out[14] = 58
    two(out + 15, PyDateTime_DATE_GET_MINUTE(dt))
    out[17] = 58
    two(out + 18, PyDateTime_DATE_GET_SECOND(dt))
    if us == 0:
        out[20] = 90
        out[21] = 34
        return 22
    out[20] = 46
    for i in range(6):
        out[26 - i] = 48 + us % 10
        us //= 10
    out[27] = 90
    out[28] = 34
    return 29


# --- one record -------------------------------------------------------------------------

cdef int put_record(Out *o, object rec, const char *dev, Py_ssize_t dev_len, const char *now_ts,
                    Py_ssize_t now_len, object ts_text, object encode) except -2:
    """rec's published JSON appended to o: 0, or 1 when rec is off the common
    path (o.n is then left where it was)."""
    cdef Py_ssize_t start = o.n, pos = 0, n
    cdef PyObject *key
    cdef PyObject *value
    cdef const char *s
    cdef object ts = rec.ts, seq = rec.seq, metrics = rec.metrics, tags = rec.tags, payload = rec.payload
    cdef object text
    cdef bint first
    cdef Py_buffer view
    reserve(o, 96 + dev_len + TS_MAX + INT_MAX_TEXT)
    put(o, b'{"device_id":"', 14)
    put(o, dev, dev_len)
    put(o, b'","ts":', 7)
    if ts is None:
        put(o, now_ts, now_len)
    elif PyDateTime_CheckExact(ts) and datetime_tzinfo(<datetime>ts) is UTC:
        o.n += put_utc(o.p + o.n, <datetime>ts)
    else:
        text = ts_text(ts)                   # a number or another zone: gw/ingest.py's normalise_ts
        if text is None or PyBytes_GET_SIZE(<bytes>text) > TS_MAX:
            o.n = start
            return 1
        put(o, PyBytes_AS_STRING(<bytes>text), PyBytes_GET_SIZE(<bytes>text))
    put(o, b',"seq":', 7)
    if seq is None:
        put(o, b"null", 4)
    else:
        n = snprint_i64(o.p + o.n, PyLong_AsLongLong(seq))
        o.n += n
    put(o, b',"metrics":{', 12)
    first = True
    while PyDict_Next(metrics, &pos, &key, &value):
        if type(<object>value) is not float:
            o.n = start
            return 1
        s = PyUnicode_AsUTF8AndSize(<object>key, &n)
        if not key_ok(s, n):
            o.n = start
            return 1
        reserve(o, n + F64_MAX + 4)
        if not first:
            put(o, b",", 1)
        first = False
        put(o, b'"', 1)
        put(o, s, n)
        put(o, b'":', 2)
        o.n += put_f64(o.p + o.n, PyFloat_AS_DOUBLE(<object>value))
    reserve(o, 16)
    put(o, b'},"tags":', 9)
    if tags is None or not tags:
        put(o, b"{}", 2)
    else:
        pos = 0
        while PyDict_Next(tags, &pos, &key, &value):
            s = PyUnicode_AsUTF8AndSize(<object>key, &n)
            if not key_ok(s, n):
                o.n = start
                return 1
            s = PyUnicode_AsUTF8AndSize(<object>value, &n)
            if memchr(s, 0, n) != NULL:
                o.n = start
                return 1
        text = encode(tags)                  # msgspec's own text, escapes included
        reserve(o, PyBytes_GET_SIZE(<bytes>text))
        put(o, PyBytes_AS_STRING(<bytes>text), PyBytes_GET_SIZE(<bytes>text))
    PyObject_GetBuffer(payload, &view, PyBUF_SIMPLE)
    try:
        if view.len >= 6 and has_u0000(<const char *>view.buf, view.len):
            o.n = start                      # maybe U+0000: the Python path decides
            return 1
        reserve(o, view.len + 12)
        put(o, b',"payload":', 11)
        put(o, <const char *>view.buf, view.len)
        put(o, b"}", 1)
    finally:
        PyBuffer_Release(&view)
    return 0


cdef bint has_u0000(const char *s, Py_ssize_t n):
    """Whether "u0000" occurs at all (the Python path's regex decides whether it is an escape)."""
    cdef Py_ssize_t i
    for i in range(n - 4):
        if s[i] == 117 and s[i + 1] == 48 and s[i + 2] == 48 and s[i + 3] == 48 and s[i + 4] == 48:
            return True
    return False


cdef Py_ssize_t snprint_i64(char *out, long long v):
    """v >= 0 (the decoder's range for seq) in decimal, at most 19 digits."""
    cdef char tmp[INT_MAX_TEXT]
    cdef int k = 0, i
    if v == 0:
        out[0] = 48
        return 1
    while v > 0:
        tmp[k] = 48 + <char>(v % 10)
        v //= 10
        k += 1
    for i in range(k):
        out[i] = tmp[k - 1 - i]
    return k


cdef Py_ssize_t put_now(char *out, object now) except -1:
    if not PyDateTime_CheckExact(now) or datetime_tzinfo(<datetime>now) is not UTC:
        raise ValueError("now must be an aware UTC datetime")
    return put_utc(out, <datetime>now)


# --- the entry points ----------------------------------------------------------------------

def normalise_batch(list recs, object now, object ts_text, object encode):
    """A decoded batch (gw/ingest.py's BatchRecord list) as the worker takes it,
    [(device_id bytes, seq or None, published JSON bytes)], or None when any
    record is off the common path (the caller runs the Python path). `now`:
    the server's time for records without ts (aware, UTC); `ts_text(ts)`: the
    quoted text of a ts this cannot write itself, or None when invalid;
    `encode`: msgspec's encoder (tags that need escapes)."""
    cdef Out o
    cdef char now_ts[TS_MAX]
    cdef Py_ssize_t now_len = put_now(now_ts, now), dev_len
    cdef const char *dev
    cdef list out = []
    cdef object rec, device
    o.p = NULL
    o.n = o.cap = 0
    try:
        for rec in recs:
            device = rec.device_id
            dev = PyUnicode_AsUTF8AndSize(device, &dev_len)
            if not device_ok(dev, dev_len):
                return None
            o.n = 0
            if put_record(&o, rec, dev, dev_len, now_ts, now_len, ts_text, encode):
                return None
            out.append((PyBytes_FromStringAndSize(dev, dev_len), rec.seq, PyBytes_FromStringAndSize(o.p, o.n)))
        return out
    except UnicodeError:
        return None                          # a lone surrogate: the Python path words it
    finally:
        free(o.p)


def normalise_record(bytes device, object rec, object now, object ts_text, object encode):
    """One decoded record (gw/ingest.py's Record) of `device` (its id already
    checked, from a topic or a path), its published JSON bytes, or None when
    off the common path (a device_id in the body among them)."""
    cdef Out o
    cdef char now_ts[TS_MAX]
    cdef Py_ssize_t now_len = put_now(now_ts, now)
    o.p = NULL
    o.n = o.cap = 0
    if rec.device_id is not None or not device_ok(PyBytes_AS_STRING(device), PyBytes_GET_SIZE(device)):
        return None
    try:
        if put_record(&o, rec, PyBytes_AS_STRING(device), PyBytes_GET_SIZE(device), now_ts, now_len,
                      ts_text, encode):
            return None
        return PyBytes_FromStringAndSize(o.p, o.n)
    except UnicodeError:
        return None
    finally:
        free(o.p)


def f64_text(double v) -> bytes:
    """put_f64's text for v (tests: held to msgspec's)."""
    cdef char buf[F64_MAX]
    return PyBytes_FromStringAndSize(buf, put_f64(buf, v))


def utc_text(object dt) -> bytes:
    """put_utc's text for an aware UTC datetime (tests: held to msgspec's)."""
    cdef char buf[TS_MAX]
    return PyBytes_FromStringAndSize(buf, put_now(buf, dt))
