/* Stopping a background thread that sleeps on a condition variable until it
   has work or is told to stop: the file writer's (filewriter_thread.c) and the
   write-ahead log's flusher (wal_flusher.c). */
#ifndef GW_THREAD_STOP_H
#define GW_THREAD_STOP_H

#include <pthread.h>

/* Sets *stop under mu, wakes the thread waiting on cv_work and waits until it
   has ended. */
static inline void gw_thread_stop(pthread_mutex_t* mu, pthread_cond_t* cv_work, int* stop, pthread_t thread) {
    pthread_mutex_lock(mu);
    *stop = 1;
    pthread_cond_signal(cv_work);
    pthread_mutex_unlock(mu);
    pthread_join(thread, NULL);
}

#endif
