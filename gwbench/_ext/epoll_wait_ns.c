/* epoll_wait with a timeout precise to the nanosecond: see epoll_wait_ns.h. */
#include "epoll_wait_ns.h"

#include <errno.h>
#include <math.h>
#include <time.h>

static int gw_pwait2_missing = 0;     /* the kernel has no epoll_pwait2 (before 5.11) */

int gw_epoll_wait_ns(int epfd, struct epoll_event *evs, int n, double timeout)
{
    int r;
    if (timeout < 0)
        return epoll_wait(epfd, evs, n, -1);
    if (!gw_pwait2_missing) {
        struct timespec ts;
        ts.tv_sec = (time_t)timeout;
        ts.tv_nsec = (long)((timeout - (double)ts.tv_sec) * 1e9);
        if (ts.tv_nsec > 999999999) ts.tv_nsec = 999999999;
        r = epoll_pwait2(epfd, evs, n, &ts, NULL);
        if (r >= 0 || errno != ENOSYS)
            return r;
        gw_pwait2_missing = 1;
    }
    return epoll_wait(epfd, evs, n, (int)ceil(timeout * 1000.0));
}
