/* The write-ahead log's writer and its flusher thread: see wal_flusher.h. */
#include "wal_flusher.h"
#include "thread_stop.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#define GW_WAL_KICK_BYTES (1u << 20)        /* batch/off: write at once past this */
#define GW_WAL_RETRY_NS 1000000000ULL       /* retry of a failed write or fsync */
#define GW_WAL_BUF_MIN (256u << 10)
#define GW_WAL_BUF_KEEP (4u << 20)          /* a flusher buffer above this is shrunk when idle */

/* Bumped in a forked child: a Wal started before the fork has no flusher there. */
static int gw_wal_fork_gen;
static void gw_wal_atfork_child(void) { gw_wal_fork_gen++; }
void gw_wal_init(void) { pthread_atfork(NULL, NULL, gw_wal_atfork_child); }

static void gw_wal_wait_until(struct gw_wal* w, pthread_cond_t* cv, uint64_t deadline_ns) {
    struct timespec ts;
    ts.tv_sec = (time_t)(deadline_ns / 1000000000ULL);
    ts.tv_nsec = (long)(deadline_ns % 1000000000ULL);
    pthread_cond_timedwait(cv, &w->mu, &ts);
}

struct gw_wal* gw_wal_new(int mode, uint64_t segment_bytes, uint64_t max_pending,
                          uint64_t batch_ns) {
    struct gw_wal* w = (struct gw_wal*)calloc(1, sizeof(struct gw_wal));
    if (!w) return NULL;
    w->mode = mode;
    w->segment_bytes = segment_bytes;
    w->max_pending = max_pending;
    w->batch_ns = batch_ns;
    w->fd = w->dirfd = -1;
    w->retry_interval_ns = GW_WAL_RETRY_NS;
    w->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (w->efd < 0) { free(w); return NULL; }
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_mutex_init(&w->mu, NULL);
    pthread_cond_init(&w->cv_work, &ca);
    pthread_cond_init(&w->cv_done, &ca);
    pthread_condattr_destroy(&ca);
    w->p_buf = (uint8_t*)malloc(GW_WAL_BUF_MIN);
    w->p_cap = w->p_buf ? GW_WAL_BUF_MIN : 0;
    return w;
}

static void gw_wal_notify(struct gw_wal* w) {
    uint64_t one = 1;
    ssize_t r = write(w->efd, &one, 8);     /* EAGAIN (counter full) cannot happen */
    (void)r;
}

static int gw_wal_pwrite_all(struct gw_wal* w, const uint8_t* p, size_t n, uint64_t pos,
                             size_t* done) {
    *done = 0;
    while (*done < n) {
        ssize_t k;
        /* Acquire pairs with gw_wal_inject's release: the errno set with the count is seen. */
        if (__atomic_load_n(&w->inj_write_n, __ATOMIC_ACQUIRE) > 0) {
            __atomic_sub_fetch(&w->inj_write_n, 1, __ATOMIC_RELAXED);
            errno = __atomic_load_n(&w->inj_write_errno, __ATOMIC_RELAXED);
            k = -1;
        } else {
            k = pwrite(w->fd, p + *done, n - *done, (off_t)(pos + *done));
        }
        if (k < 0) {
            if (errno == EINTR) continue;
            return errno ? errno : EIO;
        }
        if (k == 0) return EIO;
        __atomic_add_fetch(&w->n_writes, 1, __ATOMIC_RELAXED);
        *done += (size_t)k;
    }
    return 0;
}

static int gw_wal_datasync(struct gw_wal* w) {
    int r;
    if (__atomic_load_n(&w->inj_fsync_n, __ATOMIC_ACQUIRE) > 0) {
        __atomic_sub_fetch(&w->inj_fsync_n, 1, __ATOMIC_RELAXED);
        return __atomic_load_n(&w->inj_fsync_errno, __ATOMIC_RELAXED);
    }
    do { r = fdatasync(w->fd); } while (r != 0 && errno == EINTR);
    if (r != 0) return errno ? errno : EIO;
    __atomic_add_fetch(&w->n_fsyncs, 1, __ATOMIC_RELAXED);
    return 0;
}

/* An fdatasync of the current segment failed: the kernel may have dropped its
   dirty pages, so its unsynced bytes (and header) are written again first. */
static void gw_wal_rewind(struct gw_wal* w) {
    w->wpos = w->sync_wpos;
    if (w->hdr_unsynced) w->hdr_ok = 0;
}

static int gw_wal_write_hdr(struct gw_wal* w) {
    uint8_t h[GW_WAL_HDR];
    size_t done;
    memcpy(h, "GWWAL001", 8);
    for (int i = 0; i < 8; i++) h[8 + i] = (uint8_t)(w->seg_base >> (8 * i));
    int e = gw_wal_pwrite_all(w, h, GW_WAL_HDR, 0, &done);   /* whole again on a retry */
    if (e) return e;
    w->hdr_ok = 1;
    w->hdr_unsynced = 1;
    return 0;
}

/* Starts the segment whose first record is at f_buf[wpos] (resumable: every
   step that succeeded is not done again). */
static int gw_wal_roll(struct gw_wal* w, int sync) {
    uint64_t base = w->f_off + w->wpos;
    if (w->fd >= 0 && w->seg_base != base) {          /* finish the current one */
        if (sync) {
            int e = gw_wal_datasync(w);
            if (e) { gw_wal_rewind(w); return e; }
            w->hdr_unsynced = 0;
        }
        close(w->fd);
        w->fd = -1;
    }
    if (w->fd < 0) {
        char name[32];
        snprintf(name, sizeof name, "%020llu.wal", (unsigned long long)base);
        /* O_TRUNC: a file of that name can only be ours from a failed attempt
           (everything from `base` on is not durable yet). */
        /* 0600: the log holds every reading, for this user only (in data_dir). */
        int fd = openat(w->dirfd, name, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
        if (fd < 0) return errno ? errno : EIO;
        w->fd = fd;
        w->seg_base = base;
        w->hdr_ok = 0;
        w->dir_dirty = 1;
        w->sync_wpos = w->wpos;
        __atomic_store_n(&w->cur_base, base, __ATOMIC_RELEASE);
    }
    if (!w->hdr_ok) {
        int e = gw_wal_write_hdr(w);
        if (e) return e;
    }
    w->chunk_end = w->wpos;                           /* the next chunk is computed again */
    return 0;
}

/* Writes (and syncs, per policy) f_buf from wpos on: 0, or the errno of the
   failing call; called again after an error, it continues from there. */
static int gw_wal_io(struct gw_wal* w) {
    int sync = w->mode != GW_WAL_OFF, e;
    size_t done;
    while (w->wpos < w->f_len) {
        if (w->wpos == w->chunk_end) {
            /* the whole records that fit in the current segment */
            uint64_t used = GW_WAL_HDR + (w->f_off + w->wpos - w->seg_base);
            size_t end = w->wpos;
            while (end < w->f_len) {
                uint64_t rec = GW_WAL_REC_HDR + (uint64_t)gw_le32(w->f_buf + end);
                uint64_t filled = used + (end - w->wpos);
                if (filled + rec > w->segment_bytes && filled > GW_WAL_HDR) break;
                end += rec;
            }
            if (end == w->wpos) {
                if ((e = gw_wal_roll(w, sync)) != 0) return e;
                continue;
            }
            w->chunk_end = end;
        }
        if (!w->hdr_ok && (e = gw_wal_write_hdr(w)) != 0) return e;
        e = gw_wal_pwrite_all(w, w->f_buf + w->wpos, w->chunk_end - w->wpos,
                              GW_WAL_HDR + (w->f_off + w->wpos - w->seg_base), &done);
        w->wpos += done;
        if (e) return e;
    }
    if (sync) {
        if (!w->hdr_ok && (e = gw_wal_write_hdr(w)) != 0) return e;
        if ((e = gw_wal_datasync(w)) != 0) { gw_wal_rewind(w); return e; }
        w->hdr_unsynced = 0;
        w->sync_wpos = w->wpos;
        if (w->dir_dirty) {
            int r;
            do { r = fsync(w->dirfd); } while (r != 0 && errno == EINTR);
            if (r != 0) return errno ? errno : EIO;
            w->dir_dirty = 0;
        }
    }
    return 0;
}

static void* gw_wal_main(void* arg) {
    struct gw_wal* w = (struct gw_wal*)arg;
    pthread_mutex_lock(&w->mu);
    for (;;) {
        if (w->f_len == 0) {
            /* wait for records, then for the group to fill (batch, off) */
            for (;;) {
                if (w->p_len == 0) {
                    if (w->stop) goto out;
                    w->waiting = 1;
                    pthread_cond_wait(&w->cv_work, &w->mu);
                    w->waiting = 0;
                    continue;
                }
                if (w->mode == GW_WAL_ALWAYS || w->stop || w->p_len >= GW_WAL_KICK_BYTES
                        || w->flush_target > __atomic_load_n(&w->durable, __ATOMIC_RELAXED))
                    break;
                uint64_t due = w->last_cycle_ns + w->batch_ns;
                if (gw_wal_now_ns() >= due) break;
                w->waiting = 2;
                gw_wal_wait_until(w, &w->cv_work, due);
                w->waiting = 0;
            }
            /* take the pending records; ours (emptied) becomes the pending buffer */
            uint8_t* b = w->f_buf; size_t cap = w->f_cap;
            w->f_buf = w->p_buf; w->f_cap = w->p_cap; w->f_len = w->p_len;
            w->p_buf = b; w->p_cap = cap; w->p_len = 0;
            w->f_off = w->appended - w->f_len;
            w->wpos = w->chunk_end = w->sync_wpos = 0;
        } else {
            /* a failed group: retried about every second, from where it stopped */
            if (w->stop) goto out;            /* given up: none of it was acknowledged */
            if (gw_wal_now_ns() < w->retry_ns) {
                w->waiting = 2;
                gw_wal_wait_until(w, &w->cv_work, w->retry_ns);
                w->waiting = 0;
                continue;
            }
        }
        pthread_mutex_unlock(&w->mu);
        w->last_cycle_ns = gw_wal_now_ns();
        int e = gw_wal_io(w);
        size_t took = w->f_len;
        if (e == 0 && w->f_cap > GW_WAL_BUF_KEEP && took < w->f_cap / 8) {
            free(w->f_buf);                   /* a burst is over: give the memory back */
            w->f_buf = (uint8_t*)malloc(GW_WAL_BUF_MIN);
            w->f_cap = w->f_buf ? GW_WAL_BUF_MIN : 0;
        }
        pthread_mutex_lock(&w->mu);
        if (e == 0) {
            __atomic_store_n(&w->durable, w->f_off + took, __ATOMIC_RELEASE);
            __atomic_store_n(&w->err, 0, __ATOMIC_RELEASE);
            w->f_len = 0;
            gw_wal_notify(w);
        } else {
            __atomic_add_fetch(&w->n_errors, 1, __ATOMIC_RELAXED);
            int was = __atomic_exchange_n(&w->err, e, __ATOMIC_ACQ_REL);
            w->retry_ns = gw_wal_now_ns() + __atomic_load_n(&w->retry_interval_ns, __ATOMIC_RELAXED);
            if (!was) gw_wal_notify(w);       /* the loop learns of the error state */
        }
        pthread_cond_broadcast(&w->cv_done);
    }
out:
    w->exited = 1;
    pthread_cond_broadcast(&w->cv_done);
    pthread_mutex_unlock(&w->mu);
    return NULL;
}

int gw_wal_start(struct gw_wal* w, int dirfd, int fd, uint64_t base, uint64_t end) {
    sigset_t all, old;
    w->dirfd = dirfd;
    w->fd = fd;
    w->seg_base = base;
    w->hdr_ok = 1;
    w->cur_base = base;
    w->appended = w->durable = w->flush_target = end;
    w->fork_gen = gw_wal_fork_gen;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);         /* the flusher blocks every signal */
    int e = pthread_create(&w->thread, NULL, gw_wal_main, w);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (e) return e;
    w->started = 1;
    return 0;
}

int64_t gw_wal_append(struct gw_wal* w, const uint8_t* p, uint32_t n, int ignore_err) {
    uint32_t crc = gw_crc32c(0, p, n);
    uint64_t rec = GW_WAL_REC_HDR + (uint64_t)n;
    int wake = 0;
    int64_t end;
    if (w->fork_gen != gw_wal_fork_gen) return -1;      /* a forked child: no flusher */
    pthread_mutex_lock(&w->mu);
    if ((w->err && !ignore_err) || w->stop
            || w->appended + rec - __atomic_load_n(&w->durable, __ATOMIC_ACQUIRE) > w->max_pending) {
        pthread_mutex_unlock(&w->mu);
        return -1;
    }
    if (w->p_len + rec > w->p_cap) {
        size_t cap = w->p_cap ? w->p_cap : GW_WAL_BUF_MIN;
        while (cap < w->p_len + rec) cap *= 2;
        uint8_t* b = (uint8_t*)realloc(w->p_buf, cap);
        if (!b) { pthread_mutex_unlock(&w->mu); return -1; }
        w->p_buf = b;
        w->p_cap = cap;
    }
    uint8_t* d = w->p_buf + w->p_len;
    gw_put32(d, n);
    gw_put32(d + 4, crc);
    memcpy(d + GW_WAL_REC_HDR, p, n);
    w->p_len += rec;
    w->appended += rec;
    end = (int64_t)w->appended;
    if (w->waiting == 1 || (w->waiting == 2 && w->p_len >= GW_WAL_KICK_BYTES)) {
        w->waiting = 0;
        wake = 1;
    }
    pthread_mutex_unlock(&w->mu);
    if (wake) pthread_cond_signal(&w->cv_work);
    return end;
}

int gw_wal_room(struct gw_wal* w, uint32_t n) {
    uint64_t rec = GW_WAL_REC_HDR + (uint64_t)n;
    if (w->fork_gen != gw_wal_fork_gen) return 0;
    pthread_mutex_lock(&w->mu);
    int ok = !w->err && !w->stop
             && w->appended + rec - __atomic_load_n(&w->durable, __ATOMIC_ACQUIRE) <= w->max_pending;
    pthread_mutex_unlock(&w->mu);
    return ok;
}

int gw_wal_flush(struct gw_wal* w, uint64_t timeout_ns) {
    uint64_t deadline = timeout_ns ? gw_wal_now_ns() + timeout_ns : 0;
    int ok = 1;
    if (w->fork_gen != gw_wal_fork_gen) return 0;
    pthread_mutex_lock(&w->mu);
    uint64_t target = w->appended;
    if (target > w->flush_target) w->flush_target = target;
    if (w->waiting) { w->waiting = 0; pthread_cond_signal(&w->cv_work); }
    while (__atomic_load_n(&w->durable, __ATOMIC_ACQUIRE) < target) {
        if (!w->started || w->exited) { ok = 0; break; }
        if (deadline) {
            if (gw_wal_now_ns() >= deadline) { ok = 0; break; }
            gw_wal_wait_until(w, &w->cv_done, deadline);
        } else {
            pthread_cond_wait(&w->cv_done, &w->mu);
        }
    }
    pthread_mutex_unlock(&w->mu);
    return ok;
}

void gw_wal_stop(struct gw_wal* w) {
    if (!w->started) return;
    if (w->fork_gen != gw_wal_fork_gen) { w->started = 0; return; }   /* not our thread */
    gw_thread_stop(&w->mu, &w->cv_work, &w->stop, w->thread);
    w->started = 0;
}

void gw_wal_close_fds(struct gw_wal* w) {
    if (w->fd >= 0) { close(w->fd); w->fd = -1; }
    if (w->dirfd >= 0) { close(w->dirfd); w->dirfd = -1; }
    if (w->efd >= 0) { close(w->efd); w->efd = -1; }
}

void gw_wal_free(struct gw_wal* w) {
    gw_wal_stop(w);
    gw_wal_close_fds(w);
    pthread_mutex_destroy(&w->mu);
    pthread_cond_destroy(&w->cv_work);
    pthread_cond_destroy(&w->cv_done);
    free(w->p_buf);
    free(w->f_buf);
    free(w);
}

uint64_t gw_wal_drain(struct gw_wal* w) {
    uint64_t v;
    ssize_t r = read(w->efd, &v, 8);
    (void)r;
    return __atomic_load_n(&w->durable, __ATOMIC_ACQUIRE);
}

void gw_wal_inject(struct gw_wal* w, int fsync_errno, int fsync_n, int write_errno, int write_n,
                   uint64_t retry_ns) {
    if (retry_ns) __atomic_store_n(&w->retry_interval_ns, retry_ns, __ATOMIC_RELAXED);
    if (fsync_n >= 0) {                     /* -1: that kind unchanged */
        __atomic_store_n(&w->inj_fsync_errno, fsync_errno, __ATOMIC_RELAXED);
        __atomic_store_n(&w->inj_fsync_n, fsync_n, __ATOMIC_RELEASE);
    }
    if (write_n >= 0) {
        __atomic_store_n(&w->inj_write_errno, write_errno, __ATOMIC_RELAXED);
        __atomic_store_n(&w->inj_write_n, write_n, __ATOMIC_RELEASE);
    }
}
