# cython: language_level=3
"""Whole files replaced atomically by a background thread, so the event loop
never waits for a disk.

    writer = FileWriter()
    gen = writer.submit("/data/sessions-0.msgpack", data)   # copies data; returns at once
    for path, gen, err in writer.results(): ...             # what finished since the last call
    writer.close()                                          # writes what is pending, then stops

Each file is written as a temporary file beside it (PATH.tmp), fsynced,
renamed over PATH and its directory fsynced: a crash at any point leaves
either the previous file or the new one, never a mix. One write is in flight
at a time; a snapshot submitted for a path whose previous one is still
waiting replaces it (only the newest matters). The writer is a pthread
running C only (filewriter_thread.c; no GIL: the worker's loop holds the GIL
while it waits in epoll; every signal blocked, so a file-size limit gives
EFBIG instead of SIGXFSZ). Create it in the process that uses it (after
forking).
"""

import os

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from libc.stdint cimport uint64_t, uint8_t
from libc.string cimport memcpy

cdef extern from "filewriter_thread.h":
    ctypedef struct gw_fw "struct gw_fw"
    ctypedef struct gw_fw_result "struct gw_fw_result":
        int slot
        int err
        uint64_t gen
    gw_fw* gw_fw_new() noexcept nogil
    int gw_fw_start(gw_fw* w) noexcept nogil
    int gw_fw_slot_of(gw_fw* w, const char* path, const char* tmp, const char* dir) noexcept nogil
    uint64_t gw_fw_submit(gw_fw* w, int k, uint8_t* buf, size_t len) noexcept nogil
    int gw_fw_wait_idle(gw_fw* w, uint64_t timeout_ns) noexcept nogil
    void gw_fw_stop(gw_fw* w) noexcept nogil
    int gw_fw_take(gw_fw* w, gw_fw_result* out, int n) noexcept nogil
    void gw_fw_free(gw_fw* w) noexcept nogil
    void gw_fw_inject(gw_fw* w, int err, int n, uint64_t delay_ns) noexcept nogil
    uint64_t gw_fw_writes(gw_fw* w) noexcept nogil
    uint64_t gw_fw_errors(gw_fw* w) noexcept nogil
    uint64_t gw_fw_lost(gw_fw* w) noexcept nogil
    int gw_fw_busy(gw_fw* w) noexcept nogil

from libc.stdlib cimport malloc


cdef class FileWriter:
    """See the module's docstring. Not thread-safe itself: one thread (the
    worker's loop) submits and collects."""
    cdef gw_fw* w
    cdef list paths                 # slot -> path
    cdef bint closed

    def __cinit__(self):
        self.w = gw_fw_new()
        if self.w == NULL:
            raise MemoryError()
        self.paths = []
        self.closed = False

    def __dealloc__(self):
        if self.w != NULL:
            with nogil:
                gw_fw_free(self.w)

    def submit(self, path, bytes data):
        """Queues `data` as the new content of `path` (copied; replaces a
        snapshot of the same path still waiting). Returns its generation, which
        results() reports when it is written."""
        cdef bytes p = os.fsencode(path)
        cdef bytes tmp = p + b".tmp"
        cdef bytes d = os.path.dirname(p) or b"."
        cdef int k
        cdef size_t n = <size_t>PyBytes_GET_SIZE(data)
        cdef uint8_t* buf
        cdef int e
        if self.closed:
            raise ValueError("the writer is closed")
        k = gw_fw_slot_of(self.w, p, tmp, d)
        if k < 0:
            raise MemoryError("no room for another file")
        if k == len(self.paths):
            self.paths.append(os.fsdecode(p))
        e = gw_fw_start(self.w)
        if e:
            raise OSError(e, os.strerror(e))
        buf = <uint8_t*>malloc(n if n else 1)
        if buf == NULL:
            raise MemoryError()
        memcpy(buf, PyBytes_AS_STRING(data), n)
        return gw_fw_submit(self.w, k, buf, n)

    def results(self):
        """[(path, generation, errno)] of the writes finished since the last call
        (errno 0: written and durable), oldest first."""
        cdef gw_fw_result[64] out
        cdef int n, i
        found = []
        while True:
            n = gw_fw_take(self.w, out, 64)
            for i in range(n):
                found.append((self.paths[out[i].slot], out[i].gen, out[i].err))
            if n < 64:
                return found

    def wait_idle(self, double timeout=0):
        """Waits until every submitted snapshot is written (or failed); at most
        `timeout` seconds (0: no limit). True when nothing is left."""
        cdef uint64_t ns = <uint64_t>(timeout * 1e9) if timeout > 0 else 0
        cdef int r
        with nogil:
            r = gw_fw_wait_idle(self.w, ns)
        return bool(r)

    def close(self):
        """Writes what is still pending, to the end, then stops the thread."""
        self.closed = True
        with nogil:
            gw_fw_stop(self.w)

    @property
    def writes(self):
        """Files written (and made durable) so far."""
        return gw_fw_writes(self.w)

    @property
    def errors(self):
        """Writes that failed so far."""
        return gw_fw_errors(self.w)

    @property
    def busy(self):
        """A write is in flight."""
        return bool(gw_fw_busy(self.w))

    @property
    def results_lost(self):
        """Completions results() could not report (more than 64 between two calls)."""
        return gw_fw_lost(self.w)

    def _inject(self, int err=0, int count=0, double delay=0):
        """Test hook: the next `count` writes fail with errno `err` without
        touching the disk; every write takes at least `delay` seconds."""
        gw_fw_inject(self.w, err, count, <uint64_t>(delay * 1e9))
