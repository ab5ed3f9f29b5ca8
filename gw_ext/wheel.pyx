# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Hashed timing wheel; see wheel.pxd. `TimerWheel` wraps it for tests and benchmarks."""

from libc.stdint cimport uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc


cdef inline void _link(TimerNode* head, TimerNode* node) noexcept nogil:
    node.prev = head.prev
    node.next = head
    head.prev.next = node
    head.prev = node


cdef inline void _unlink(TimerNode* node) noexcept nogil:
    node.prev.next = node.next
    node.next.prev = node.prev
    node.prev = NULL
    node.next = NULL


cdef int wheel_init(Wheel* w, uint32_t nslots, uint32_t tick_ms, uint64_t now_ms) noexcept nogil:
    cdef uint32_t n = 1
    cdef uint32_t i
    while n < nslots:
        n <<= 1
    w.slots = <TimerNode*>malloc(n * sizeof(TimerNode))
    if w.slots == NULL:
        return -1
    for i in range(n):
        w.slots[i].prev = &w.slots[i]
        w.slots[i].next = &w.slots[i]
        w.slots[i].deadline_ms = 0
    w.expired.prev = &w.expired
    w.expired.next = &w.expired
    w.mask = n - 1
    w.tick_ms = tick_ms if tick_ms > 0 else 1
    w.tick = now_ms // w.tick_ms
    w.count = 0
    return 0


cdef void wheel_free(Wheel* w) noexcept nogil:
    free(w.slots)
    w.slots = NULL
    w.count = 0


cdef void wheel_schedule(Wheel* w, TimerNode* node, uint64_t deadline_ms) noexcept nogil:
    # The first tick that starts at or after the deadline: when advance visits
    # that slot, now >= deadline, so the timer fires then. (Rounding down put it
    # in the tick being processed; an advance early in that tick skipped it and
    # it waited a whole revolution, 409.6 s.)
    cdef uint64_t t = (deadline_ms + w.tick_ms - 1) // w.tick_ms
    if node.prev != NULL:       # scheduled, or expired and not yet popped
        _unlink(node)
        w.count -= 1
    if t < w.tick:
        t = w.tick          # overdue: the next advance fires it
    node.deadline_ms = deadline_ms
    _link(&w.slots[t & w.mask], node)
    w.count += 1


cdef void wheel_cancel(Wheel* w, TimerNode* node) noexcept nogil:
    if node.prev != NULL:
        _unlink(node)
        w.count -= 1


cdef size_t wheel_expire(Wheel* w, uint64_t now_ms) noexcept nogil:
    cdef uint64_t last = now_ms // w.tick_ms
    cdef TimerNode* head
    cdef TimerNode* node
    cdef TimerNode* nxt
    cdef uint64_t steps = 0
    cdef size_t n = 0
    while w.tick <= last:
        head = &w.slots[w.tick & w.mask]
        node = head.next
        while node != head:
            nxt = node.next
            if node.deadline_ms <= now_ms:
                _unlink(node)
                _link(&w.expired, node)     # still counted until popped
                n += 1
            node = nxt
        w.tick += 1
        steps += 1
        if steps > w.mask:
            # Slept longer than a revolution: every slot has been visited once,
            # which is all that can expire; jump ahead.
            w.tick = last + 1
            break
    return n


cdef TimerNode* wheel_pop_expired(Wheel* w) noexcept nogil:
    cdef TimerNode* node = w.expired.next
    if node == &w.expired:
        return NULL
    _unlink(node)
    w.count -= 1
    return node


cdef class TimerWheel:
    """Python wrapper used by tests and bench: integer timer ids, no callbacks."""
    cdef Wheel w
    cdef TimerNode* nodes
    cdef Py_ssize_t capacity

    def __cinit__(self, Py_ssize_t capacity, uint32_t nslots=4096, uint32_t tick_ms=100, uint64_t now_ms=0):
        if wheel_init(&self.w, nslots, tick_ms, now_ms) != 0:
            raise MemoryError()
        self.nodes = <TimerNode*>calloc(capacity, sizeof(TimerNode))
        if self.nodes == NULL:
            raise MemoryError()
        self.capacity = capacity

    def __dealloc__(self):
        wheel_free(&self.w)
        free(self.nodes)

    def schedule(self, Py_ssize_t timer_id, uint64_t deadline_ms):
        if not 0 <= timer_id < self.capacity:
            raise IndexError(timer_id)
        wheel_schedule(&self.w, &self.nodes[timer_id], deadline_ms)

    def cancel(self, Py_ssize_t timer_id):
        if not 0 <= timer_id < self.capacity:
            raise IndexError(timer_id)
        wheel_cancel(&self.w, &self.nodes[timer_id])

    def schedule_many(self, uint64_t[::1] deadlines):
        """Schedules timers 0..len-1 (benchmark helper: no Python call per timer)."""
        cdef Py_ssize_t i
        if deadlines.shape[0] > self.capacity:
            raise IndexError(deadlines.shape[0])
        for i in range(deadlines.shape[0]):
            wheel_schedule(&self.w, &self.nodes[i], deadlines[i])

    def advance(self, uint64_t now_ms):
        """Returns the ids that expired, in no particular order."""
        cdef TimerNode* node
        wheel_expire(&self.w, now_ms)
        out = []
        while True:
            node = wheel_pop_expired(&self.w)
            if node == NULL:
                return out
            out.append(node - self.nodes)

    def expire(self, uint64_t now_ms):
        """Moves the expired timers to the expired list; how many (pop them with pop())."""
        return wheel_expire(&self.w, now_ms)

    def pop(self):
        """The next expired timer's id, or None."""
        cdef TimerNode* node = wheel_pop_expired(&self.w)
        return None if node == NULL else node - self.nodes

    def advance_count(self, uint64_t now_ms):
        """Like advance, but only counts (benchmark helper)."""
        cdef Py_ssize_t n = 0
        wheel_expire(&self.w, now_ms)
        while wheel_pop_expired(&self.w) != NULL:
            n += 1
        return n

    def __len__(self):
        return self.w.count
