# cython: language_level=3
"""A segmented write-ahead log, one writer per worker process (see wal.pxd for
the format and the threads).

    wal = Wal(f"{data_dir}/wal/{slot}", fsync="batch", counters=row)
    wal.recover()                   # once, before appending: cuts a torn tail
    end = wal.append(payload)       # the record's end offset, or -1: refused
    ...                             # epoll on wal.fileno(); when readable:
    durable = wal.poll()            # records whose end <= durable are durable

    reader = WalReader(f"{data_dir}/wal/{slot}")        # in another process
    records, next_offset = reader.read(checkpoint, durable_offset)

The flusher is a pthread running C only (wal_flusher.c; no GIL, every signal
blocked, so a file-size limit gives EFBIG instead of SIGXFSZ). On a write or fsync error
(ENOSPC, EFBIG, EIO) the log enters its error state: appends are refused, the
flusher retries about every second from where it stopped, and the state clears
by itself once a retry succeeds. A Wal belongs to the process that recovered
it: create it after forking (in a forked child it refuses appends).
"""

import errno as _errno
import logging
import os
import re
import struct
import time

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport int64_t, uint32_t, uint64_t, uint8_t
from libc.string cimport memcpy

from gw_ext.stats cimport (WAL_APPENDED_OFFSET, WAL_BYTES, WAL_DURABLE_OFFSET, WAL_ERRORS, WAL_FSYNCS,
                           WAL_RECORDS, WAL_REFUSED, WAL_TRUNCATED)

cdef extern from "crc32c.h":
    int gw_crc32c_hw
    void gw_crc32c_init()
    uint32_t gw_crc32c(uint32_t crc, const uint8_t* p, size_t n) noexcept nogil
    uint32_t gw_crc32c_sw(uint32_t crc, const uint8_t* p, size_t n) noexcept nogil

cdef extern from "wal_records.h":
    const int GW_WAL_HDR
    const int GW_WAL_REC_HDR
    const uint32_t GW_WAL_MAX_PAYLOAD
    const int GW_SCAN_END, GW_SCAN_PARTIAL, GW_SCAN_BADLEN, GW_SCAN_BADCRC
    uint32_t gw_le32(const uint8_t* p) noexcept nogil
    int gw_wal_next(const uint8_t* buf, size_t len, uint32_t* n, uint64_t* need, int check) noexcept nogil
    size_t gw_wal_scan(const uint8_t* buf, size_t len, uint64_t* count, int* status) noexcept nogil
    int64_t gw_wal_candidate(const uint8_t* buf, size_t len, size_t start, uint64_t limit, uint32_t* n,
                             int* whole) noexcept nogil

cdef extern from "wal_flusher.h":
    const int GW_WAL_ALWAYS, GW_WAL_BATCH, GW_WAL_OFF
    void gw_wal_init()
    gw_wal* gw_wal_new(int mode, uint64_t segment_bytes, uint64_t max_pending, uint64_t batch_ns) noexcept
    int gw_wal_start(gw_wal* w, int dirfd, int fd, uint64_t base, uint64_t end) noexcept
    int64_t gw_wal_append(gw_wal* w, const uint8_t* p, uint32_t n, int ignore_err) noexcept nogil
    int gw_wal_room(gw_wal* w, uint32_t n) noexcept nogil
    int gw_wal_flush(gw_wal* w, uint64_t timeout_ns) noexcept nogil
    void gw_wal_stop(gw_wal* w) noexcept nogil
    void gw_wal_close_fds(gw_wal* w) noexcept nogil
    void gw_wal_free(gw_wal* w) noexcept nogil
    uint64_t gw_wal_drain(gw_wal* w) noexcept nogil
    uint64_t gw_wal_durable(gw_wal* w) noexcept nogil
    uint64_t gw_wal_appended(gw_wal* w) noexcept nogil
    int gw_wal_err(gw_wal* w) noexcept nogil
    uint64_t gw_wal_fsyncs(gw_wal* w) noexcept nogil
    uint64_t gw_wal_writes(gw_wal* w) noexcept nogil
    uint64_t gw_wal_errors(gw_wal* w) noexcept nogil
    uint64_t gw_wal_cur_base(gw_wal* w) noexcept nogil
    int gw_wal_efd(gw_wal* w) noexcept nogil
    uint64_t gw_wal_now_ns() noexcept nogil
    void gw_wal_inject(gw_wal* w, int fsync_errno, int fsync_n, int write_errno, int write_n,
                       uint64_t retry_ns) noexcept nogil


gw_crc32c_init()
gw_wal_init()

log = logging.getLogger("gw.wal")

MAGIC = b"GWWAL001"
HEADER_BYTES = 16
RECORD_HEADER_BYTES = 8
MAX_PAYLOAD = 16 << 20
FSYNC_MODES = ("always", "batch", "off")
SEGMENT_RE = re.compile(r"^(\d{20})\.wal$")
cdef int64_t LOG_EVERY_NS = 10_000_000_000     # one error line per 10 s at most
cdef enum:
    READ_CHUNK = 1 << 20                        # bytes a reader reads at once
_HEADER = struct.Struct("<8sQ")


class WalError(Exception):
    """A log that cannot be used as asked."""


class WalOffsetError(WalError, ValueError):
    """A read from an offset the log cannot serve."""


class OffsetDeletedError(WalOffsetError):
    """The offset lies in a segment deleted by retention."""


class OffsetMisalignedError(WalOffsetError):
    """The offset is not where a record starts."""


class OffsetBeyondEndError(WalOffsetError):
    """The offset lies past the records on disk."""


# --- CRC-32C ------------------------------------------------------------------

def crc32c(data, uint32_t crc=0):
    """CRC-32C (Castagnoli) of a bytes-like object; `crc` continues a previous
    result, as zlib.crc32 does. SSE4.2 when the CPU has it, else slicing-by-8."""
    cdef const uint8_t[::1] v = data
    cdef size_t n = v.shape[0]
    if n == 0:
        return crc
    with nogil:
        crc = gw_crc32c(crc, &v[0], n)
    return crc


def crc32c_table(data, uint32_t crc=0):
    """crc32c with the table implementation whatever the CPU (tests)."""
    cdef const uint8_t[::1] v = data
    if v.shape[0] == 0:
        return crc
    return gw_crc32c_sw(crc, &v[0], v.shape[0])


def crc32c_implementation():
    """'sse4.2' or 'table': what crc32c uses on this CPU."""
    return "sse4.2" if gw_crc32c_hw else "table"


# --- files --------------------------------------------------------------------

def segment_name(uint64_t base):
    return f"{base:020d}.wal"


def list_segments(path):
    """[(base, file name)] of the segments in `path`, oldest first ([] if no directory)."""
    try:
        names = os.listdir(path)
    except FileNotFoundError:
        return []
    segs = []
    for name in names:
        m = SEGMENT_RE.match(name)
        if m:
            segs.append((int(m.group(1)), name))
    segs.sort()
    return segs


def frame(bytes payload):
    """One record as it is on disk (tests, tools)."""
    cdef Py_ssize_t n = len(payload)
    if n == 0 or n > MAX_PAYLOAD:
        raise ValueError(f"a record's payload takes 1 to {MAX_PAYLOAD} bytes, not {n}")
    return struct.pack("<II", n, crc32c(payload)) + payload


cdef bint _header_ok(int fd, uint64_t base, Py_ssize_t size):
    if size < HEADER_BYTES:
        return False
    magic, b = _HEADER.unpack(os.pread(fd, HEADER_BYTES, 0))
    return magic == MAGIC and b == base


cdef Py_ssize_t _scan_from(int fd, Py_ssize_t pos, Py_ssize_t size, uint64_t* count) except -1:
    """The file position where the valid records starting at `pos` (a record
    boundary) end: the file read in chunks, every record's length and CRC
    checked; `count` gets the number of records."""
    cdef Py_ssize_t chunk = READ_CHUNK, got
    cdef uint64_t n, need = 0
    cdef uint32_t k
    cdef int status
    cdef size_t valid
    cdef bytes data
    cdef const uint8_t* p
    count[0] = 0
    while pos < size:
        data = os.pread(fd, min(chunk, size - pos), pos)
        got = PyBytes_GET_SIZE(data)
        if got == 0:
            break
        p = <const uint8_t*>PyBytes_AS_STRING(data)
        with nogil:
            valid = gw_wal_scan(p, <size_t>got, &n, &status)
        count[0] += n
        pos += <Py_ssize_t>valid
        if status == GW_SCAN_END:
            continue
        if status != GW_SCAN_PARTIAL:
            break                       # a bad length or CRC: the valid part ends here
        gw_wal_next(p + valid, <size_t>got - valid, &k, &need, 0)
        if pos + <Py_ssize_t>need > size:
            break                       # torn: the file ends inside the record
        chunk = max(<Py_ssize_t>READ_CHUNK, <Py_ssize_t>need)   # read it whole next time
    return pos


cdef int _record_at(int fd, int64_t pos, int64_t end, bint allow_torn) except -1:
    """What starts at file position `pos` of data ending at `end`: 1 a whole
    record with a sane length and a matching CRC, or the data ends exactly
    there; 2 (allow_torn only) a record cut by the end of the data, its length
    sane (a torn tail); 0 anything else."""
    cdef bytes data
    cdef uint32_t k, crc
    if pos == end:
        return 1
    if pos + RECORD_HEADER_BYTES > end:
        return 2 if allow_torn else 0
    data = os.pread(fd, RECORD_HEADER_BYTES, pos)
    if PyBytes_GET_SIZE(data) != RECORD_HEADER_BYTES:
        return 0
    k = gw_le32(<const uint8_t*>PyBytes_AS_STRING(data))
    if k == 0 or k > GW_WAL_MAX_PAYLOAD:
        return 0
    if pos + RECORD_HEADER_BYTES + k > end:
        return 2 if allow_torn else 0
    crc = gw_le32(<const uint8_t*>PyBytes_AS_STRING(data) + 4)
    data = os.pread(fd, k, pos + RECORD_HEADER_BYTES)
    if PyBytes_GET_SIZE(data) != k:
        return 0
    return 1 if gw_crc32c(0, <const uint8_t*>PyBytes_AS_STRING(data), k) == crc else 0


cdef int64_t _resync(int fd, int64_t bad, int64_t end, bint allow_torn) except -2:
    """The file position of the first record after the corrupt one at `bad`
    (data ending at file position `end`), or -1: there is none (a torn or
    corrupt tail). A candidate must have a sane length, a matching CRC-32C, and
    be followed by another valid record or by the end of the data (allow_torn:
    or by a record the end cuts): two independent checks, so garbage passing
    for a record is practically impossible. Reads windows of the file, never
    more than READ_CHUNK plus one candidate record at a time."""
    cdef int64_t q = bad + 1, i, cand
    cdef Py_ssize_t got
    cdef uint32_t k
    cdef int whole
    cdef bytes data
    cdef const uint8_t* p
    while q + RECORD_HEADER_BYTES <= end:
        data = os.pread(fd, <Py_ssize_t>min(<int64_t>READ_CHUNK, end - q), q)
        got = PyBytes_GET_SIZE(data)
        if got < RECORD_HEADER_BYTES:
            return -1
        p = <const uint8_t*>PyBytes_AS_STRING(data)
        i = 0
        while True:
            with nogil:
                i = gw_wal_candidate(p, <size_t>got, <size_t>i, <uint64_t>(end - q), &k, &whole)
            if i < 0:
                break
            cand = q + i
            if (whole or _record_at(fd, cand, end, False) == 1) and \
                    _record_at(fd, cand + RECORD_HEADER_BYTES + k, end, allow_torn) != 0:
                return cand
            i += 1
        q += got - (RECORD_HEADER_BYTES - 1)     # a header across the window's end is seen next time
    return -1


cdef int64_t _resync_before_tail(int fd, int64_t bad, int64_t end) except -2:
    """_resync's answer for a tail: the file position of the run of valid
    records that a torn record ends (the data cut there), or -1. A candidate
    followed by a record the end cuts counts only if that record is the last
    thing in the data; one followed by a bogus length with records after it is
    corruption in the middle, where the readers, which see the data cut at the
    torn record, skip it (_resync without allow_torn), and so must recovery, or
    the two would disagree on what the log holds."""
    cdef int64_t cand = _resync(fd, bad, end, True), nxt
    cdef Py_ssize_t stop
    cdef uint64_t k
    while cand >= 0:
        stop = _scan_from(fd, <Py_ssize_t>cand, <Py_ssize_t>end, &k)
        nxt = _resync(fd, stop, end, True) if stop < end else -1
        if nxt < 0:
            return cand
        cand = nxt
    return -1


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_dirs(path):
    """Creates `path` and its missing parents, each one's entry made durable."""
    missing = []
    p = os.path.abspath(path)
    while not os.path.isdir(p):
        missing.append(p)
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    for d in reversed(missing):
        try:
            os.mkdir(d, 0o700)      # in data_dir: this user's only
        except FileExistsError:
            pass
        _fsync_dir(os.path.dirname(d))


def _create_segment(path, uint64_t base):
    fd = os.open(os.path.join(path, segment_name(base)),
                 os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    os.pwrite(fd, _HEADER.pack(MAGIC, base), 0)
    os.fsync(fd)
    return fd


# --- retention ----------------------------------------------------------------

def _retain(path, min_offset, max_age_s, max_bytes, protect_from=None):
    segs = []
    for base, name in list_segments(path):
        try:
            st = os.stat(os.path.join(path, name))
        except FileNotFoundError:
            continue
        segs.append((base, name, st.st_size, st.st_mtime))
    total = sum(s[2] for s in segs)
    now = time.time()
    freed = 0
    for k in range(len(segs) - 1):              # never the newest: it is being written
        base, name, size, mtime = segs[k]
        if protect_from is not None and base >= protect_from:
            break
        if segs[k + 1][0] > min_offset:         # some of its records are not read by every sink
            break
        old = max_age_s is not None and now - mtime > max_age_s
        over = max_bytes is not None and total > max_bytes
        if not (old or over):
            break                               # oldest first: the log stays contiguous
        try:
            os.unlink(os.path.join(path, name))
        except FileNotFoundError:
            continue                            # another retention pass got it first
        total -= size
        freed += size
    return freed


def retain_dir(path, min_offset, max_age_s, max_bytes):
    """Deletes the oldest segments of the log in `path` whose records all lie
    below `min_offset` (every sink's checkpoint is past them) and that are older
    than `max_age_s` (file mtime) or needed to bring the log's total under
    `max_bytes` (None: no such criterion). Never the newest segment (the one
    being written); oldest first, so the log stays contiguous. Safe from another
    process while the writer appends. Returns the bytes freed."""
    return _retain(os.fspath(path), int(min_offset), max_age_s, max_bytes)


# --- the writer -----------------------------------------------------------------

cdef class Wal:
    """One worker's log in directory `path` (see the module docstring).

    segment_bytes: size of a segment file before the next one starts;
    fsync: "always" (every record durable only after an fdatasync that covers it;
    records appended during an fsync form the next group), "batch" (one write +
    fdatasync at most every batch_ms, sooner past 1 MiB pending), "off" (durable
    once written to the page cache; written at the batch pace); max_pending:
    bytes appended and not durable yet past which appends are refused;
    counters: the worker's stats row (a uint64 numpy array), or None.
    """

    def __cinit__(self):
        self.w = NULL
        self.ctr = NULL

    def __init__(self, path, *, uint64_t segment_bytes=64 << 20, str fsync="batch", double batch_ms=2.0,
                 uint64_t max_pending=64 << 20, counters=None):
        cdef uint64_t[::1] row
        cdef int mode
        if fsync not in FSYNC_MODES:
            raise ValueError(f"fsync must be one of {', '.join(FSYNC_MODES)}, not {fsync!r}")
        if segment_bytes < 64:
            raise ValueError("segment_bytes must be at least 64")
        if max_pending < 4096:
            raise ValueError("max_pending must be at least 4096 bytes")
        if not 0.0 <= batch_ms <= 10_000.0:
            raise ValueError("batch_ms must be in [0, 10000]")
        if self.w != NULL:
            raise RuntimeError("Wal.__init__ called twice")
        self.path = os.fspath(path)
        self.fsync = fsync
        self.segment_bytes = segment_bytes
        self.max_pending = max_pending
        self.batch_ms = batch_ms
        if counters is not None:
            row = counters
            # The stats row's indices: gw_ext/stats.pxd, the one list of counters.
            idx = (WAL_RECORDS, WAL_BYTES, WAL_FSYNCS, WAL_DURABLE_OFFSET, WAL_APPENDED_OFFSET,
                   WAL_TRUNCATED, WAL_ERRORS, WAL_REFUSED)
            if max(idx) >= row.shape[0]:
                raise ValueError(f"counters has {row.shape[0]} words; the log's go up to {max(idx)}")
            (self.i_records, self.i_bytes, self.i_fsyncs, self.i_durable, self.i_appended,
             self.i_truncated, self.i_errors, self.i_refused) = idx
            self.counters_obj = counters
            self.ctr = &row[0]
        mode = GW_WAL_ALWAYS if fsync == "always" else GW_WAL_BATCH if fsync == "batch" else GW_WAL_OFF
        self.w = gw_wal_new(mode, segment_bytes, max_pending, <uint64_t>(batch_ms * 1e6))
        if self.w == NULL:
            raise OSError(_errno.ENOMEM, "cannot create the log (eventfd or memory)")

    def __dealloc__(self):
        if self.w != NULL:
            with nogil:
                gw_wal_free(self.w)
            self.w = NULL

    def recover(self):
        """Once, before appending: makes the directory and first segment if there
        are none; otherwise checks the last segment (and that the one before it
        ends where it starts), cuts a torn or corrupt tail (a partial record, a
        bad length or CRC) and drops segments after a gap; starts the flusher.
        {"records": valid records in the scanned segment(s), "truncated_bytes":
        bytes cut, "end_offset": the offset of the next record}."""
        cdef uint64_t n = 0, k = 0, records = 0, truncated = 0, base = 0, end = 0
        cdef Py_ssize_t size, valid
        cdef int64_t after
        cdef list regions = []
        if self.state != 0:
            raise RuntimeError("recover() runs once, before any append")
        path = self.path
        _make_dirs(path)
        segs = list_segments(path)
        changed = False
        fd = -1
        try:
            while segs:
                regions = []
                base, name = segs[len(segs) - 1]
                fname = os.path.join(path, name)
                fd = os.open(fname, os.O_RDWR | os.O_CLOEXEC)
                size = os.fstat(fd).st_size
                if not _header_ok(fd, base, size):
                    # created, header not (wholly) written: no record can be in it
                    truncated += size
                    changed = True
                    if len(segs) > 1:
                        os.close(fd)
                        fd = -1
                        os.unlink(fname)
                        segs.pop()
                        continue
                    os.ftruncate(fd, 0)
                    os.pwrite(fd, _HEADER.pack(MAGIC, base), 0)
                    os.fsync(fd)
                    end = base
                    break
                valid = _scan_from(fd, HEADER_BYTES, size, &n)
                while valid < size:
                    # Corruption in the middle (valid records after it) is kept for
                    # the readers to skip; only a torn or corrupt tail is cut.
                    after = _resync(fd, valid, size, False)
                    if after < 0:
                        # No record past here is followed by a valid one: at most a
                        # last run of records before a torn tail.
                        after = _resync_before_tail(fd, valid, size)
                        if after < 0:
                            break
                    regions.append((base + <uint64_t>(valid - HEADER_BYTES),
                                    base + <uint64_t>(after - HEADER_BYTES)))
                    valid = _scan_from(fd, after, size, &k)
                    n += k
                if valid < size:
                    os.ftruncate(fd, valid)
                    os.fsync(fd)
                    truncated += size - valid
                if len(segs) > 1:
                    pbase, pname = segs[len(segs) - 2]
                    psize = os.stat(os.path.join(path, pname)).st_size
                    if psize < HEADER_BYTES + <Py_ssize_t>(base - pbase):
                        # The previous segment lost its tail (a power cut with fsync
                        # "off"): what follows the gap is not this log's continuation.
                        truncated += valid
                        changed = True
                        os.close(fd)
                        fd = -1
                        os.unlink(fname)
                        segs.pop()
                        continue
                records += n
                end = base + <uint64_t>(valid - HEADER_BYTES)
                break
            if not segs:
                fd = _create_segment(path, 0)
                base = end = 0
                changed = True
            if changed:
                _fsync_dir(path)
            dirfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            raise
        e = gw_wal_start(self.w, dirfd, fd, base, end)
        if e != 0:
            os.close(fd)
            os.close(dirfd)
            raise OSError(e, "cannot start the log's flusher thread")
        self.state = 1
        if self.ctr != NULL:
            self.ctr[self.i_truncated] += truncated
            self.ctr[self.i_durable] = end
            self.ctr[self.i_appended] = end
        return {"records": records, "truncated_bytes": truncated, "end_offset": end,
                "corrupt_bytes": sum(b - a for a, b in regions), "corrupt_regions": regions}

    cdef int64_t append_c(self, const uint8_t* p, uint32_t n) noexcept nogil:
        return self._append(p, n, 0)

    cdef int64_t append_after_room_c(self, const uint8_t* p, uint32_t n) noexcept nogil:
        return self._append(p, n, 1)

    cdef int64_t _append(self, const uint8_t* p, uint32_t n, int ignore_err) noexcept nogil:
        cdef int64_t end
        if self.state != 1 or n == 0 or n > GW_WAL_MAX_PAYLOAD:
            return -1
        end = gw_wal_append(self.w, p, n, ignore_err)
        if end < 0:
            self._refused()
            return -1
        if self.ctr != NULL:
            self.ctr[self.i_records] += 1
            self.ctr[self.i_bytes] += GW_WAL_REC_HDR + n
            self.ctr[self.i_appended] = <uint64_t>end
        return end

    cdef void _refused(self) noexcept nogil:
        if self.ctr != NULL:
            self.ctr[self.i_refused] += 1
        self._sync_counters()

    cdef void _sync_counters(self) noexcept nogil:
        """Adds the flusher's new fsyncs and errors to the row, sets the durable
        gauge, logs the error state (at most every 10 s) and its end."""
        cdef uint64_t v
        cdef int err = gw_wal_err(self.w)
        cdef int64_t now
        if self.ctr != NULL:
            v = gw_wal_fsyncs(self.w)
            self.ctr[self.i_fsyncs] += v - self.seen_fsyncs
            self.seen_fsyncs = v
            v = gw_wal_errors(self.w)
            self.ctr[self.i_errors] += v - self.seen_errors
            self.seen_errors = v
            self.ctr[self.i_durable] = gw_wal_durable(self.w)
        if err != 0:
            now = <int64_t>gw_wal_now_ns()
            if self.logged_err == 0:
                self.err_since_ns = now
            if self.logged_err == 0 or now - self.last_log_ns >= LOG_EVERY_NS:
                self.last_log_ns = now
                self.logged_err = err
                self._log_state(err)
        elif self.logged_err != 0:
            self._log_state(0)
            self.logged_err = 0

    cdef void _log_state(self, int err) noexcept with gil:
        cdef uint64_t pending = gw_wal_appended(self.w) - gw_wal_durable(self.w)
        if err:
            log.error("write-ahead log %s: %s (errno %d): refusing appends, retrying every second; "
                      "%d bytes accepted and not durable yet are kept", self.path, os.strerror(err),
                      err, pending)
        else:
            log.warning("write-ahead log %s: writes succeed again after %.1f s; durable offset %d",
                        self.path, (<int64_t>gw_wal_now_ns() - self.err_since_ns) / 1e9,
                        gw_wal_durable(self.w))

    cdef bint room_c(self, uint32_t n) noexcept nogil:
        return self.state == 1 and 0 < n <= GW_WAL_MAX_PAYLOAD and gw_wal_room(self.w, n) != 0

    cdef uint64_t pending_c(self) noexcept nogil:
        return gw_wal_appended(self.w) - gw_wal_durable(self.w) if self.state == 1 else 0

    cdef uint64_t appended_c(self) noexcept nogil:
        return gw_wal_appended(self.w) if self.state == 1 else 0

    def append(self, bytes payload):
        """Appends one record: its end offset (durable once durable_offset reaches
        it), or -1 if refused (pending over max_pending, or the error state)."""
        cdef Py_ssize_t n = PyBytes_GET_SIZE(payload)
        if n == 0 or n > MAX_PAYLOAD:
            raise ValueError(f"a record's payload takes 1 to {MAX_PAYLOAD} bytes, not {n}")
        if self.state != 1:
            raise RuntimeError("recover() first" if self.state == 0 else "the log is closed")
        return self.append_c(<const uint8_t*>PyBytes_AS_STRING(payload), <uint32_t>n)

    def room(self, Py_ssize_t nbytes):
        """Whether an append of an nbytes payload would be taken now."""
        return 0 < nbytes <= MAX_PAYLOAD and self.room_c(<uint32_t>nbytes)

    cpdef uint64_t poll(self):
        """Drains the eventfd; the durable offset (counters updated)."""
        cdef uint64_t d
        if self.state != 1:
            return gw_wal_durable(self.w)
        d = gw_wal_drain(self.w)
        self._sync_counters()
        return d

    def fileno(self):
        """An eventfd, readable when the durable offset advanced (or the log
        entered its error state): register it in epoll, then call poll()."""
        if self.state == 2:
            raise ValueError("the log is closed")
        return gw_wal_efd(self.w)

    def flush(self, timeout=None):
        """Blocks until everything appended so far is durable (per the policy):
        True, or False after `timeout` seconds (the log in its error state)."""
        cdef uint64_t t = 0
        cdef int ok
        if self.state != 1:
            return self.state == 0 or gw_wal_durable(self.w) >= gw_wal_appended(self.w)
        if timeout is not None:
            t = max(<uint64_t>(float(timeout) * 1e9), <uint64_t>1)
        with nogil:
            ok = gw_wal_flush(self.w, t)
        self.poll()
        return bool(ok)

    def close(self, timeout=5.0):
        """Flushes (for at most `timeout` s), stops the flusher, closes the files.
        True if everything appended was made durable."""
        if self.state != 1:
            self.state = 2
            return True
        ok = self.flush(timeout)
        with nogil:
            gw_wal_stop(self.w)
            gw_wal_close_fds(self.w)
        self.state = 2
        if self.ctr != NULL:
            self._sync_counters()
        return ok and gw_wal_durable(self.w) >= gw_wal_appended(self.w)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def retain(self, min_offset, max_age_s, max_bytes):
        """retain_dir on this log, never touching the segment being written."""
        if self.state != 1:
            raise RuntimeError("recover() first" if self.state == 0 else "the log is closed")
        return _retain(self.path, int(min_offset), max_age_s, max_bytes,
                       protect_from=gw_wal_cur_base(self.w))

    @property
    def durable_offset(self):
        return gw_wal_durable(self.w)

    @property
    def appended_offset(self):
        return gw_wal_appended(self.w)

    @property
    def pending_bytes(self):
        """Appended and not durable yet."""
        return gw_wal_appended(self.w) - gw_wal_durable(self.w)

    @property
    def error(self):
        """errno of the failing write or fsync while in the error state, else 0."""
        return gw_wal_err(self.w)

    @property
    def segment_base(self):
        """Base offset of the segment being written."""
        return gw_wal_cur_base(self.w)

    def stats(self):
        """The flusher's totals: fsyncs (fdatasync calls), writes (pwrite calls),
        errors (failed calls)."""
        return {"fsyncs": gw_wal_fsyncs(self.w), "writes": gw_wal_writes(self.w),
                "errors": gw_wal_errors(self.w)}

    def _inject_errors(self, int fsync_errno=0, int fsync_count=-1, int write_errno=0, int write_count=-1,
                       retry_s=None):
        """Tests: the flusher's next fsync_count fdatasyncs (write_count pwrites)
        fail with that errno, without being called (a count left at -1: that
        kind unchanged); retry_s: the retry interval (1 s unless set)."""
        gw_wal_inject(self.w, fsync_errno, fsync_count, write_errno, write_count,
                      0 if retry_s is None else max(<uint64_t>(float(retry_s) * 1e9), <uint64_t>1))

    def append_repeat(self, bytes payload, Py_ssize_t count):
        """Appends `payload` count times from C (append_c, as the worker loop
        calls it; benchmarks): how many were taken before the first refusal."""
        cdef Py_ssize_t i, n = PyBytes_GET_SIZE(payload)
        cdef const uint8_t* p = <const uint8_t*>PyBytes_AS_STRING(payload)
        if n == 0 or n > MAX_PAYLOAD or self.state != 1:
            raise ValueError("a 1 .. 16 MiB payload, on a recovered log")
        with nogil:
            for i in range(count):
                if self.append_c(p, <uint32_t>n) < 0:
                    break
            else:
                i = count
        return i

    def __repr__(self):
        return (f"Wal({self.path!r}, fsync={self.fsync!r}, appended={self.appended_offset}, "
                f"durable={self.durable_offset})")


# --- the reader ---------------------------------------------------------------

cdef class WalReader:
    """Reads one worker's log (in any process) from offsets the caller keeps.

    read(from_offset, up_to) returns the records with offset in [from_offset,
    up_to) (up_to: the writer's durable offset), across segments. Everything
    below the durable offset is whole on disk, so a record there with a bad
    length or CRC is damage, not a write in progress: the reader skips to the
    next valid record (or its segment's end) and notes the range skipped
    (take_skips()); it stops early only where up_to cuts a record. Keeps one
    segment file open; not thread-safe (one reader per thread).
    """
    cdef readonly str path
    cdef list segs                  # cached listing: bases, oldest first
    cdef int fd
    cdef uint64_t fd_base
    cdef set known                  # offsets known to start a record
    cdef uint64_t end_base, end_pos # end_offset(): a segment and its valid file size scanned so far
    cdef list skips                 # [(start, end)] offsets of corrupt records skipped, not yet taken

    def __cinit__(self):
        self.fd = -1

    def __init__(self, path):
        self.path = os.fspath(path)
        self.segs = []
        self.known = set()
        self.skips = []
        self.end_base = <uint64_t>-1
        self._refresh()

    def take_skips(self):
        """[(start, end)]: the offset ranges of corrupt records read() skipped
        since the last call (each range was lost to the reader)."""
        out = self.skips
        self.skips = []
        return out

    def __dealloc__(self):
        if self.fd >= 0:
            os.close(self.fd)

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _refresh(self):
        self.segs = [b for b, _ in list_segments(self.path)]

    def segments(self):
        """[(base, file size)] of the segments on disk, oldest first."""
        out = []
        for base, name in list_segments(self.path):
            try:
                out.append((base, os.stat(os.path.join(self.path, name)).st_size))
            except FileNotFoundError:
                pass
        return out

    def first_offset(self):
        """The offset of the oldest record kept (retention deletes before it)."""
        self._refresh()
        return self.segs[0] if self.segs else 0

    cdef Py_ssize_t _index(self, uint64_t pos) except -2:
        """The index in segs of the segment holding pos (-1: before the first)."""
        cdef Py_ssize_t lo = 0, hi = len(self.segs), mid
        while lo < hi:
            mid = (lo + hi) >> 1
            if <uint64_t>self.segs[mid] <= pos:
                lo = mid + 1
            else:
                hi = mid
        return lo - 1

    cdef int _open(self, uint64_t base) except -1:
        """Makes the segment `base` the open one: 0, or 1 if it is gone."""
        if self.fd >= 0 and self.fd_base == base:
            return 0
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        try:
            self.fd = os.open(os.path.join(self.path, segment_name(base)), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return 1
        self.fd_base = base
        return 0

    cdef Py_ssize_t _locate(self, uint64_t pos) except -2:
        """The segment index holding pos, its file open; raises if deleted."""
        cdef Py_ssize_t i
        for attempt in range(3):
            i = self._index(pos)
            if i < 0 and attempt == 0:
                self._refresh()                 # a new directory, or the first listing
                continue
            if i < 0:
                first = self.segs[0] if self.segs else None
                if first is None:
                    raise OffsetBeyondEndError(f"{self.path}: no log segments; offset {pos} cannot be read")
                raise OffsetDeletedError(f"{self.path}: offset {pos} lies in a deleted segment "
                                         f"(the oldest kept starts at {first})")
            if self._open(self.segs[i]) == 0:
                return i
            self._refresh()                     # deleted since the listing
        raise OffsetDeletedError(f"{self.path}: offset {pos}: its segment was deleted")

    cdef _check(self, uint64_t pos):
        """Raises unless a record starts at pos (or pos ends the last record on
        disk). Offsets this reader returned are known; others cost a walk over
        the record lengths from the start of their segment."""
        cdef Py_ssize_t i, k, got, want
        cdef uint64_t base, at, prev
        cdef uint32_t n
        cdef bytes data
        cdef const uint8_t* p
        if pos in self.known:
            return
        i = self._locate(pos)
        base = self.segs[i]
        at = prev = base
        while at < pos:
            want = <Py_ssize_t>min(<uint64_t>READ_CHUNK, pos - at + 8)
            data = os.pread(self.fd, want, HEADER_BYTES + at - base)
            got = PyBytes_GET_SIZE(data)
            p = <const uint8_t*>PyBytes_AS_STRING(data)
            k = 0
            while at < pos and got - k >= 8:
                n = gw_le32(p + k)
                if n == 0 or n > GW_WAL_MAX_PAYLOAD:
                    self._check_past_corruption(base, pos)      # a corrupt length on the way
                    return
                prev = at
                at += 8 + n
                k += 8 + n
            if at >= pos or k > got:
                continue                # done, or the next read starts after a long record
            if got < want:
                raise OffsetBeyondEndError(f"{self.path}: offset {pos} lies past the records on disk "
                                           f"(they end at {at})")
            # a header across the end of the chunk: read again from `at`
        if at != pos:
            # A corrupt length may have led the walk astray: check every record.
            self._check_past_corruption(base, pos)
            return
        self._remember(pos)

    cdef _check_past_corruption(self, uint64_t base, uint64_t pos):
        """_check's slow path: a walk of segment `base` (open) with every CRC
        checked, skipping corrupt records as read() does."""
        cdef uint64_t n
        cdef Py_ssize_t size = os.fstat(self.fd).st_size
        cdef Py_ssize_t target = HEADER_BYTES + <Py_ssize_t>(pos - base)
        cdef Py_ssize_t at = HEADER_BYTES
        cdef int64_t after
        while True:
            at = _scan_from(self.fd, at, min(target, size), &n)
            if at == target:
                self._remember(pos)
                return
            if at >= size:
                raise OffsetBeyondEndError(f"{self.path}: offset {pos} lies past the records on disk "
                                           f"(they end at {base + <uint64_t>(at - HEADER_BYTES)})")
            after = _resync(self.fd, at, size, True)
            if after < 0 or after > target:
                raise OffsetMisalignedError(f"{self.path}: offset {pos} is not at a record boundary "
                                            f"(records were checked from {base})")
            at = after

    cdef _remember(self, uint64_t pos):
        if len(self.known) >= 4096:
            self.known.clear()
        self.known.add(pos)

    def read(self, uint64_t from_offset, uint64_t up_to, Py_ssize_t max_records=10000):
        """([(offset, payload)], next_offset): the records with offset in
        [from_offset, up_to), at most max_records, stopping early (no error) at a
        torn or corrupt record. Raises OffsetDeletedError (from_offset in a
        deleted segment), OffsetMisalignedError (not a record boundary),
        OffsetBeyondEndError (past the records on disk)."""
        cdef list out = []
        cdef uint64_t pos = from_offset, base, limit, nxt, skip_to, need = 0
        cdef Py_ssize_t i, want, got, k, start
        cdef uint32_t n
        cdef int st
        cdef bytes data
        cdef const uint8_t* p
        if max_records <= 0:
            raise ValueError("max_records must be positive")
        if not self.segs:
            self._refresh()
            if not self.segs and from_offset == 0:
                return out, 0                   # the writer has not created its log yet
        self._check(pos)
        while pos < up_to and len(out) < max_records:
            i = self._locate(pos)
            base = self.segs[i]
            nxt = <uint64_t>self.segs[i + 1] if i + 1 < len(self.segs) else <uint64_t>-1
            limit = min(up_to, nxt)
            want = <Py_ssize_t>min(limit - pos, max(<uint64_t>READ_CHUNK, need))
            data = os.pread(self.fd, want, HEADER_BYTES + pos - base)
            got = PyBytes_GET_SIZE(data)
            p = <const uint8_t*>PyBytes_AS_STRING(data)
            k = 0
            st = GW_SCAN_END
            while len(out) < max_records:
                st = gw_wal_next(p + k, <size_t>(got - k), &n, &need, 1)
                if st >= 0:
                    break
                out.append((pos + <uint64_t>k, PyBytes_FromStringAndSize(<const char*>p + k + 8, n)))
                k += 8 + n
            pos += <uint64_t>k
            if len(out) >= max_records or pos >= up_to:
                break
            if st == GW_SCAN_END:
                need = 0
                if got == want:
                    continue                    # more to read (maybe in the next segment)
                # the file ends at pos: did the writer start a new segment there?
                if nxt == <uint64_t>-1:
                    self._refresh()
                    if len(self.segs) > i + 1 and <uint64_t>self.segs[i + 1] == pos:
                        continue
                break                           # not on disk (up_to past what was written)
            if st == GW_SCAN_PARTIAL and (pos + need <= limit or got < want):
                if got == want:
                    continue                    # read the record whole next time
                break                           # not on disk (up_to past what was written)
            # A bad length or CRC, or a record running past up_to or its segment:
            # damage (everything below up_to is whole on disk), unless up_to cuts
            # a record (a caller's bound, not the durable offset).
            skip_to = self._skip_corrupt(base, pos, limit, nxt)
            if skip_to == pos:
                break
            pos = skip_to
            need = 0
        self._remember(pos)
        return out, pos

    cdef uint64_t _skip_corrupt(self, uint64_t base, uint64_t pos, uint64_t limit, uint64_t nxt) except? 0:
        """The corrupt record at pos (segment `base`, open; data up to offset
        `limit`): the offset of the next valid record, or `nxt` (the next
        segment) when none follows in this one and it is complete, noted in
        skips; pos when neither (wait for more of the log)."""
        cdef int64_t q = _resync(self.fd, HEADER_BYTES + <int64_t>(pos - base),
                                 HEADER_BYTES + <int64_t>(limit - base), False)
        cdef uint64_t after
        if q >= 0:
            after = base + <uint64_t>(q - HEADER_BYTES)
        elif limit == nxt:
            after = nxt
        else:
            return pos
        self.skips.append((pos, after))
        return after

    def end_offset(self):
        """The offset after the last whole valid record on disk."""
        cdef uint64_t n
        cdef Py_ssize_t size, valid
        cdef int64_t after
        self._refresh()
        while self.segs:
            base = self.segs[len(self.segs) - 1]
            if self._open(base) != 0:
                self._refresh()
                continue
            size = os.fstat(self.fd).st_size
            if size < HEADER_BYTES:
                return base
            if base != self.end_base:
                self.end_base = base
                self.end_pos = HEADER_BYTES
            valid = _scan_from(self.fd, self.end_pos, size, &n)
            while valid < size:
                after = _resync(self.fd, valid, size, True)      # damage in the middle: past it
                if after < 0:
                    break
                valid = _scan_from(self.fd, after, size, &n)
            self.end_pos = valid
            return base + <uint64_t>(valid - HEADER_BYTES)
        return 0
