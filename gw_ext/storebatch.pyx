# cython: language_level=3
"""A store sink's batch decoded into columns (gw/pipeline/batch.py's `decode`,
compiled).

The workers log each reading as the JSON msgspec writes for gw/ingest.py's
`Telemetry`, fields in one order and no spaces:

    {"device_id":"...","ts":"YYYY-MM-DDTHH:MM:SS[.ffffff]Z","seq":N|null,
     "metrics":{"name":number,...},"tags":{...},"payload":<any JSON>}

`decode_columns` reads that layout in place: the device id, the time (as
Unix seconds, the same double `datetime.timestamp()` gives), the sequence
number and each metric, while the metrics, tags and payload are kept as the
record's own JSON text (no re-encoding). Every length is bounded by the
record's; a record that does not follow the layout exactly (an escape in a
name, another field, a time zone other than Z, a number outside JSON's
grammar...) goes through `decode_reading` (msgspec, the reference decoder) as
in batch.py, so the result is the same for any input; one that is not a
reading at all goes to `bad`.
"""

from cpython.unicode cimport PyUnicode_DecodeUTF8
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from libc.string cimport memchr, memcmp, memcpy
from libc.math cimport isfinite
from libc.stdint cimport int32_t, int64_t, uint64_t
from libc.stdlib cimport malloc, realloc, free

import numpy as np


from cpython.object cimport PyObject

cdef extern from "Python.h":
    # overflow_exception NULL: an overflow gives +-HUGE_VAL (refused below as not finite), no exception.
    double PyOS_string_to_double(const char *s, char **endptr, PyObject *overflow_exception) except? -1.0

cdef int64_t EXACT = 1LL << 53      # integers a double holds exactly

cdef enum:
    MAX_NUMBER = 64          # a metric's number text, at most (msgspec writes at most 24)
    MAX_METRICS = 64         # metrics in one record on the fast path (more: the reference decoder)
    MAX_DEPTH = 64           # nesting of a payload on the fast path


cdef struct Metric:
    Py_ssize_t name, name_len
    double value


cdef struct Parsed:
    Py_ssize_t dev, dev_len
    int64_t micros           # Unix time in microseconds
    bint has_seq
    int64_t seq
    Py_ssize_t metrics, metrics_len
    Py_ssize_t tags, tags_len
    Py_ssize_t payload, payload_len
    int nmetrics
    Metric m[MAX_METRICS]


cdef inline bint lit(const unsigned char *p, Py_ssize_t n, Py_ssize_t *i, const char *s, Py_ssize_t k) noexcept nogil:
    if n - i[0] < k or memcmp(p + i[0], s, k) != 0:
        return False
    i[0] += k
    return True


cdef inline bint plain_string(const unsigned char *p, Py_ssize_t n, Py_ssize_t *i) noexcept nogil:
    """At p[i] after an opening quote: to the closing quote (i past it); False on an
    escape, a control character or the end of the record."""
    cdef Py_ssize_t j = i[0]
    while j < n:
        c = p[j]
        if c == 34:         # "
            i[0] = j + 1
            return True
        if c == 92 or c < 32:
            return False
        j += 1
    return False


cdef inline bint skip_string(const unsigned char *p, Py_ssize_t n, Py_ssize_t *i) noexcept nogil:
    """At p[i] on an opening quote: past the closing one, escapes allowed."""
    cdef Py_ssize_t j = i[0] + 1
    while j < n:
        c = p[j]
        if c == 34:
            i[0] = j + 1
            return True
        if c == 92:
            if j + 1 >= n:
                return False
            c = p[j + 1]
            if c == 117:                # \uXXXX
                if j + 6 > n or not (is_hex(p[j + 2]) and is_hex(p[j + 3]) and is_hex(p[j + 4])
                                     and is_hex(p[j + 5])):
                    return False
                j += 6
                continue
            if not (c == 34 or c == 92 or c == 47 or c == 98 or c == 102 or c == 110 or c == 114
                    or c == 116):
                return False
            j += 2
            continue
        if c < 32:
            return False
        j += 1
    return False


cdef inline bint is_hex(unsigned char c) noexcept nogil:
    return (48 <= c <= 57) or (65 <= c <= 70) or (97 <= c <= 102)


cdef inline bint is_digit(unsigned char c) noexcept nogil:
    return 48 <= c <= 57


cdef bint json_number(const unsigned char *p, Py_ssize_t n, Py_ssize_t *i) noexcept nogil:
    """JSON's number grammar from p[i]; i past it."""
    cdef Py_ssize_t j = i[0]
    if j < n and p[j] == 45:            # -
        j += 1
    if j >= n or not is_digit(p[j]):
        return False
    if p[j] == 48:                      # 0: no digit may follow
        j += 1
    else:
        while j < n and is_digit(p[j]):
            j += 1
    if j < n and p[j] == 46:            # .
        j += 1
        if j >= n or not is_digit(p[j]):
            return False
        while j < n and is_digit(p[j]):
            j += 1
    if j < n and (p[j] == 101 or p[j] == 69):   # e E
        j += 1
        if j < n and (p[j] == 43 or p[j] == 45):
            j += 1
        if j >= n or not is_digit(p[j]):
            return False
        while j < n and is_digit(p[j]):
            j += 1
    i[0] = j
    return True


cdef bint skip_value(const unsigned char *p, Py_ssize_t n, Py_ssize_t *i) noexcept nogil:
    """One JSON value from p[i] (no whitespace: msgspec writes none); i past it.
    Structure only (brackets matched, strings closed, scalars well formed)."""
    cdef unsigned char stack[MAX_DEPTH]
    cdef int depth = 0
    cdef Py_ssize_t j = i[0]
    cdef unsigned char c
    cdef bint want_value = True       # a value (or a closing bracket of an empty one) comes next
    while True:
        if j >= n:
            return False
        c = p[j]
        if want_value:
            if c == 123 or c == 91:     # { [
                if depth >= MAX_DEPTH:
                    return False
                stack[depth] = c
                depth += 1
                j += 1
                if j < n and ((c == 123 and p[j] == 125) or (c == 91 and p[j] == 93)):
                    depth -= 1
                    j += 1
                    want_value = False
                elif c == 123:
                    # a key, then ':'
                    if j >= n or p[j] != 34 or not skip_string(p, n, &j):
                        return False
                    if j >= n or p[j] != 58:
                        return False
                    j += 1
                continue
            if c == 34:
                if not skip_string(p, n, &j):
                    return False
            elif c == 116:
                if not lit(p, n, &j, "true", 4):
                    return False
            elif c == 102:
                if not lit(p, n, &j, "false", 5):
                    return False
            elif c == 110:
                if not lit(p, n, &j, "null", 4):
                    return False
            elif not json_number(p, n, &j):
                return False
            want_value = False
        else:
            if depth == 0:
                i[0] = j
                return True
            if c == 44:                 # ,
                j += 1
                if stack[depth - 1] == 123:
                    if j >= n or p[j] != 34 or not skip_string(p, n, &j):
                        return False
                    if j >= n or p[j] != 58:
                        return False
                    j += 1
                want_value = True
            elif (c == 125 and stack[depth - 1] == 123) or (c == 93 and stack[depth - 1] == 91):
                depth -= 1
                j += 1
            else:
                return False


cdef inline int digits(const unsigned char *p, Py_ssize_t k) noexcept nogil:
    """k decimal digits at p as a number, -1 if one is not a digit."""
    cdef int v = 0
    cdef Py_ssize_t j
    for j in range(k):
        if not is_digit(p[j]):
            return -1
        v = v * 10 + (p[j] - 48)
    return v


cdef inline int64_t days_from_civil(int64_t y, int m, int d) noexcept nogil:
    # Howard Hinnant's algorithm: days since 1970-01-01 of a proleptic Gregorian date.
    y -= m <= 2
    cdef int64_t era = (y if y >= 0 else y - 399) // 400
    cdef int64_t yoe = y - era * 400
    cdef int64_t doy = (153 * (m + (-3 if m > 2 else 9)) + 2) // 5 + d - 1
    cdef int64_t doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


cdef inline int month_days(int y, int m) noexcept nogil:
    if m == 2:
        return 29 if (y % 4 == 0 and (y % 100 != 0 or y % 400 == 0)) else 28
    if m == 4 or m == 6 or m == 9 or m == 11:
        return 30
    return 31


cdef bint parse_ts(const unsigned char *p, Py_ssize_t n, Py_ssize_t *i, int64_t *micros) noexcept nogil:
    """YYYY-MM-DDTHH:MM:SS[.f{1,6}]Z" from p[i]; i past the closing quote."""
    cdef Py_ssize_t j = i[0]
    cdef int y, mo, d, h, mi, s, frac, k
    if n - j < 21:
        return False
    y = digits(p + j, 4)
    mo = digits(p + j + 5, 2)
    d = digits(p + j + 8, 2)
    h = digits(p + j + 11, 2)
    mi = digits(p + j + 14, 2)
    s = digits(p + j + 17, 2)
    if (p[j + 4] != 45 or p[j + 7] != 45 or p[j + 10] != 84 or p[j + 13] != 58 or p[j + 16] != 58
            or y < 1 or mo < 1 or mo > 12 or d < 1 or d > month_days(y, mo) or h < 0 or h > 23
            or mi < 0 or mi > 59 or s < 0 or s > 59):
        return False
    j += 19
    frac = 0
    if p[j] == 46:              # .
        j += 1
        k = 0
        while j < n and is_digit(p[j]):
            if k == 6:
                return False
            frac = frac * 10 + (p[j] - 48)
            k += 1
            j += 1
        if k == 0:
            return False
        while k < 6:
            frac *= 10
            k += 1
    if n - j < 2 or p[j] != 90 or p[j + 1] != 34:       # Z"
        return False
    i[0] = j + 2
    micros[0] = ((days_from_civil(y, mo, d) * 86400 + h * 3600 + mi * 60 + s) * 1000000) + frac
    return True


cdef bint parse_record(const unsigned char *p, Py_ssize_t n, Parsed *r):
    """The record in the logged layout, or False (then the reference decoder decides)."""
    cdef Py_ssize_t i = 0, j, start
    cdef char num[MAX_NUMBER]
    cdef char *end
    cdef double v
    cdef int k
    if not lit(p, n, &i, '{"device_id":"', 14):
        return False
    r.dev = i
    if not plain_string(p, n, &i):
        return False
    r.dev_len = i - 1 - r.dev
    if r.dev_len < 1 or r.dev_len > 64:
        return False
    if not lit(p, n, &i, ',"ts":"', 7) or not parse_ts(p, n, &i, &r.micros):
        return False
    if not lit(p, n, &i, ',"seq":', 7):
        return False
    if lit(p, n, &i, "null", 4):
        r.has_seq = False
    else:
        start = i
        r.seq = 0
        while i < n and is_digit(p[i]) and i - start < 18:
            r.seq = r.seq * 10 + (p[i] - 48)
            i += 1
        if i == start or (i < n and is_digit(p[i])) or (p[start] == 48 and i - start > 1):
            return False
        r.has_seq = True
    if not lit(p, n, &i, ',"metrics":{', 12):
        return False
    r.metrics = i - 1
    r.nmetrics = 0
    if i < n and p[i] == 125:
        i += 1
    else:
        while True:
            if r.nmetrics == MAX_METRICS or not lit(p, n, &i, '"', 1):
                return False
            k = r.nmetrics
            r.m[k].name = i
            if not plain_string(p, n, &i):
                return False
            r.m[k].name_len = i - 1 - r.m[k].name
            for j in range(k):          # a repeated name: the reference keeps the last value
                if r.m[j].name_len == r.m[k].name_len and \
                        memcmp(p + r.m[j].name, p + r.m[k].name, r.m[k].name_len) == 0:
                    return False
            if not lit(p, n, &i, ":", 1):
                return False
            start = i
            if not json_number(p, n, &i) or i - start >= MAX_NUMBER:
                return False
            # A float as msgspec writes one (a fraction or an exponent): the text kept in
            # `metrics` then reads back as the very value stored (an integer's text may not).
            if memchr(p + start, 46, i - start) == NULL and memchr(p + start, 101, i - start) == NULL \
                    and memchr(p + start, 69, i - start) == NULL:
                return False
            memcpy(num, p + start, i - start)
            num[i - start] = 0
            v = PyOS_string_to_double(num, &end, NULL)
            if end != num + (i - start) or not isfinite(v):
                return False
            r.m[k].value = v
            r.nmetrics += 1
            if i < n and p[i] == 44:
                i += 1
                continue
            if i < n and p[i] == 125:
                i += 1
                break
            return False
    r.metrics_len = i - r.metrics
    if not lit(p, n, &i, ',"tags":', 8) or i >= n or p[i] != 123:
        return False
    r.tags = i
    if not skip_value(p, n, &i):
        return False
    r.tags_len = i - r.tags
    if not lit(p, n, &i, ',"payload":', 11):
        return False
    r.payload = i
    if not skip_value(p, n, &i):
        return False
    r.payload_len = i - r.payload
    # The record ends there: anything else (another field) is the reference decoder's.
    return i == n - 1 and p[i] == 125


cdef class _Grow:
    """Per-sample columns, grown by doubling."""
    cdef public object key, ts, val, reading
    cdef int64_t[::1] k
    cdef double[::1] t
    cdef double[::1] v
    cdef int64_t[::1] r
    cdef Py_ssize_t n, cap

    def __init__(self, Py_ssize_t cap):
        self.cap = max(cap, 16)
        self.n = 0
        self._alloc(self.cap)

    cdef _alloc(self, Py_ssize_t cap):
        key = np.empty(cap, dtype=np.int64)
        ts = np.empty(cap, dtype=np.float64)
        val = np.empty(cap, dtype=np.float64)
        reading = np.empty(cap, dtype=np.int64)
        if self.n:
            key[:self.n] = self.key[:self.n]
            ts[:self.n] = self.ts[:self.n]
            val[:self.n] = self.val[:self.n]
            reading[:self.n] = self.reading[:self.n]
        self.key, self.ts, self.val, self.reading = key, ts, val, reading
        self.k, self.t, self.v, self.r = key, ts, val, reading
        self.cap = cap

    cdef inline add(self, int64_t k, double t, double v, int64_t r):
        if self.n == self.cap:
            self._alloc(self.cap * 2)
        self.k[self.n] = k
        self.t[self.n] = t
        self.v[self.n] = v
        self.r[self.n] = r
        self.n += 1


cdef struct Dev:
    const unsigned char *name   # its UTF-8 text: in a record of the batch, or in one of _Batch.keep
    Py_ssize_t name_len
    uint64_t hash
    double first, last          # least and greatest ts
    Py_ssize_t count            # readings
    int32_t head, tail          # its series, in order of first appearance (-1: none yet)


cdef struct Ser:
    const unsigned char *name   # the metric's UTF-8 text (as Dev.name)
    Py_ssize_t name_len
    int32_t next                # the device's next series (-1: the last)
    double last                 # its value in the device's last values


cdef inline uint64_t fnv1a(const unsigned char *p, Py_ssize_t n) noexcept nogil:
    cdef uint64_t h = 14695981039346656037ULL
    cdef Py_ssize_t i
    for i in range(n):
        h = (h ^ p[i]) * 1099511628211ULL
    return h


cdef class _Batch:
    """What decode_columns builds: the columns, the batch's series and, per device,
    its summary. Devices and series are found by their UTF-8 text in C tables (a
    hash of the devices, a list of each device's series), so a reading of a known
    device and series makes no Python object for either; the text they point to
    stays alive while decode_columns runs (the records in `parts`, or `keep`)."""
    cdef list readings, namelist, devnames, devtags, keep
    cdef _Grow cols
    cdef Dev *devs
    cdef Ser *sers
    cdef int32_t *table         # open addressing: device index, -1 empty
    cdef Py_ssize_t ndev, devcap, nser, sercap, tabcap

    def __cinit__(self):
        self.devs = NULL
        self.sers = NULL
        self.table = NULL

    def __init__(self, Py_ssize_t records):
        self.readings = []
        self.namelist = []
        self.devnames = []
        self.devtags = []
        self.keep = []
        self.cols = _Grow(records * 2)
        self.ndev = self.nser = 0
        self.devcap = self.sercap = 0
        self.tabcap = 0
        self._rehash(1024)

    def __dealloc__(self):
        free(self.devs)
        free(self.sers)
        free(self.table)

    cdef int _rehash(self, Py_ssize_t cap) except -1:
        cdef int32_t *t = <int32_t *>malloc(cap * sizeof(int32_t))
        cdef Py_ssize_t i, j, mask = cap - 1
        if t == NULL:
            raise MemoryError()
        for i in range(cap):
            t[i] = -1
        for i in range(self.ndev):
            j = <Py_ssize_t>(self.devs[i].hash & <uint64_t>mask)
            while t[j] >= 0:
                j = (j + 1) & mask
            t[j] = <int32_t>i
        free(self.table)
        self.table = t
        self.tabcap = cap
        return 0

    cdef Py_ssize_t find_dev(self, const unsigned char *p, Py_ssize_t n, uint64_t h) noexcept:
        cdef Py_ssize_t mask = self.tabcap - 1, j = <Py_ssize_t>(h & <uint64_t>mask)
        cdef int32_t d
        cdef Dev *e
        while True:
            d = self.table[j]
            if d < 0:
                return -1
            e = &self.devs[d]
            if e.hash == h and e.name_len == n and memcmp(e.name, p, n) == 0:
                return d
            j = (j + 1) & mask

    cdef Py_ssize_t add_dev(self, const unsigned char *p, Py_ssize_t n, uint64_t h, str name, double ts,
                            tags) except -1:
        cdef Py_ssize_t j, mask
        cdef Dev *nd
        if self.ndev >= 0x7ffffffe:
            raise OverflowError("too many devices in one batch")
        if 2 * (self.ndev + 1) > self.tabcap:
            self._rehash(self.tabcap * 2)
        if self.ndev == self.devcap:
            nd = <Dev *>realloc(self.devs, (self.devcap * 2 + 64) * sizeof(Dev))
            if nd == NULL:
                raise MemoryError()
            self.devs = nd
            self.devcap = self.devcap * 2 + 64
        nd = &self.devs[self.ndev]
        nd.name = p
        nd.name_len = n
        nd.hash = h
        nd.first = nd.last = ts
        nd.count = 1
        nd.head = nd.tail = -1
        self.devnames.append(name)
        self.devtags.append(tags)
        mask = self.tabcap - 1
        j = <Py_ssize_t>(h & <uint64_t>mask)
        while self.table[j] >= 0:
            j = (j + 1) & mask
        self.table[j] = <int32_t>self.ndev
        self.ndev += 1
        return self.ndev - 1

    cdef inline bint seen(self, Py_ssize_t d, double ts, tags):
        """A further reading of device d: its summary; whether it is the device's newest so far."""
        cdef Dev *e = &self.devs[d]
        e.count += 1
        if ts >= e.last:
            e.last = ts
            self.devtags[d] = tags
            return True
        if ts < e.first:
            e.first = ts
        return False

    cdef Py_ssize_t find_ser(self, Py_ssize_t d, const unsigned char *p, Py_ssize_t n) noexcept:
        cdef int32_t s = self.devs[d].head
        cdef Ser *e
        while s >= 0:
            e = &self.sers[s]
            if e.name_len == n and memcmp(e.name, p, n) == 0:
                return s
            s = e.next
        return -1

    cdef Py_ssize_t add_ser(self, Py_ssize_t d, const unsigned char *p, Py_ssize_t n, str name,
                            double v) except -1:
        cdef Ser *ns
        cdef Dev *e = &self.devs[d]
        if self.nser >= 0x7ffffffe:
            raise OverflowError("too many series in one batch")
        if self.nser == self.sercap:
            ns = <Ser *>realloc(self.sers, (self.sercap * 2 + 128) * sizeof(Ser))
            if ns == NULL:
                raise MemoryError()
            self.sers = ns
            self.sercap = self.sercap * 2 + 128
            e = &self.devs[d]
        ns = &self.sers[self.nser]
        ns.name = p
        ns.name_len = n
        ns.next = -1
        ns.last = v
        if e.tail >= 0:
            self.sers[e.tail].next = <int32_t>self.nser
        else:
            e.head = <int32_t>self.nser
        e.tail = <int32_t>self.nser
        self.namelist.append((self.devnames[d], name))
        self.nser += 1
        return self.nser - 1

    cdef inline int sample(self, Py_ssize_t s, double ts, double v, int64_t ri, bint newer) except -1:
        if newer:
            self.sers[s].last = v
        self.cols.add(<int64_t>s, ts, v, ri)
        return 0

    cdef dict summary(self):
        """device_id -> [first ts, last ts, last values, tags, readings], in order of first appearance."""
        cdef dict out = {}
        cdef Py_ssize_t d
        cdef int32_t s
        cdef Dev *e
        names = self.namelist
        for d in range(self.ndev):
            e = &self.devs[d]
            lv = {}
            s = e.head
            while s >= 0:
                lv[(<tuple>names[s])[1]] = self.sers[s].last
                s = self.sers[s].next
            out[self.devnames[d]] = [e.first, e.last, lv, self.devtags[d], e.count]
        return out


def decode_columns(list parts, decode_reading, encode, bad, tuple errors):
    """The batch's records (`parts`: [(worker, [(lsn, payload bytes)], next)]) as
    (readings, names, key, ts, val, reading, devices): batch.Columns's fields.
    `decode_reading` (msgspec's decoder of batch.Reading) decodes what the fast
    path leaves; `errors` are its exceptions for a record that is not a reading,
    which goes to bad(worker, lsn, exc)."""
    cdef Py_ssize_t total = 0
    for part in parts:
        total += len(part[1])
    cdef _Batch b = _Batch(total)
    cdef Parsed r
    cdef const unsigned char *p
    cdef const unsigned char *q
    cdef Py_ssize_t n, j, di, s
    cdef Py_ssize_t sk[MAX_METRICS]
    cdef uint64_t h
    cdef bint newer
    cdef double ts
    cdef int64_t ri
    cdef bytes kb
    # The previous fast-path record's tags (text kept alive by `prev`): most
    # readings of a batch repeat them, and their str is reused.
    cdef bytes prev = None
    cdef Py_ssize_t prev_tags = 0, prev_tags_len = -1
    cdef object prev_tags_obj = None
    readings = b.readings
    for part in parts:
        slot = part[0]
        for rec in <list>part[1]:
            off = rec[0]
            payload = rec[1]
            if type(payload) is not bytes:
                payload = bytes(payload)
                b.keep.append(payload)      # the tables may point into it
            p = <const unsigned char *>PyBytes_AS_STRING(payload)
            n = PyBytes_GET_SIZE(payload)
            if parse_record(p, n, &r):
                h = fnv1a(p + r.dev, r.dev_len)
                di = b.find_dev(p + r.dev, r.dev_len, h)
                newnames = None
                try:
                    # Every text the reading needs is decoded (checked as UTF-8) before
                    # the batch takes any of it; a known device's or series' text was.
                    dev = None
                    if di < 0:
                        dev = PyUnicode_DecodeUTF8(<const char *>p + r.dev, r.dev_len, NULL)
                    metrics_text = PyUnicode_DecodeUTF8(<const char *>p + r.metrics, r.metrics_len, NULL)
                    if prev is not None:
                        q = <const unsigned char *>PyBytes_AS_STRING(prev)
                    if (prev is not None and r.tags_len == prev_tags_len
                            and memcmp(p + r.tags, q + prev_tags, r.tags_len) == 0):
                        tags = prev_tags_obj
                    else:
                        tags = PyUnicode_DecodeUTF8(<const char *>p + r.tags, r.tags_len, NULL)
                    if r.payload_len == 4 and memcmp(p + r.payload, b"null", 4) == 0:
                        pl = None
                    else:
                        pl = PyUnicode_DecodeUTF8(<const char *>p + r.payload, r.payload_len, NULL)
                    for j in range(r.nmetrics):
                        sk[j] = b.find_ser(di, p + r.m[j].name, r.m[j].name_len) if di >= 0 else -1
                        if sk[j] < 0:
                            if newnames is None:
                                newnames = [None] * r.nmetrics
                            newnames[j] = PyUnicode_DecodeUTF8(<const char *>p + r.m[j].name, r.m[j].name_len,
                                                               NULL)
                except UnicodeDecodeError:
                    pass            # not UTF-8: the reference decoder's answer
                else:
                    prev = payload
                    prev_tags = r.tags
                    prev_tags_len = r.tags_len
                    prev_tags_obj = tags
                    if -EXACT < r.micros < EXACT:
                        ts = <double>r.micros / 1e6      # both exact: one correctly rounded division
                    else:
                        ts = (<object>r.micros) / (<object>1000000)     # exact, as datetime.timestamp()
                    ri = len(readings)
                    if di < 0:
                        di = b.add_dev(p + r.dev, r.dev_len, h, dev, ts, tags)
                        newer = True
                    else:
                        dev = b.devnames[di]
                        newer = b.seen(di, ts, tags)
                    readings.append((slot, off, dev, ts, r.seq if r.has_seq else None, metrics_text, tags, pl))
                    for j in range(r.nmetrics):
                        if sk[j] < 0:
                            s = b.add_ser(di, p + r.m[j].name, r.m[j].name_len, newnames[j], r.m[j].value)
                            b.cols.add(<int64_t>s, ts, r.m[j].value, ri)
                        else:
                            b.sample(sk[j], ts, r.m[j].value, ri, newer)
                    continue
            try:
                red = decode_reading(payload)
            except errors as exc:
                bad(slot, off, exc)
                continue
            ts = red.ts.timestamp()
            dev = red.device_id
            metrics = red.metrics
            tags = bytes(red.tags).decode()
            plb = bytes(red.payload)
            kb = (<str>dev).encode("utf-8", "surrogatepass")
            h = fnv1a(<const unsigned char *>PyBytes_AS_STRING(kb), PyBytes_GET_SIZE(kb))
            di = b.find_dev(<const unsigned char *>PyBytes_AS_STRING(kb), PyBytes_GET_SIZE(kb), h)
            ri = len(readings)
            if di < 0:
                b.keep.append(kb)
                di = b.add_dev(<const unsigned char *>PyBytes_AS_STRING(kb), PyBytes_GET_SIZE(kb), h, dev, ts, tags)
                newer = True
            else:
                dev = b.devnames[di]
                newer = b.seen(di, ts, tags)
            readings.append((slot, off, dev, ts, red.seq, encode(metrics).decode(), tags,
                             None if plb == b"null" else plb.decode()))
            for m, v in metrics.items():
                kb = (<str>m).encode("utf-8", "surrogatepass")
                s = b.find_ser(di, <const unsigned char *>PyBytes_AS_STRING(kb), PyBytes_GET_SIZE(kb))
                if s < 0:
                    b.keep.append(kb)
                    s = b.add_ser(di, <const unsigned char *>PyBytes_AS_STRING(kb), PyBytes_GET_SIZE(kb), m, v)
                    b.cols.add(<int64_t>s, ts, v, ri)
                else:
                    b.sample(s, ts, v, ri, newer)
    c = b.cols
    return (readings, b.namelist, c.key[:c.n].copy(), c.ts[:c.n].copy(), c.val[:c.n].copy(),
            c.reading[:c.n].copy(), b.summary())


def fast_path(bytes payload) -> bool:
    """Whether `decode_columns` reads this record in place (True) or hands it to
    the reference decoder (tests, tools)."""
    cdef Parsed r
    return parse_record(<const unsigned char *>PyBytes_AS_STRING(payload), PyBytes_GET_SIZE(payload), &r)


from libc.math cimport sqrt, fabs


def observe_run(st, list values, Py_ssize_t minn, double thr):
    """gw/pipeline/anomaly.py's Detector.observe_many loop for one key's state `st`
    (a `_Key`) and its new values, compiled: the same arithmetic in the same
    order on doubles (so the same alerts, bit for bit); [(index, zscore, mean, std)]."""
    cdef list out = []
    cdef double[::1] v = np.asarray(values, dtype=np.float64) if values else np.empty(0, dtype=np.float64)
    if v.shape[0]:
        _observe(st, &v[0], v.shape[0], minn, thr, out)
    return out


def detect_runs(state, list names, int64_t[::1] order, int64_t[::1] key, double[::1] val,
                Py_ssize_t minn, double thr):
    """gw/pipeline/batch.py's `detect` loop, compiled: the samples sorted by series
    (`key`, stable, `order` their indices in arrival order, `val` their values),
    each series' run through `_observe` with its state `state(device_id, metric)`
    (Detector.state); [(arrival index, device_id, metric, zscore, mean, std)]."""
    cdef Py_ssize_t n = key.shape[0], s = 0, e, nn = len(names), i
    cdef int64_t k
    cdef list found = [], out
    if order.shape[0] != n or val.shape[0] != n:
        raise ValueError("order, key and val differ in length")
    while s < n:
        k = key[s]
        if not 0 <= k < nn:
            raise ValueError("a sample's series index is out of range")
        e = s + 1
        while e < n and key[e] == k:
            e += 1
        dev, m = <tuple>names[k]
        out = []
        _observe(state(dev, m), &val[s], e - s, minn, thr, out)
        for i, z, mean, std in out:
            found.append((order[s + <Py_ssize_t>i], dev, m, z, mean, std))
        s = e
    return found


cdef int _observe(st, const double *values, Py_ssize_t nv, Py_ssize_t minn, double thr, list out) except -1:
    vals = st.values
    cdef Py_ssize_t maxlen = vals.maxlen
    cdef double s = st.s, q = st.q, k = st.shift
    cdef Py_ssize_t since = st.since
    cdef list run = st.run
    cdef Py_ssize_t i, n
    cdef double v, m, var, mean, std, z, d
    append = vals.append
    for i in range(nv):
        v = values[i]
        n = len(vals)
        if n >= minn:
            m = s / <double>n
            var = q / <double>n - m * m
            if var < 1e-9 * (q / <double>n) and since:
                st.recompute()
                s, q, k, since = st.s, st.q, st.shift, st.since
                m = s / <double>n
                var = q / <double>n - m * m
            mean = k + m
            std = sqrt(var) if var > 0.0 else 0.0
            if std > 0.0:
                z = (v - mean) / std
                if fabs(z) > thr:
                    run.append(v)
                    if len(run) >= minn:
                        st.refill(run)        # a new level: learn it
                        run = []
                        st.run = run
                        s, q, k, since = st.s, st.q, st.shift, st.since
                    out.append((i, z, mean, std))
                    continue
        if n == maxlen:
            d = <double>vals[0] - k
            s -= d
            q -= d * d
        append(v)
        d = v - k
        s += d
        q += d * d
        since += 1
        if since >= maxlen:
            st.s, st.q, st.since = s, q, since
            st.recompute()
            s, q, k, since = st.s, st.q, st.shift, st.since
        if run:
            run.clear()
    st.s, st.q, st.shift, st.since = s, q, k, since
    return 0


# --- a batch's per-series rows (gw/pipeline/store.py's sample chunks and rollup upserts)

from libc.math cimport floor, nearbyint, signbit
from libc.stdlib cimport malloc, realloc, free
from libc.string cimport strlen
from cpython.mem cimport PyMem_Free
from cpython.unicode cimport PyUnicode_FromStringAndSize

cdef extern from "Python.h":
    char *PyOS_double_to_string(double val, char format_code, int precision, int flags, int *ptype) except NULL
    int Py_DTSF_ADD_DOT_0

cdef double POW10[10]
POW10[:] = [1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9]

cdef enum:
    NUMBER_MAX = 32          # one number's JSON text, at most ("-1.2345678901234567e-308" and Python's repr)


cdef Py_ssize_t put_double(char *out, double v) except -1:
    """v's JSON text at out (at most NUMBER_MAX bytes): the decimal with the fewest
    fraction digits (up to 9) that reads back as v exactly, else Python's repr;
    null when not finite (as msgspec writes it). Either reads back as v."""
    cdef int d, k
    cdef double x, p
    cdef int64_t i, q
    cdef char digits[24]
    cdef Py_ssize_t n = 0, len_
    cdef char *s
    if not isfinite(v):
        memcpy(out, b"null", 4)
        return 4
    if v == 0.0:
        if signbit(v):
            memcpy(out, b"-0.0", 4)
            return 4
        memcpy(out, b"0.0", 3)
        return 3
    for d in range(10):
        p = POW10[d]
        x = v * p
        if not (-9007199254740992.0 < x < 9007199254740992.0):
            break
        x = nearbyint(x)
        if x / p != v:
            continue
        # v is the double nearest to i / 10^d, and so is that decimal's text.
        i = <int64_t>x
        if i < 0:
            out[n] = 45          # '-'
            n += 1
            i = -i
        k = 0                    # the text backwards: d fraction digits, '.', the integer part
        while k < d:
            digits[k] = 48 + <char>(i % 10)
            i //= 10
            k += 1
        if d:
            digits[k] = 46       # '.'
            k += 1
        while True:
            digits[k] = 48 + <char>(i % 10)
            i //= 10
            k += 1
            if i == 0:
                break
        while k > 0:
            k -= 1
            out[n] = digits[k]
            n += 1
        if d == 0:
            out[n] = 46
            out[n + 1] = 48      # ".0"
            n += 2
        return n
    s = PyOS_double_to_string(v, 114, 0, Py_DTSF_ADD_DOT_0, NULL)     # 'r': repr
    try:
        len_ = <Py_ssize_t>strlen(s)
        if n + len_ > NUMBER_MAX:
            raise OverflowError("number text too long")
        memcpy(out, s, len_)
        return len_
    finally:
        PyMem_Free(s)


def number_text(double v) -> str:
    """put_double's text for v (tests)."""
    cdef char buf[NUMBER_MAX]
    cdef Py_ssize_t n = put_double(buf, v)
    return PyUnicode_FromStringAndSize(buf, n)


cdef object json_array(char **buf, Py_ssize_t *cap, const double *x, Py_ssize_t count):
    cdef Py_ssize_t need = count * (NUMBER_MAX + 1) + 2, n = 1, j
    cdef char *nb
    if need > cap[0]:
        nb = <char *>realloc(buf[0], need)
        if nb == NULL:
            raise MemoryError()
        buf[0] = nb
        cap[0] = need
    nb = buf[0]
    nb[0] = 91               # '['
    for j in range(count):
        if j:
            nb[n] = 44       # ','
            n += 1
        n += put_double(nb + n, x[j])
    nb[n] = 93               # ']'
    return PyUnicode_FromStringAndSize(nb, n + 1)


def series_rows(int64_t[::1] sid_of, int64_t[::1] key, double[::1] ts, double[::1] val,
                double chunk_seconds, tuple windows):
    """The batch's samples, sorted by (series index `key`, time) as batch.BySeries
    sorts them, as (chunks, rollups): gw/pipeline/store.py's rows.

    chunks: per run of one series within one interval of `chunk_seconds`, in that
    order: (series id, first ts, last ts, samples, ts JSON array, value JSON array).
    rollups: per window (name, seconds) of `windows` in turn, per (series, bucket):
    (name, bucket, series id, count, min, max, sum, sumsq), ordered by (bucket,
    series id) (the rollup table's key order). `sid_of`: per series index its id."""
    cdef Py_ssize_t n = key.shape[0], i, s, m, w
    cdef double b, prev_b = 0.0, width, v
    cdef int64_t k, prev_k = -1, nsid = sid_of.shape[0]
    cdef char *buf = NULL
    cdef Py_ssize_t cap = 0
    if ts.shape[0] != n or val.shape[0] != n:
        raise ValueError("key, ts and val differ in length")
    for i in range(n):
        if not 0 <= key[i] < nsid:
            raise ValueError("a sample's series index is out of range")
    chunks = []
    rollups = []
    if n == 0:
        return chunks, rollups
    try:
        s = 0
        for i in range(n + 1):
            if i < n:
                k = key[i]
                b = floor(ts[i] / chunk_seconds) * chunk_seconds
                if i == 0 or (k == prev_k and b == prev_b):
                    prev_k, prev_b = k, b
                    continue
            chunks.append((sid_of[key[s]], ts[s], ts[i - 1], i - s,
                           json_array(&buf, &cap, &ts[s], i - s), json_array(&buf, &cap, &val[s], i - s)))
            s = i
            if i < n:
                prev_k, prev_b = k, b
    finally:
        free(buf)
    bucket = np.empty(n, dtype=np.float64)
    sid = np.empty(n, dtype=np.int64)
    counts = np.empty(n, dtype=np.int64)
    aggs = np.empty((4, n), dtype=np.float64)
    cdef double[::1] bv = bucket
    cdef int64_t[::1] sv = sid, cv = counts
    cdef double[:, ::1] av = aggs
    cdef Py_ssize_t[::1] ov
    for name, seconds in windows:
        width = seconds
        m = -1
        for i in range(n):
            k = key[i]
            v = val[i]
            b = floor(ts[i] / width) * width
            if m < 0 or k != prev_k or b != prev_b:
                m += 1
                bv[m] = b
                sv[m] = sid_of[k]
                cv[m] = 1
                av[0, m] = v
                av[1, m] = v
                av[2, m] = v
                av[3, m] = v * v
                prev_k, prev_b = k, b
            else:
                cv[m] += 1
                if v < av[0, m]:
                    av[0, m] = v
                if v > av[1, m]:
                    av[1, m] = v
                av[2, m] += v
                av[3, m] += v * v
        m += 1
        order = np.asarray(np.lexsort((sid[:m], bucket[:m])), dtype=np.intp)
        ov = order
        for w in range(m):
            i = ov[w]
            rollups.append((name, bv[i], sv[i], cv[i], av[0, i], av[1, i], av[2, i], av[3, i]))
    return chunks, rollups


# --- the pipeline's heap between batches

cdef extern from "malloc.h" nogil:
    int mallopt(int param, int value)
    int malloc_trim(size_t pad)
    int M_MMAP_THRESHOLD
    int M_TRIM_THRESHOLD

cdef enum:
    HEAP_MMAP_THRESHOLD = 32 << 20      # glibc's largest (HEAP_MAX / 2 on 64-bit)
    HEAP_TRIM_THRESHOLD = 1 << 30


def keep_heap() -> bool:
    """The process's malloc keeps the memory a batch freed for the next one: blocks
    up to 32 MiB come from the heap instead of a mapping of their own, and the free
    top of the heap is not given back after each batch (glibc's defaults map and
    unmap a large batch's arrays and buffers every time, and the kernel zeroes
    each page again at its first touch). `trim_heap` gives it back when idle.
    False when malloc refused a setting."""
    ok = mallopt(M_MMAP_THRESHOLD, HEAP_MMAP_THRESHOLD)
    ok = mallopt(M_TRIM_THRESHOLD, HEAP_TRIM_THRESHOLD) and ok
    return bool(ok)


def trim_heap() -> int:
    """Gives the heap's free pages back to the system (malloc_trim): 1 when some were."""
    return malloc_trim(0)
