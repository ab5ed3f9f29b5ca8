"""The query API's threads: a worker's store queries run here, off its event loop.

A query of the store (gw/query.py) may take up to its budget (250 ms); run in
the worker's event loop it would hold every other connection of that worker
(MQTT included) for as long. So the HTTP app hands each query route's work to
this pool and the loop goes on; a thread runs the SQLite query and builds the
response bytes (sqlite3 releases the GIL while SQLite works), puts the answer
on a queue and writes to an eventfd in the loop's epoll set; the loop drains
the queue and writes each answer on its connection (gw_ext/worker/http_queries.pyx).

- Threads start with the first query, so a worker that serves none has none;
  they are daemon threads and end with the worker.
- At most `max_pending` queries are waiting, running or done but not yet
  taken by the loop; `submit` refuses more (the app answers 503 with
  Retry-After and counts it).
- Only the loop thread calls `submit` and `drain`; `pending` is its count.
  The threads touch nothing of the loop: no counters, no connections.
- The threads block the signals the worker handles (SIGTERM, SIGHUP, ...), so
  the kernel delivers them to the loop's thread, whose epoll_wait they
  interrupt.
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import signal
import threading
import time

log = logging.getLogger("gw.query")

# Signals the worker handles (or ignores) in its main thread; a pool thread never takes them.
_ASYNC_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2,
                  signal.SIGCHLD, signal.SIGPIPE, signal.SIGALRM, signal.SIGXFSZ, signal.SIGWINCH}
INTERNAL_ERROR = (500, b"application/json",
                  b'{"code":"internal_error","message":"the server failed to handle the request"}', b"")


class QueryPool:
    """`threads` threads running jobs `fn(*args)` that return an HTTP answer
    (status, content type, body, extra header lines); each answer comes back
    from `drain` with the token it was submitted with."""

    def __init__(self, threads: int, max_pending: int, *, name: str = "query"):
        if threads < 1 or max_pending < 1:
            raise ValueError("a query pool needs at least one thread and one pending slot")
        self.threads = threads
        self.max_pending = max_pending
        self.name = name
        self.pending = 0            # submitted and not yet returned by drain (loop thread only)
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._done: collections.deque = collections.deque()
        self._started: list[threading.Thread] = []
        self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._last_log = 0.0

    def fileno(self) -> int:
        """The eventfd the loop watches: readable once an answer is ready."""
        return self._efd

    def submit(self, token, fn, *args) -> bool:
        """Queues fn(*args); False (nothing queued) when max_pending are pending."""
        if self.pending >= self.max_pending:
            return False
        if len(self._started) < self.threads:
            self._start_thread()
        self.pending += 1
        self._jobs.put((token, fn, args))
        return True

    def drain(self) -> list:
        """[(token, answer)] of every job finished since the last call, in the
        order they finished."""
        try:
            os.eventfd_read(self._efd)
        except BlockingIOError:
            pass
        done = self._done
        out = []
        while done:
            out.append(done.popleft())
        self.pending -= len(out)
        return out

    def _start_thread(self) -> None:
        thread = threading.Thread(target=self._run, name=f"{self.name}-{len(self._started)}", daemon=True)
        # The thread inherits the mask it is started with: never a moment with these signals open.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, _ASYNC_SIGNALS)
        try:
            thread.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        self._started.append(thread)

    def _run(self) -> None:
        jobs, done, efd = self._jobs, self._done, self._efd
        while True:
            token, fn, args = jobs.get()
            try:
                answer = fn(*args)
            except BaseException:        # a job's own failure (jobs answer 500 themselves): the thread goes on
                now = time.monotonic()
                if now - self._last_log >= 10.0 or self._last_log == 0.0:
                    self._last_log = now
                    log.exception("%s thread: a job failed (logged at most every 10 s)", self.name)
                answer = INTERNAL_ERROR
            done.append((token, answer))
            os.eventfd_write(efd, 1)
