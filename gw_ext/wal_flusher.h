/* The write-ahead log's writer (the design is described in wal.pxd): the loop
   thread frames records into a pending buffer; a flusher pthread, C only (no
   GIL, every signal blocked), writes them to segment files with pwrite,
   fdatasyncs them per the policy, publishes the durable offset and writes an
   eventfd the loop polls. On a write or fsync error it enters the error state
   and retries about every second from where it stopped. */
#ifndef GW_WAL_FLUSHER_H
#define GW_WAL_FLUSHER_H

#include <pthread.h>
#include <stdint.h>
#include <time.h>

#include "wal_records.h"

enum { GW_WAL_ALWAYS = 0, GW_WAL_BATCH = 1, GW_WAL_OFF = 2 };   /* fsync policies */

/* Defined here, not kept opaque, so the accessors at the end inline into the
   caller (the worker loop reads them per message). Only wal_flusher.c
   touches the fields otherwise. */
struct gw_wal {
    /* configuration */
    int mode;
    uint64_t segment_bytes, max_pending, batch_ns;
    int efd, dirfd;

    pthread_mutex_t mu;
    pthread_cond_t cv_work;       /* the flusher waits for records */
    pthread_cond_t cv_done;       /* flush() waits for the durable offset */
    pthread_t thread;
    int started, exited;
    int fork_gen;                 /* gw_wal_fork_gen when started */

    /* under mu */
    uint8_t* p_buf; size_t p_len, p_cap;     /* pending: records not yet taken by the flusher */
    uint64_t appended;                       /* written by the loop thread (under mu) */
    uint64_t flush_target;
    int waiting;                             /* flusher: 1 waits for records, 2 batch timer, 0 busy */
    int stop;

    /* published by the flusher (atomics), read by the loop thread */
    uint64_t durable;
    uint64_t cur_base;                       /* base of the segment being written */
    int err;                                 /* errno of the failing write/fsync, 0: fine */
    uint64_t n_fsyncs, n_writes, n_errors;

    /* the flusher's own */
    int fd;                                  /* the segment being written */
    uint64_t seg_base;
    int hdr_ok;                              /* its header is written */
    int hdr_unsynced;                        /* ... and not fdatasync'ed yet */
    int dir_dirty;                           /* a segment was created since the last directory fsync */
    uint8_t* f_buf; size_t f_len, f_cap;     /* the group being written, bytes from offset f_off */
    uint64_t f_off;
    size_t wpos;                             /* written up to f_buf[wpos] */
    size_t chunk_end;                        /* end of the records that fit the current segment */
    size_t sync_wpos;                        /* current segment's bytes from here on are not synced */
    uint64_t last_cycle_ns, retry_ns;
    uint64_t retry_interval_ns;              /* GW_WAL_RETRY_NS (tests shorten it) */

    /* test hooks: fail the next n calls with an errno, without calling */
    int inj_fsync_errno, inj_fsync_n, inj_write_errno, inj_write_n;
};

#pragma GCC visibility push(hidden)

/* Once per process, before any log is started (registers the fork handler). */
void gw_wal_init(void);

/* A log not started yet (mode: GW_WAL_*; batch_ns: the group-commit window of
   "batch" and "off"), or NULL when out of memory or eventfds. */
struct gw_wal* gw_wal_new(int mode, uint64_t segment_bytes, uint64_t max_pending, uint64_t batch_ns);

/* Starts the flusher on a recovered log: the segment `fd` (base `base`, its
   header written), whose records end at offset `end`; dirfd: the log's
   directory. Both fds are the log's from then on. 0 or an errno. */
int gw_wal_start(struct gw_wal* w, int dirfd, int fd, uint64_t base, uint64_t end);

/* The loop thread: frames a record; its end offset, or -1 (refused).
   ignore_err: the caller saw room (gw_wal_room) just before, in the same
   thread: an error state the flusher entered since does not refuse the
   record (it waits in the buffer, within max_pending, for the disk). */
int64_t gw_wal_append(struct gw_wal* w, const uint8_t* p, uint32_t n, int ignore_err);

/* Whether an append of an n-byte payload would be taken now. */
int gw_wal_room(struct gw_wal* w, uint32_t n);

/* Blocks until everything appended so far is durable: 1, or 0 after
   timeout_ns (0: no limit) or if the flusher has stopped. */
int gw_wal_flush(struct gw_wal* w, uint64_t timeout_ns);

/* Stops the flusher (it writes what is pending once more unless in error). */
void gw_wal_stop(struct gw_wal* w);

void gw_wal_close_fds(struct gw_wal* w);

/* Stops the flusher, closes the fds, frees the log. */
void gw_wal_free(struct gw_wal* w);

/* Drains the eventfd; the durable offset. */
uint64_t gw_wal_drain(struct gw_wal* w);

/* Test hook: the next fsync_n fdatasyncs / write_n pwrites fail with the
   errno given, without being called (-1: that kind unchanged); retry_ns
   (0: unchanged) replaces the retry interval of the error state. */
void gw_wal_inject(struct gw_wal* w, int fsync_errno, int fsync_n, int write_errno, int write_n,
                   uint64_t retry_ns);

#pragma GCC visibility pop

static inline uint64_t gw_wal_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static inline uint64_t gw_wal_durable(struct gw_wal* w) { return __atomic_load_n(&w->durable, __ATOMIC_ACQUIRE); }
static inline uint64_t gw_wal_appended(struct gw_wal* w) { return w->appended; }
static inline int gw_wal_err(struct gw_wal* w) { return __atomic_load_n(&w->err, __ATOMIC_ACQUIRE); }
static inline uint64_t gw_wal_fsyncs(struct gw_wal* w) { return __atomic_load_n(&w->n_fsyncs, __ATOMIC_RELAXED); }
static inline uint64_t gw_wal_writes(struct gw_wal* w) { return __atomic_load_n(&w->n_writes, __ATOMIC_RELAXED); }
static inline uint64_t gw_wal_errors(struct gw_wal* w) { return __atomic_load_n(&w->n_errors, __ATOMIC_RELAXED); }
static inline uint64_t gw_wal_cur_base(struct gw_wal* w) { return __atomic_load_n(&w->cur_base, __ATOMIC_ACQUIRE); }
static inline int gw_wal_efd(struct gw_wal* w) { return w->efd; }

#endif
