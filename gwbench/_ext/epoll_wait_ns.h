/* epoll_wait with a timeout precise to the nanosecond (epoll_pwait2, Linux
   5.11) instead of whole milliseconds rounded up; on an older kernel,
   epoll_wait with the timeout rounded up to the millisecond. */
#ifndef GW_EPOLL_WAIT_NS_H
#define GW_EPOLL_WAIT_NS_H

#include <sys/epoll.h>

#pragma GCC visibility push(hidden)

/* timeout: seconds, < 0: without limit. As epoll_wait: events, or -1 and errno. */
int gw_epoll_wait_ns(int epfd, struct epoll_event* evs, int n, double timeout);

#pragma GCC visibility pop

#endif
