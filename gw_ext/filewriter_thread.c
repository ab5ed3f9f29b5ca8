/* The writer thread of whole files: see filewriter_thread.h. */
#include "filewriter_thread.h"
#include "thread_stop.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define GW_FW_SLOTS 8                 /* distinct files one writer handles */
#define GW_FW_RESULTS 64              /* completions kept until results() takes them */

struct gw_fw_slot {
    char* path; char* tmp; char* dir;
    uint8_t* pend; size_t pend_len; uint64_t pend_gen;   /* waiting snapshot (pend != NULL) */
    uint64_t gen;                                         /* last generation submitted */
};

struct gw_fw {
    pthread_mutex_t mu;
    pthread_cond_t cv_work;           /* the thread waits for a snapshot */
    pthread_cond_t cv_idle;           /* wait_idle() waits for nothing pending or in flight */
    pthread_t thread;
    int started, stop, busy, nslots, next;
    struct gw_fw_slot slots[GW_FW_SLOTS];
    struct gw_fw_result results[GW_FW_RESULTS];
    int nresults;
    uint64_t results_lost;            /* completions dropped while results[] was full */
    uint64_t n_writes, n_errors;
    int inj_errno, inj_n;             /* test hook: fail the next inj_n writes with inj_errno */
    uint64_t inj_delay_ns;            /* test hook: each write takes at least this long */
};

static int gw_fw_write(struct gw_fw_slot* s, const uint8_t* buf, size_t len) {
    int fd, dfd, e;
    size_t off = 0;
    /* 0600: sessions and retained messages in data_dir are this user's only. A
       leftover temporary file keeps its mode: made 0600 before it is written. */
    fd = open(s->tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd >= 0 && fchmod(fd, 0600) != 0) {
        e = errno;
        close(fd);
        return e;
    }
    if (fd < 0) return errno;
    while (off < len) {
        ssize_t r = write(fd, buf + off, len - off);
        if (r < 0) {
            if (errno == EINTR) continue;
            goto fail;
        }
        off += (size_t)r;
    }
    if (fsync(fd) < 0) goto fail;
    e = close(fd);
    fd = -1;
    if (e < 0) goto fail;
    if (rename(s->tmp, s->path) < 0) goto fail;
    dfd = open(s->dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd < 0) return errno;
    e = fsync(dfd) < 0 ? errno : 0;
    close(dfd);
    return e;
fail:
    e = errno;
    if (fd >= 0) close(fd);
    unlink(s->tmp);
    return e;
}

static void* gw_fw_main(void* arg) {
    struct gw_fw* w = (struct gw_fw*)arg;
    pthread_mutex_lock(&w->mu);
    for (;;) {
        int i, k = -1;
        for (i = 0; i < w->nslots; i++) {          /* round robin over the files */
            int j = (w->next + i) % w->nslots;
            if (w->slots[j].pend) { k = j; break; }
        }
        if (k < 0) {
            w->busy = 0;
            pthread_cond_broadcast(&w->cv_idle);
            if (w->stop) break;
            pthread_cond_wait(&w->cv_work, &w->mu);
            continue;
        }
        struct gw_fw_slot* s = &w->slots[k];
        uint8_t* buf = s->pend;
        size_t len = s->pend_len;
        uint64_t gen = s->pend_gen;
        int err;
        s->pend = NULL;
        w->busy = 1;
        w->next = (k + 1) % w->nslots;
        if (w->inj_n > 0) {
            w->inj_n--;
            err = w->inj_errno;
            pthread_mutex_unlock(&w->mu);
        } else {
            uint64_t delay = w->inj_delay_ns;
            pthread_mutex_unlock(&w->mu);
            if (delay) {
                struct timespec ts = {(time_t)(delay / 1000000000ULL), (long)(delay % 1000000000ULL)};
                while (nanosleep(&ts, &ts) < 0 && errno == EINTR) {}
            }
            err = gw_fw_write(s, buf, len);
        }
        free(buf);
        pthread_mutex_lock(&w->mu);
        if (err) w->n_errors++; else w->n_writes++;
        if (w->nresults < GW_FW_RESULTS) {
            w->results[w->nresults].slot = k;
            w->results[w->nresults].err = err;
            w->results[w->nresults].gen = gen;
            w->nresults++;
        } else {
            w->results_lost++;
        }
    }
    pthread_mutex_unlock(&w->mu);
    return NULL;
}

struct gw_fw* gw_fw_new(void) {
    struct gw_fw* w = (struct gw_fw*)calloc(1, sizeof(struct gw_fw));
    if (!w) return NULL;
    pthread_mutex_init(&w->mu, NULL);
    pthread_cond_init(&w->cv_work, NULL);
    pthread_cond_init(&w->cv_idle, NULL);
    return w;
}

int gw_fw_start(struct gw_fw* w) {
    sigset_t all, old;
    int e;
    if (w->started) return 0;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);       /* the writer blocks every signal */
    e = pthread_create(&w->thread, NULL, gw_fw_main, w);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (e) return e;
    w->started = 1;
    return 0;
}

int gw_fw_slot_of(struct gw_fw* w, const char* path, const char* tmp, const char* dir) {
    int i;
    char *p, *t, *d;
    for (i = 0; i < w->nslots; i++)
        if (strcmp(w->slots[i].path, path) == 0) return i;
    if (w->nslots == GW_FW_SLOTS) return -1;
    p = strdup(path); t = strdup(tmp); d = strdup(dir);
    if (!p || !t || !d) { free(p); free(t); free(d); return -1; }
    pthread_mutex_lock(&w->mu);
    i = w->nslots;
    w->slots[i].path = p; w->slots[i].tmp = t; w->slots[i].dir = d;
    w->nslots++;
    pthread_mutex_unlock(&w->mu);
    return i;
}

uint64_t gw_fw_submit(struct gw_fw* w, int k, uint8_t* buf, size_t len) {
    struct gw_fw_slot* s = &w->slots[k];
    uint8_t* old;
    uint64_t gen;
    pthread_mutex_lock(&w->mu);
    old = s->pend;
    s->pend = buf;
    s->pend_len = len;
    gen = s->pend_gen = ++s->gen;
    pthread_cond_signal(&w->cv_work);
    pthread_mutex_unlock(&w->mu);
    free(old);
    return gen;
}

static int gw_fw_pending(struct gw_fw* w) {
    int i, n = 0;
    for (i = 0; i < w->nslots; i++) n += w->slots[i].pend != NULL;
    return n + w->busy;
}

int gw_fw_wait_idle(struct gw_fw* w, uint64_t timeout_ns) {
    struct timespec ts;
    int idle;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_sec += (time_t)(timeout_ns / 1000000000ULL);
    ts.tv_nsec += (long)(timeout_ns % 1000000000ULL);
    if (ts.tv_nsec >= 1000000000L) { ts.tv_sec++; ts.tv_nsec -= 1000000000L; }
    pthread_mutex_lock(&w->mu);
    while (w->started && gw_fw_pending(w)) {
        if (timeout_ns == 0) pthread_cond_wait(&w->cv_idle, &w->mu);
        else if (pthread_cond_timedwait(&w->cv_idle, &w->mu, &ts) == ETIMEDOUT) break;
    }
    idle = !gw_fw_pending(w);
    pthread_mutex_unlock(&w->mu);
    return idle;
}

void gw_fw_stop(struct gw_fw* w) {
    if (!w->started) return;
    gw_thread_stop(&w->mu, &w->cv_work, &w->stop, w->thread);
    w->started = 0;
}

int gw_fw_take(struct gw_fw* w, struct gw_fw_result* out, int n) {
    int k;
    pthread_mutex_lock(&w->mu);
    k = w->nresults < n ? w->nresults : n;
    memcpy(out, w->results, (size_t)k * sizeof(struct gw_fw_result));
    memmove(w->results, w->results + k, (size_t)(w->nresults - k) * sizeof(struct gw_fw_result));
    w->nresults -= k;
    pthread_mutex_unlock(&w->mu);
    return k;
}

void gw_fw_free(struct gw_fw* w) {
    int i;
    gw_fw_stop(w);
    for (i = 0; i < w->nslots; i++) {
        free(w->slots[i].path); free(w->slots[i].tmp); free(w->slots[i].dir); free(w->slots[i].pend);
    }
    pthread_mutex_destroy(&w->mu);
    pthread_cond_destroy(&w->cv_work);
    pthread_cond_destroy(&w->cv_idle);
    free(w);
}

void gw_fw_inject(struct gw_fw* w, int err, int n, uint64_t delay_ns) {
    pthread_mutex_lock(&w->mu);
    w->inj_errno = err; w->inj_n = n; w->inj_delay_ns = delay_ns;
    pthread_mutex_unlock(&w->mu);
}

uint64_t gw_fw_writes(struct gw_fw* w) {
    uint64_t v; pthread_mutex_lock(&w->mu); v = w->n_writes; pthread_mutex_unlock(&w->mu); return v;
}
uint64_t gw_fw_errors(struct gw_fw* w) {
    uint64_t v; pthread_mutex_lock(&w->mu); v = w->n_errors; pthread_mutex_unlock(&w->mu); return v;
}
int gw_fw_busy(struct gw_fw* w) {
    int v; pthread_mutex_lock(&w->mu); v = w->busy; pthread_mutex_unlock(&w->mu); return v;
}
uint64_t gw_fw_lost(struct gw_fw* w) {
    uint64_t v; pthread_mutex_lock(&w->mu); v = w->results_lost; pthread_mutex_unlock(&w->mu); return v;
}
