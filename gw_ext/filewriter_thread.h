/* Whole files replaced atomically by a background pthread, C only (no GIL,
   every signal blocked): each snapshot is written to PATH.tmp, fsynced,
   renamed over PATH and the directory fsynced. One write in flight at a time;
   a snapshot submitted for a path whose previous one still waits replaces it.
   filewriter.pyx wraps it as FileWriter; one thread submits and collects. */
#ifndef GW_FILEWRITER_THREAD_H
#define GW_FILEWRITER_THREAD_H

#include <stddef.h>
#include <stdint.h>

struct gw_fw;                                 /* a writer and its thread */

struct gw_fw_result { int slot; int err; uint64_t gen; };   /* a finished write (err 0: durable) */

#pragma GCC visibility push(hidden)

/* A writer, its thread not started yet; NULL when out of memory. */
struct gw_fw* gw_fw_new(void);

/* Starts the thread (once; again is a no-op). 0 or an errno. */
int gw_fw_start(struct gw_fw* w);

/* The slot of a file (path, its temporary file, its directory), or -1 when
   the table is full or memory runs out. Strings are copied. */
int gw_fw_slot_of(struct gw_fw* w, const char* path, const char* tmp, const char* dir);

/* Hands buf (malloc'ed; the writer frees it) over as slot k's newest
   snapshot, replacing one still waiting; its generation. */
uint64_t gw_fw_submit(struct gw_fw* w, int k, uint8_t* buf, size_t len);

/* Waits until nothing is pending or in flight, at most timeout_ns (0:
   without limit). 1 when idle. */
int gw_fw_wait_idle(struct gw_fw* w, uint64_t timeout_ns);

/* Writes what is pending, then stops the thread. */
void gw_fw_stop(struct gw_fw* w);

/* Copies up to n completions into out (oldest first), removing them. */
int gw_fw_take(struct gw_fw* w, struct gw_fw_result* out, int n);

/* Stops the thread, frees the writer and what it still holds. */
void gw_fw_free(struct gw_fw* w);

/* Test hook: the next n writes fail with errno err without touching the
   disk; every write takes at least delay_ns. */
void gw_fw_inject(struct gw_fw* w, int err, int n, uint64_t delay_ns);

uint64_t gw_fw_writes(struct gw_fw* w);      /* files written and durable */
uint64_t gw_fw_errors(struct gw_fw* w);      /* writes failed */
int gw_fw_busy(struct gw_fw* w);             /* a write in flight */
uint64_t gw_fw_lost(struct gw_fw* w);        /* completions dropped while the results were full */

#pragma GCC visibility pop

#endif
