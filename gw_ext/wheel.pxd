# A hashed timing wheel (Varghese & Lauck, scheme 6) for keepalive and
# connect timeouts: O(1) schedule and cancel, and advancing costs one slot
# per elapsed tick plus the timers that expire or wrap.
#
# Timer nodes are intrusive: the caller embeds a TimerNode in its own struct
# (the worker puts one at the start of each connection), so the wheel never
# allocates per timer.

from libc.stdint cimport uint32_t, uint64_t

cdef struct TimerNode:
    TimerNode* prev       # NULL when neither scheduled nor expired
    TimerNode* next
    uint64_t deadline_ms  # when it expires (absolute, same clock as `now_ms`)

cdef struct Wheel:
    TimerNode* slots      # nslots sentinel heads (circular lists)
    TimerNode expired     # sentinel of the expired list (wheel_expire .. wheel_pop_expired)
    uint32_t mask         # nslots - 1; nslots is a power of two
    uint32_t tick_ms      # resolution
    uint64_t tick         # the next tick to process
    size_t count          # timers scheduled or expired and not yet popped

# 0 on success, -1 when memory runs out. nslots is rounded up to a power of two.
cdef int wheel_init(Wheel* w, uint32_t nslots, uint32_t tick_ms, uint64_t now_ms) noexcept nogil
cdef void wheel_free(Wheel* w) noexcept nogil
# Schedules (or moves) a timer, also one on the expired list. A deadline in
# the past fires on the next expire.
cdef void wheel_schedule(Wheel* w, TimerNode* node, uint64_t deadline_ms) noexcept nogil
# Unschedules a timer, also one on the expired list (it will not be popped).
cdef void wheel_cancel(Wheel* w, TimerNode* node) noexcept nogil
# Moves every timer whose deadline is <= now_ms to the wheel's expired list;
# returns how many. Timers more than one revolution away stay in their slot
# until their round comes.
cdef size_t wheel_expire(Wheel* w, uint64_t now_ms) noexcept nogil
# The next expired timer, unlinked (NULL when none is left). Popping one at a
# time, rather than walking a chain the wheel handed out, lets the handler of
# one timer cancel or reschedule any other, expired or not.
cdef TimerNode* wheel_pop_expired(Wheel* w) noexcept nogil

cdef inline bint timer_scheduled(const TimerNode* node) noexcept nogil:
    return node.prev != NULL
