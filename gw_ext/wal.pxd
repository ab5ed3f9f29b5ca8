# The write-ahead log of one worker: telemetry readings appended by the
# worker's loop thread, written and fdatasync'ed by a flusher thread, read by
# the pipeline process from its own checkpoints (gw_ext/wal.pyx).
#
# On disk (a contract other code reads; never change it):
#
#   data_dir/wal/{slot}/{base:020d}.wal      segment files, base = offset of its first record
#   segment  = "GWWAL001" + u64 LE base      (16-byte header), then records
#   record   = u32 LE length (1 .. 16 MiB) + u32 LE CRC-32C (Castagnoli) of the payload + payload
#
# Offsets are logical byte positions in one worker's log, from 0: a record at
# offset O takes 8 + len bytes, the next one is at O + 8 + len, and it lives at
# file position 16 + (O - base) of its segment. A record never spans segments:
# a new one starts when the current file would pass segment_bytes (a record
# bigger than that gets a segment of its own).
#
# Threads. The loop thread frames each record (length, CRC) into a pending
# buffer under a mutex held for a memcpy; the flusher swaps that buffer for its
# own empty one (the mutex again), writes it with pwrite at file positions
# computed from offsets (so a retry after a partial write continues exactly
# where it stopped: no byte twice, none skipped), fdatasyncs it according to
# the policy, then publishes the durable offset (an atomic store) and writes the
# eventfd the loop has in its epoll set. Records appended meanwhile go into the
# next group. The flusher keeps a group's bytes until they are durable: if an
# fdatasync fails, the kernel may already have dropped the dirty pages, so the
# retry writes the segment's unsynced bytes again before syncing. Counters of the
# worker's stats row are written by the loop thread only (append, poll).
#
# Durable means: "always" and "batch", an fdatasync of every segment holding the
# record returned (and an fsync of the directory after a segment was created);
# "off", the write() returned (the page cache: survives a kill, not a power cut).

from libc.stdint cimport int64_t, uint32_t, uint64_t, uint8_t

# The C side: CRC-32C (crc32c.c), the framing and scanning (wal_records.c), the
# writer and its flusher thread (wal_flusher.c); wal.pyx wraps them.
cdef extern from "wal_flusher.h":
    ctypedef struct gw_wal "struct gw_wal"


cdef class Wal:
    cdef gw_wal* w
    cdef int state                      # 0 new, 1 recovered (flusher running), 2 closed
    cdef readonly str path
    cdef readonly str fsync
    cdef readonly uint64_t segment_bytes
    cdef readonly uint64_t max_pending
    cdef readonly double batch_ms
    # The worker's stats row (counters= at construction), or NULL.
    cdef object counters_obj
    cdef uint64_t* ctr
    cdef int i_records, i_bytes, i_fsyncs, i_durable, i_appended, i_truncated, i_errors, i_refused
    cdef uint64_t seen_fsyncs, seen_errors      # flusher totals already added to the row
    cdef int64_t last_log_ns                    # the last error line (at most one per 10 s)
    cdef int logged_err                         # errno of the error state we logged, 0: none
    cdef int64_t err_since_ns

    # Frames one record into the pending buffer: its end offset (the durable
    # offset that makes it durable), or -1: refused (pending over max_pending, the
    # log in its error state, not recovered or closed, n == 0 or n > 16 MiB).
    cdef int64_t append_c(self, const uint8_t* p, uint32_t n) noexcept nogil
    # The same, for a caller that saw room_c(n) (or room for more) just before in
    # this thread: an error state entered since does not refuse it (the record
    # waits in the buffer for the disk), so a reading the caller already
    # committed to (recorded as seen) is never refused after all.
    cdef int64_t append_after_room_c(self, const uint8_t* p, uint32_t n) noexcept nogil
    cdef int64_t _append(self, const uint8_t* p, uint32_t n, int ignore_err) noexcept nogil
    # Whether an append of an n-byte payload would be taken now.
    cdef bint room_c(self, uint32_t n) noexcept nogil
    # Bytes appended and not durable yet (what backpressure watches).
    cdef uint64_t pending_c(self) noexcept nogil
    # The offset after the last record appended (durable or not).
    cdef uint64_t appended_c(self) noexcept nogil
    # Drains the eventfd, updates the counters, returns the durable offset.
    cpdef uint64_t poll(self)
    cdef void _refused(self) noexcept nogil
    cdef void _sync_counters(self) noexcept nogil
    cdef void _log_state(self, int err) noexcept with gil
