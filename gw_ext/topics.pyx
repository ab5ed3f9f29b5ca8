# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Subscription index (topic trie); see topics.pxd. `TopicIndex` wraps it for tests and benchmarks."""

from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc, realloc
from libc.string cimport memcmp, memcpy, memmove, memset
from libc.time cimport time as c_time

cdef extern from *:
    int __builtin_popcountll(unsigned long long) nogil

cdef enum:
    LINEAR_MAX = 8          # children kept in a packed array up to this many
    HASH_MIN = 16           # smallest hash table
    SLASH = 47              # '/'
    PLUS = 43               # '+'
    POUND = 35              # '#'
    DOLLAR = 36             # '$'
    # Child positions for the allocation-free walks: '+', '#', then kids[j] at 2 + j.
    POS_PLUS = 0
    POS_MULTI = 1
    POS_KIDS = 2


# --- hashing (FNV-1a with a per-index seed, then a final mix for the low bits) --

cdef inline uint64_t _hash_step(uint64_t h, uint8_t c) noexcept nogil:
    return (h ^ c) * 0x100000001b3ULL


cdef inline uint64_t _hash_final(uint64_t h) noexcept nogil:
    h ^= h >> 32
    h *= 0xd6e8feb86659fd93ULL
    h ^= h >> 29
    return h


cdef inline uint64_t _hash(uint64_t seed, const uint8_t* p, uint32_t n) noexcept nogil:
    cdef uint64_t h = seed
    cdef uint32_t i
    for i in range(n):
        h = _hash_step(h, p[i])
    return _hash_final(h)


# --- nodes -------------------------------------------------------------------

cdef inline uint8_t* _label(const TopicNode* n) noexcept nogil:
    return <uint8_t*>(n + 1)


cdef TopicNode* _node_new(TopicTrie* t, TopicNode* parent, const uint8_t* label, uint32_t n,
                          uint32_t first_len, uint32_t slashes, uint64_t h) noexcept nogil:
    # n <= TOPICS_MAX_LEN (filters are checked), so every 16-bit field fits.
    cdef size_t size = sizeof(TopicNode) + n
    cdef TopicNode* node = <TopicNode*>malloc(size)
    if node == NULL:
        return NULL
    memset(node, 0, sizeof(TopicNode))
    node.parent = parent
    memcpy(_label(node), label, n)
    node.label_len = <uint16_t>n
    node.label_cap = <uint16_t>n
    node.first_len = <uint16_t>first_len
    node.slashes = <uint16_t>slashes
    node.hash = h
    t.nodes += 1
    t.bytes += size
    return node


cdef inline void _node_free(TopicTrie* t, TopicNode* node) noexcept nogil:
    # Only for an empty node: its arrays are already released or moved.
    t.nodes -= 1
    t.bytes -= sizeof(TopicNode) + node.label_cap
    free(node)


cdef inline bint _is_wild(const TopicNode* n) noexcept nogil:
    # A wildcard node's label is '+' or '#'; an exact level never is one of them alone.
    return n.label_len == 1 and (_label(n)[0] == PLUS or _label(n)[0] == POUND)


cdef inline bint _node_empty(const TopicNode* n) noexcept nogil:
    return (n.nsubs == 0 and n.peers == 0 and n.nkids == 0
            and n.plus == NULL and n.multi == NULL)


# --- children: packed array (kcap <= LINEAR_MAX) or open addressing -------------

cdef inline TopicNode* _kid_find(const TopicNode* n, const uint8_t* p, uint32_t len,
                                 uint64_t h) noexcept nogil:
    cdef uint32_t j, mask
    cdef TopicNode* k
    if n.kcap <= LINEAR_MAX:
        for j in range(n.nkids):
            k = n.kids[j]
            if k.hash == h and k.first_len == len and memcmp(_label(k), p, len) == 0:
                return k
        return NULL
    mask = n.kcap - 1
    j = <uint32_t>h & mask
    while True:
        k = n.kids[j]
        if k == NULL:
            return NULL
        if k.hash == h and k.first_len == len and memcmp(_label(k), p, len) == 0:
            return k
        j = (j + 1) & mask


cdef inline uint32_t _probe(TopicNode** table, uint32_t mask, uint64_t hash, TopicNode* want) noexcept nogil:
    # The slot of `want` in a hash table of children (NULL: the first free
    # slot), by linear probing from the hash's own slot.
    cdef uint32_t s = <uint32_t>hash & mask
    while table[s] != want:
        s = (s + 1) & mask
    return s


cdef int _kids_resize(TopicTrie* t, TopicNode* n, uint32_t newcap) noexcept nogil:
    # Rebuilds the children into a new array of newcap slots: packed when
    # newcap <= LINEAR_MAX, else a hash table (newcap a power of two).
    cdef TopicNode** kids = <TopicNode**>calloc(newcap, sizeof(TopicNode*))
    cdef TopicNode* k
    cdef uint32_t limit, j, mask = newcap - 1, cnt = 0
    if kids == NULL:
        return -1
    limit = n.nkids if n.kcap <= LINEAR_MAX else n.kcap
    for j in range(limit):
        k = n.kids[j]
        if k == NULL:
            continue
        if newcap <= LINEAR_MAX:
            kids[cnt] = k
            cnt += 1
        else:
            kids[_probe(kids, mask, k.hash, NULL)] = k
    free(n.kids)
    t.bytes -= n.kcap * sizeof(TopicNode*)
    t.bytes += newcap * sizeof(TopicNode*)
    n.kids = kids
    n.kcap = newcap
    return 0


cdef int _kids_insert(TopicTrie* t, TopicNode* n, TopicNode* k) noexcept nogil:
    if n.kcap <= LINEAR_MAX:
        if n.nkids == n.kcap:
            if _kids_resize(t, n, (2 if n.kcap == 0 else n.kcap * 2) if n.kcap < LINEAR_MAX
                            else HASH_MIN) < 0:
                return -1
    elif (<uint64_t>n.nkids + 1) * 4 > <uint64_t>n.kcap * 3:
        if n.kcap >= 0x80000000U or _kids_resize(t, n, n.kcap * 2) < 0:
            return -1
    if n.kcap <= LINEAR_MAX:
        n.kids[n.nkids] = k
    else:
        n.kids[_probe(n.kids, n.kcap - 1, k.hash, NULL)] = k
    n.nkids += 1
    return 0


cdef int _kids_remove(TopicTrie* t, TopicNode* n, TopicNode* k) noexcept nogil:
    # Returns 1 when the array was replaced or rearranged beyond k's slot (a
    # walk over the children must restart), 0 when only k's slot changed.
    cdef uint32_t i, j, mask, ideal, newcap
    if n.kcap <= LINEAR_MAX:
        j = 0
        while n.kids[j] != k:
            j += 1
        n.nkids -= 1
        n.kids[j] = n.kids[n.nkids]         # swap with last; a walk re-reads slot j
        n.kids[n.nkids] = NULL
    else:
        mask = n.kcap - 1
        i = _probe(n.kids, mask, k.hash, k)
        # Backward-shift deletion: pull later members of the probe run into the hole.
        j = (i + 1) & mask
        while n.kids[j] != NULL:
            ideal = <uint32_t>n.kids[j].hash & mask
            if ((j - ideal) & mask) >= ((j - i) & mask):
                n.kids[i] = n.kids[j]
                i = j
            j = (j + 1) & mask
        n.kids[i] = NULL
        n.nkids -= 1
    if n.nkids == 0:
        free(n.kids)
        t.bytes -= n.kcap * sizeof(TopicNode*)
        n.kids = NULL
        n.kcap = 0
        return 1
    if n.kcap > LINEAR_MAX and (n.nkids <= LINEAR_MAX // 2 or <uint64_t>n.nkids * 8 < n.kcap):
        if n.nkids <= LINEAR_MAX // 2:
            newcap = LINEAR_MAX
        else:
            newcap = n.kcap
            while newcap > HASH_MIN and <uint64_t>n.nkids * 4 < newcap:
                newcap >>= 1
        if _kids_resize(t, n, newcap) == 0:
            return 1
    # A backward shift can move a member from the table's start to its end:
    # a walk that resumes at k's slot may see it twice, never miss one.
    return 0


cdef inline int _unlink(TopicTrie* t, TopicNode* p, TopicNode* k) noexcept nogil:
    if p.plus == k:
        p.plus = NULL
        return 0
    if p.multi == k:
        p.multi = NULL
        return 0
    return _kids_remove(t, p, k)


cdef TopicNode* _split(TopicTrie* t, TopicNode* p, TopicNode* k, uint32_t cut) noexcept nogil:
    # Cuts k's label at byte `cut` (a '/'): a new node u, in k's place under p,
    # takes the levels before it; k keeps the rest (same address: its
    # children and subscribers' references stay valid) and becomes u's only
    # child. Returns u, or NULL (nothing changed) when memory runs out.
    cdef uint8_t* kl = _label(k)
    cdef uint32_t j, cut_slashes = 0, rest, first
    cdef TopicNode* u
    for j in range(cut):
        if kl[j] == SLASH:
            cut_slashes += 1
    u = _node_new(t, p, kl, cut, k.first_len, cut_slashes, k.hash)
    if u == NULL:
        return NULL
    u.kids = <TopicNode**>calloc(2, sizeof(TopicNode*))
    if u.kids == NULL:
        _node_free(t, u)
        return NULL
    t.bytes += 2 * sizeof(TopicNode*)
    u.kcap = 2
    p.kids[_pos_of(p, k) - POS_KIDS] = u       # same first level, so the same slot
    rest = k.label_len - cut - 1
    memmove(kl, kl + cut + 1, rest)
    first = 0
    while first < rest and kl[first] != SLASH:
        first += 1
    k.label_len = <uint16_t>rest
    k.first_len = <uint16_t>first
    k.slashes = <uint16_t>(k.slashes - cut_slashes - 1)
    k.hash = _hash(t.seed, kl, first)
    k.parent = u
    u.kids[0] = k
    u.nkids = 1
    return u


cdef void _merge(TopicTrie* t, TopicNode* n) noexcept nogil:
    # When n holds nothing but one exact child k, k absorbs n's label and
    # takes its place (the trie stays canonical). k's label grows in place
    # when a split left room; otherwise k moves to a larger allocation and
    # the pointers to it (its children's parent, its subscribers' references)
    # follow. When memory runs out n simply stays.
    cdef TopicNode* p = n.parent
    cdef TopicNode* k
    cdef TopicNode* m
    cdef TopicNode* c
    cdef uint32_t pos = POS_KIDS, need, j, slot
    cdef SubEntry* e
    if (p == NULL or n.nkids != 1 or n.nsubs != 0 or n.peers != 0 or n.plus != NULL
            or n.multi != NULL or _is_wild(n)):
        return
    k = _child_from(n, &pos)
    need = <uint32_t>n.label_len + 1 + k.label_len      # a prefix of a filter: <= TOPICS_MAX_LEN
    if need > TOPICS_MAX_LEN:
        return
    slot = _pos_of(p, n) - POS_KIDS
    if need <= k.label_cap:
        m = k
        memmove(_label(m) + n.label_len + 1, _label(m), k.label_len)
    else:
        m = <TopicNode*>malloc(sizeof(TopicNode) + need)
        if m == NULL:
            return
        memcpy(m, k, sizeof(TopicNode))
        memcpy(_label(m) + n.label_len + 1, _label(k), k.label_len)
        m.label_cap = <uint16_t>need
        t.bytes += need - k.label_cap
        if m.plus != NULL:
            m.plus.parent = m
        if m.multi != NULL:
            m.multi.parent = m
        for j in range(m.nkids if m.kcap <= LINEAR_MAX else m.kcap):
            c = m.kids[j]
            if c != NULL:
                c.parent = m
        for j in range(m.nsubs):
            e = &m.subs[j]
            t.slots[e.subscriber].refs[e.back].node = m
        free(k)
    memcpy(_label(m), _label(n), n.label_len)
    _label(m)[n.label_len] = SLASH
    m.label_len = <uint16_t>need
    m.first_len = n.first_len
    m.slashes = <uint16_t>(<uint32_t>n.slashes + 1 + m.slashes)
    m.hash = n.hash
    m.parent = p
    p.kids[slot] = m                # same first level as n, so n's slot
    free(n.kids)
    t.bytes -= n.kcap * sizeof(TopicNode*)
    _node_free(t, n)


cdef void _prune(TopicTrie* t, TopicNode* n) noexcept nogil:
    # Frees n and its ancestors while they are empty; the first one that is
    # not may be left with a single exact child, and merge into it.
    cdef TopicNode* p
    while n != &t.root and _node_empty(n):
        p = n.parent
        _unlink(t, p, n)
        _node_free(t, n)
        n = p
    _merge(t, n)


# --- allocation-free walks -----------------------------------------------------

cdef TopicNode* _child_from(const TopicNode* n, uint32_t* pos) noexcept nogil:
    # The first child at position >= *pos; sets *pos to its position.
    cdef uint32_t p = pos[0], limit, j
    if p == POS_PLUS:
        if n.plus != NULL:
            return n.plus
        p = POS_MULTI
    if p == POS_MULTI:
        if n.multi != NULL:
            pos[0] = POS_MULTI
            return n.multi
        p = POS_KIDS
    limit = n.nkids if n.kcap <= LINEAR_MAX else n.kcap
    j = p - POS_KIDS
    while j < limit:
        if n.kids[j] != NULL:
            pos[0] = POS_KIDS + j
            return n.kids[j]
        j += 1
    return NULL


cdef uint32_t _pos_of(const TopicNode* p, const TopicNode* k) noexcept nogil:
    # Compares pointers only (k may be freed already in topics_free).
    cdef uint32_t j, mask
    if p.plus == k:
        return POS_PLUS
    if p.multi == k:
        return POS_MULTI
    if p.kcap <= LINEAR_MAX:
        j = 0
        while p.kids[j] != k:
            j += 1
        return POS_KIDS + j
    mask = p.kcap - 1
    j = <uint32_t>k.hash & mask
    while p.kids[j] != k:
        j = (j + 1) & mask
    return POS_KIDS + j


cdef uint32_t _filter_of(TopicTrie* t, const TopicNode* n) noexcept nogil:
    # Writes n's filter into t.namebuf (big enough: it is grown to the longest
    # filter ever inserted) and returns its length.
    cdef const TopicNode* m = n
    cdef uint32_t total = 0, end
    while m != &t.root:
        total += m.label_len + 1
        m = m.parent
    total -= 1
    end = total
    m = n
    while m != &t.root:
        end -= m.label_len
        memcpy(t.namebuf + end, _label(m), m.label_len)
        if end > 0:
            end -= 1
            t.namebuf[end] = SLASH
        m = m.parent
    return total


# --- subscriber slots and scratch ------------------------------------------------

cdef int _ensure_slot(TopicTrie* t, uint32_t subscriber) noexcept nogil:
    cdef uint64_t n
    cdef SubSlot* slots
    if subscriber < t.nslots:
        return 0
    n = t.nslots if t.nslots >= 64 else 64
    while n <= subscriber:
        n *= 2
    slots = <SubSlot*>realloc(t.slots, n * sizeof(SubSlot))
    if slots == NULL:
        return -1
    memset(slots + t.nslots, 0, (n - t.nslots) * sizeof(SubSlot))
    t.slots = slots
    t.nslots = <uint32_t>n
    return 0


cdef int _ensure_namebuf(TopicTrie* t, uint32_t len) noexcept nogil:
    cdef uint8_t* buf
    if len <= t.namebuf_cap:
        return 0
    buf = <uint8_t*>realloc(t.namebuf, len)
    if buf == NULL:
        return -1
    t.namebuf = buf
    t.namebuf_cap = len
    return 0


cdef bint _valid_filter(const uint8_t* f, uint32_t len) noexcept nogil:
    # MQTT-4.7.3-1 (non-empty), -4.7.1-2 ('#' alone and last), -4.7.1-3 ('+' alone).
    cdef uint32_t i, start = 0
    cdef uint8_t c
    if len == 0 or len > TOPICS_MAX_LEN:
        return False
    for i in range(len):
        c = f[i]
        if c == SLASH:
            start = i + 1
        elif c == PLUS or c == POUND:
            if i != start or (i + 1 < len and f[i + 1] != SLASH):
                return False
            if c == POUND and i + 1 != len:
                return False
    return True


cdef TopicNode* _walk(TopicTrie* t, const uint8_t* f, uint32_t len, bint create) noexcept nogil:
    # The node of a (valid) filter; with create, makes the missing ones,
    # splitting a label the filter parts from (NULL, and the trie as it was,
    # when memory runs out).
    cdef TopicNode* n = &t.root
    cdef TopicNode* c
    cdef const uint8_t* lp
    cdef const uint8_t* kl
    cdef uint32_t start = 0, end, ll, i, rem, slashes
    cdef uint64_t h
    while True:
        end = start
        while end < len and f[end] != SLASH:
            end += 1
        lp = f + start
        ll = end - start
        if ll == 1 and lp[0] == PLUS:
            c = n.plus
            if c == NULL and create:
                c = _node_new(t, n, lp, 1, 1, 0, 0)
                n.plus = c
        elif ll == 1 and lp[0] == POUND:
            c = n.multi
            if c == NULL and create:
                c = _node_new(t, n, lp, 1, 1, 0, 0)
                n.multi = c
        else:
            h = _hash(t.seed, lp, ll)
            c = _kid_find(n, lp, ll, h)
            if c == NULL:
                if create:
                    # One node for this level and the exact levels after it, up
                    # to a wildcard level or the end (a valid filter has '+' and
                    # '#' only as whole levels, so one at a level's start is one).
                    slashes = 0
                    while end < len and not (end + 1 < len and (f[end + 1] == PLUS or f[end + 1] == POUND)):
                        end += 1
                        while end < len and f[end] != SLASH:
                            end += 1
                        slashes += 1
                    c = _node_new(t, n, lp, end - start, ll, slashes, h)
                    if c != NULL and _kids_insert(t, n, c) < 0:
                        _node_free(t, c)
                        c = NULL
            elif c.slashes != 0:
                # The first level matched; compare the rest of c's label.
                kl = _label(c)
                rem = len - start
                i = ll
                while i < c.label_len and i < rem and kl[i] == lp[i]:
                    i += 1
                if i == c.label_len and (i == rem or lp[i] == SLASH):
                    end = start + i                 # the whole label
                elif not create:
                    return NULL                     # the filter ends or parts inside the label
                else:
                    if not (i < c.label_len and kl[i] == SLASH and i == rem):
                        i -= 1                      # parts inside a level: back to its '/'
                        while kl[i] != SLASH:       # (one exists at or after ll)
                            i -= 1
                    c = _split(t, n, c, i)
                    end = start + i
        if c == NULL:
            if create:
                _prune(t, n)
            return NULL
        n = c
        if end >= len:
            return n
        start = end + 1


# --- subscriptions -----------------------------------------------------------

cdef inline int _grow(void** arr, uint32_t* cap, size_t item, uint32_t first, size_t* bytes) noexcept nogil:
    cdef uint32_t newcap
    cdef void* p
    if cap[0] >= 0x80000000U:          # doubling would wrap the 32-bit count
        return -1
    newcap = first if cap[0] == 0 else cap[0] * 2
    p = realloc(arr[0], <size_t>newcap * item)
    if p == NULL:
        return -1
    bytes[0] += (newcap - cap[0]) * item
    arr[0] = p
    cap[0] = newcap
    return 0


cdef inline void _shrink(void** arr, uint32_t n, uint32_t* cap, size_t item, size_t* bytes) noexcept nogil:
    # Frees an empty array; halves one at most a quarter full.
    cdef void* p
    if n == 0:
        free(arr[0])
        bytes[0] -= cap[0] * item
        arr[0] = NULL
        cap[0] = 0
    elif cap[0] >= 8 and n * 4 <= cap[0]:
        p = realloc(arr[0], (cap[0] // 2) * item)
        if p != NULL:
            bytes[0] -= (cap[0] - cap[0] // 2) * item
            arr[0] = p
            cap[0] //= 2


cdef int _find_sub(TopicTrie* t, TopicNode* n, uint32_t subscriber) noexcept nogil:
    # Index in n.subs of this subscriber's entry, or -1; scans the shorter of
    # the node's list and the subscriber's.
    cdef SubSlot* s = &t.slots[subscriber]
    cdef uint32_t j
    if s.n <= n.nsubs:
        for j in range(s.n):
            if s.refs[j].node == n:
                return <int>s.refs[j].pos
    else:
        for j in range(n.nsubs):
            if n.subs[j].subscriber == subscriber:
                return <int>j
    return -1


cdef void _remove_entry(TopicTrie* t, TopicNode* n, uint32_t pos) noexcept nogil:
    cdef SubEntry e = n.subs[pos]
    cdef SubSlot* s = &t.slots[e.subscriber]
    cdef uint32_t last
    cdef SubRef* moved
    last = n.nsubs - 1
    if pos != last:
        n.subs[pos] = n.subs[last]
        t.slots[n.subs[pos].subscriber].refs[n.subs[pos].back].pos = pos
    n.nsubs = last
    last = s.n - 1
    if e.back != last:
        s.refs[e.back] = s.refs[last]
        moved = &s.refs[e.back]
        moved.node.subs[moved.pos].back = e.back
    s.n = last
    t.subscriptions -= 1
    _shrink(<void**>&n.subs, n.nsubs, &n.subs_cap, sizeof(SubEntry), &t.bytes)
    _shrink(<void**>&s.refs, s.n, &s.cap, sizeof(SubRef), &t.bytes)


cdef TopicTrie* topics_new() noexcept nogil:
    cdef TopicTrie* t = <TopicTrie*>calloc(1, sizeof(TopicTrie))
    if t == NULL:
        return NULL
    t.seed = 0xcbf29ce484222325ULL ^ _hash_final(<uint64_t><size_t>t ^ (<uint64_t>c_time(NULL) << 20))
    return t


cdef void topics_free(TopicTrie* t) noexcept nogil:
    # Post-order walk freeing every node (pointers compared, never followed, once freed).
    cdef TopicNode* n
    cdef TopicNode* p
    cdef TopicNode* c
    cdef uint32_t pos = 0, j
    if t == NULL:
        return
    n = &t.root
    while True:
        c = _child_from(n, &pos)
        if c != NULL:
            n = c
            pos = 0
            continue
        free(n.kids)
        free(n.subs)
        if n == &t.root:
            break
        p = n.parent
        pos = _pos_of(p, n) + 1
        free(n)
        n = p
    for j in range(t.nslots):
        free(t.slots[j].refs)
    free(t.slots)
    free(t.namebuf)
    free(t)


cdef int topics_subscribe(TopicTrie* t, const uint8_t* topic_filter, uint32_t len,
                          uint32_t subscriber, uint8_t qos) noexcept nogil:
    return topics_subscribe_ext(t, topic_filter, len, subscriber, qos, 0, 0)


cdef int topics_subscribe_ext(TopicTrie* t, const uint8_t* topic_filter, uint32_t len,
                              uint32_t subscriber, uint8_t qos, uint8_t opts, uint32_t subid) noexcept nogil:
    cdef TopicNode* n
    cdef SubSlot* s
    cdef int pos
    if qos > 2 or subscriber > TOPICS_MAX_SUBSCRIBER or not _valid_filter(topic_filter, len):
        return TOPICS_ERR_INVALID
    if _ensure_slot(t, subscriber) < 0 or _ensure_namebuf(t, len) < 0:
        return TOPICS_ERR_NOMEM
    n = _walk(t, topic_filter, len, True)
    if n == NULL:
        return TOPICS_ERR_NOMEM
    pos = _find_sub(t, n, subscriber)
    if pos >= 0:
        n.subs[pos].qos = qos          # MQTT-3.8.4-3: replaces the existing subscription
        n.subs[pos].opts = opts
        n.subs[pos].subid = subid
        return 0
    s = &t.slots[subscriber]
    if (n.nsubs == n.subs_cap
            and _grow(<void**>&n.subs, &n.subs_cap, sizeof(SubEntry), 1, &t.bytes) < 0):
        _prune(t, n)
        return TOPICS_ERR_NOMEM
    if s.n == s.cap and _grow(<void**>&s.refs, &s.cap, sizeof(SubRef), 1, &t.bytes) < 0:
        _prune(t, n)
        return TOPICS_ERR_NOMEM
    n.subs[n.nsubs].subscriber = subscriber
    n.subs[n.nsubs].back = s.n
    n.subs[n.nsubs].qos = qos
    n.subs[n.nsubs].opts = opts
    n.subs[n.nsubs].subid = subid
    s.refs[s.n].node = n
    s.refs[s.n].pos = n.nsubs
    n.nsubs += 1
    s.n += 1
    t.subscriptions += 1
    return 1 if n.nsubs == 1 else 0


cdef int topics_subscription_info(TopicTrie* t, const uint8_t* topic_filter, uint32_t len, uint32_t subscriber,
                                  uint8_t* qos, uint8_t* opts, uint32_t* subid) noexcept nogil:
    cdef TopicNode* n
    cdef int pos
    if subscriber >= t.nslots or not _valid_filter(topic_filter, len):
        return 0
    n = _walk(t, topic_filter, len, False)
    if n == NULL:
        return 0
    pos = _find_sub(t, n, subscriber)
    if pos < 0:
        return 0
    qos[0] = n.subs[pos].qos
    opts[0] = n.subs[pos].opts
    subid[0] = n.subs[pos].subid
    return 1


cdef bint topics_filter_matches(const uint8_t* f, uint32_t flen, const uint8_t* t, uint32_t tlen) noexcept nogil:
    """One valid filter against one topic name (MQTT 4.7, the rules topics_match
    follows: a filter starting with a wildcard matches no name starting with '$',
    MQTT-4.7.2-1). For one filter at a time: retained messages on subscribe, a
    subscriber's Subscription Identifiers; topics_match serves the PUBLISH path."""
    cdef uint32_t i = 0, j = 0
    if tlen and t[0] == 36 and flen and (f[0] == 43 or f[0] == 35):
        return False
    while i < flen:
        if f[i] == 35:                  # '#': the rest (and the parent level: sport/# matches sport)
            return True
        if f[i] == 43:                  # '+': one level
            i += 1
            while j < tlen and t[j] != 47:
                j += 1
        else:
            while i < flen and f[i] != 47:
                if j >= tlen or t[j] != f[i]:
                    return False
                i += 1
                j += 1
            if j < tlen and t[j] != 47:
                return False
        if i == flen:
            return j == tlen
        i += 1                          # past the filter's '/'
        if j == tlen:
            return i + 1 == flen and f[i] == 35
        j += 1                          # past the topic's '/'
    return j == tlen


cdef uint32_t topics_subscriber_ids(TopicTrie* t, uint32_t subscriber, const uint8_t* topic, uint32_t len,
                                    uint32_t* ids, uint32_t max) noexcept nogil:
    cdef SubSlot* s
    cdef SubEntry* e
    cdef uint32_t j, flen, k, off, found = 0
    if subscriber >= t.nslots:
        return 0
    s = &t.slots[subscriber]
    for j in range(s.n):
        e = &s.refs[j].node.subs[s.refs[j].pos]
        if e.subid == 0:
            continue
        flen = _filter_of(t, s.refs[j].node)
        off = 0
        if flen > 7 and memcmp(t.namebuf, b"$share/", 7) == 0:
            # A shared subscription's filter is what follows its share name.
            k = 7
            while k < flen and t.namebuf[k] != 47:
                k += 1
            off = k + 1 if k < flen else flen
        if off < flen and topics_filter_matches(t.namebuf + off, flen - off, topic, len):
            if found < max:
                ids[found] = e.subid
            found += 1
    return found


cdef int topics_unsubscribe(TopicTrie* t, const uint8_t* topic_filter, uint32_t len,
                            uint32_t subscriber) noexcept nogil:
    cdef TopicNode* n
    cdef int pos
    cdef bint last
    if subscriber >= t.nslots or not _valid_filter(topic_filter, len):
        return 0
    n = _walk(t, topic_filter, len, False)
    if n == NULL:
        return 0
    pos = _find_sub(t, n, subscriber)
    if pos < 0:
        return 0
    _remove_entry(t, n, <uint32_t>pos)
    last = n.nsubs == 0
    _prune(t, n)
    return 1 if last else 0


cdef int topics_remove_subscriber(TopicTrie* t, uint32_t subscriber,
                                  topics_filter_cb cb, void* ctx) noexcept nogil:
    cdef SubSlot* s
    cdef TopicNode* n
    cdef uint8_t qos
    cdef int dropped = 0
    if subscriber >= t.nslots:
        return 0
    s = &t.slots[subscriber]
    while s.n > 0:
        n = s.refs[s.n - 1].node
        qos = n.subs[s.refs[s.n - 1].pos].qos
        _remove_entry(t, n, s.refs[s.n - 1].pos)      # the last ref: no swap on this side
        if n.nsubs == 0:
            dropped += 1
            if cb != NULL:
                cb(ctx, t.namebuf, _filter_of(t, n), qos)
            _prune(t, n)
    return dropped


cdef int topics_subscriptions(TopicTrie* t, uint32_t subscriber,
                              topics_filter_cb cb, void* ctx) noexcept nogil:
    cdef SubSlot* s
    cdef uint32_t j
    if subscriber >= t.nslots:
        return 0
    s = &t.slots[subscriber]
    if cb != NULL:
        for j in range(s.n):
            cb(ctx, t.namebuf, _filter_of(t, s.refs[j].node), s.refs[j].node.subs[s.refs[j].pos].qos)
    return <int>s.n


cdef int topics_filters(TopicTrie* t, topics_filter_cb cb, void* ctx) noexcept nogil:
    cdef TopicNode* n = &t.root
    cdef TopicNode* c
    cdef uint32_t pos = 0
    cdef int count = 0
    while True:
        c = _child_from(n, &pos)
        if c != NULL:
            if c.nsubs > 0:
                count += 1
                if cb != NULL:
                    cb(ctx, t.namebuf, _filter_of(t, c), 0)
            n = c
            pos = 0
            continue
        if n == &t.root:
            return count
        pos = _pos_of(n.parent, n) + 1
        n = n.parent


cdef uint32_t topics_filter_count(TopicTrie* t, const uint8_t* topic_filter, uint32_t len) noexcept nogil:
    cdef TopicNode* n
    if not _valid_filter(topic_filter, len):
        return 0
    n = _walk(t, topic_filter, len, False)
    return 0 if n == NULL else n.nsubs


# --- peer interest -------------------------------------------------------------

cdef int topics_add_peer_interest(TopicTrie* t, const uint8_t* topic_filter, uint32_t len,
                                  uint8_t worker) noexcept nogil:
    cdef TopicNode* n
    cdef uint64_t bit
    if worker >= TOPICS_MAX_WORKERS or not _valid_filter(topic_filter, len):
        return TOPICS_ERR_INVALID
    if _ensure_namebuf(t, len) < 0:
        return TOPICS_ERR_NOMEM
    n = _walk(t, topic_filter, len, True)
    if n == NULL:
        return TOPICS_ERR_NOMEM
    bit = (<uint64_t>1) << worker
    if n.peers & bit:
        return 0
    n.peers |= bit
    return 1


cdef int topics_remove_peer_interest(TopicTrie* t, const uint8_t* topic_filter, uint32_t len,
                                     uint8_t worker) noexcept nogil:
    cdef TopicNode* n
    cdef uint64_t bit
    if worker >= TOPICS_MAX_WORKERS or not _valid_filter(topic_filter, len):
        return 0
    n = _walk(t, topic_filter, len, False)
    if n == NULL:
        return 0
    bit = (<uint64_t>1) << worker
    if not (n.peers & bit):
        return 0
    n.peers &= ~bit
    _prune(t, n)
    return 1


cdef int topics_clear_peer(TopicTrie* t, uint8_t worker) noexcept nogil:
    # Pre-order: clear the bit; post-order: free the node if that emptied it,
    # or merge it into its only child.
    # After freeing a child the walk resumes at its position (a swap or a
    # backward shift may have moved a sibling there), or at the first table
    # slot when the table was rebuilt; revisiting a node is harmless here.
    cdef TopicNode* n = &t.root
    cdef TopicNode* c
    cdef TopicNode* p
    cdef uint32_t pos = 0
    cdef uint64_t bit
    cdef int cleared = 0
    if worker >= TOPICS_MAX_WORKERS:
        return 0
    bit = (<uint64_t>1) << worker
    while True:
        c = _child_from(n, &pos)
        if c != NULL:
            if c.peers & bit:
                c.peers &= ~bit
                cleared += 1
            n = c
            pos = 0
            continue
        if n == &t.root:
            return cleared
        p = n.parent
        pos = _pos_of(p, n)
        if _node_empty(n):
            if _unlink(t, p, n):
                pos = POS_KIDS
            _node_free(t, n)
        else:
            _merge(t, n)        # when merged, n's slot holds its child, already walked
            pos += 1
        n = p


# --- matching ------------------------------------------------------------------

cdef void topics_result_init(MatchResult* out) noexcept nogil:
    memset(out, 0, sizeof(MatchResult))


cdef void topics_result_free(MatchResult* out) noexcept nogil:
    free(out.entries)
    free(out.levels)
    free(out.stack)
    memset(out, 0, sizeof(MatchResult))


cdef int _reserve_scratch(MatchResult* out, uint32_t need) noexcept nogil:
    cdef uint64_t newcap = out.scratch_cap * 2 if out.scratch_cap >= 8 else 16
    cdef void* p
    while newcap < need:
        newcap *= 2
    p = realloc(out.levels, newcap * sizeof(TopicLevel))
    if p == NULL:
        return -1
    out.levels = <TopicLevel*>p
    p = realloc(out.stack, newcap * sizeof(MatchFrame))
    if p == NULL:
        return -1
    out.stack = <MatchFrame*>p
    out.scratch_cap = <uint32_t>newcap
    return 0


cdef inline int _collect(TopicTrie* t, const TopicNode* n, MatchResult* out, uint32_t gen) noexcept nogil:
    cdef uint32_t k
    cdef const SubEntry* e
    cdef SubSlot* s
    cdef MatchEntry* m
    cdef void* p
    out.peers |= n.peers
    for k in range(n.nsubs):
        e = &n.subs[k]
        s = &t.slots[e.subscriber]
        if e.opts:                         # MQTT 5.0 options: 3.1.1's pay this test only
            if e.opts & SUBOPT_NO_LOCAL and e.subscriber + 1 == out.nolocal:
                out.nolocal_skipped += 1   # No Local: not its own publisher's (MQTT-3.8.3-3)
                continue
        if s.stamp == gen:                 # already reported by an overlapping filter
            m = &out.entries[s.outpos]
            if e.qos > m.qos:
                m.qos = e.qos
            m.opts |= e.opts
            continue
        if out.count == out.cap:
            if out.cap >= 0x80000000U:
                return -1
            p = realloc(out.entries, <size_t>(out.cap * 2 if out.cap else 16) * sizeof(MatchEntry))
            if p == NULL:
                return -1
            out.entries = <MatchEntry*>p
            out.cap = out.cap * 2 if out.cap else 16
        s.stamp = gen
        s.outpos = out.count
        out.entries[out.count].subscriber = e.subscriber
        out.entries[out.count].qos = e.qos
        out.entries[out.count].opts = e.opts
        out.count += 1
    return 0


cdef int topics_match(TopicTrie* t, const uint8_t* topic, uint32_t len, MatchResult* out) noexcept nogil:
    cdef uint32_t i, nl = 0, start = 0, sp, gen, lvl
    cdef uint64_t h = t.seed
    cdef uint8_t c
    cdef TopicNode* n
    cdef TopicNode* k
    cdef const TopicLevel* lv
    cdef const TopicLevel* last
    cdef bint wild

    if len > TOPICS_MAX_LEN:                # level counts stay far from 32-bit limits
        return TOPICS_ERR_INVALID
    # Split into levels, hashing each as we go (the stack needs levels + 1).
    if out.scratch_cap < 2 and _reserve_scratch(out, 2) < 0:
        return TOPICS_ERR_NOMEM
    for i in range(len):
        c = topic[i]
        if c == SLASH:
            if nl + 2 >= out.scratch_cap and _reserve_scratch(out, nl + 3) < 0:
                return TOPICS_ERR_NOMEM
            out.levels[nl].off = start
            out.levels[nl].len = i - start
            out.levels[nl].hash = _hash_final(h)
            nl += 1
            h = t.seed
            start = i + 1
        else:
            h = _hash_step(h, c)
    out.levels[nl].off = start
    out.levels[nl].len = len - start
    out.levels[nl].hash = _hash_final(h)
    nl += 1

    gen = t.generation + 1
    if gen == 0:                           # wrapped: forget every stamp
        for i in range(t.nslots):
            t.slots[i].stamp = 0
        gen = 1
    t.generation = gen
    out.count = 0
    out.peers = 0
    # MQTT-4.7.2-1: a filter starting with a wildcard does not match a '$' name.
    wild = not (len > 0 and topic[0] == DOLLAR)

    out.stack[0].node = &t.root
    out.stack[0].level = 0
    sp = 1
    while sp > 0:
        sp -= 1
        n = out.stack[sp].node
        lvl = out.stack[sp].level
        if lvl == nl:
            if _collect(t, n, out, gen) < 0:
                return TOPICS_ERR_NOMEM
            if n.multi != NULL and _collect(t, n.multi, out, gen) < 0:   # 'a/#' matches 'a' (MQTT-4.7.1-2)
                return TOPICS_ERR_NOMEM
            continue
        if lvl != 0 or wild:
            if n.multi != NULL and _collect(t, n.multi, out, gen) < 0:
                return TOPICS_ERR_NOMEM
            if n.plus != NULL:
                out.stack[sp].node = n.plus
                out.stack[sp].level = lvl + 1
                sp += 1
        if n.nkids != 0:
            lv = &out.levels[lvl]
            k = _kid_find(n, topic + lv.off, lv.len, lv.hash)
            if k != NULL:
                if k.slashes == 0:
                    out.stack[sp].node = k
                    out.stack[sp].level = lvl + 1
                    sp += 1
                elif lvl + k.slashes < nl:
                    # A label of several levels: the name's next levels, '/'
                    # included, must be its bytes exactly.
                    last = &out.levels[lvl + k.slashes]
                    if (last.off + last.len - lv.off == k.label_len
                            and memcmp(topic + lv.off + lv.len, _label(k) + lv.len, k.label_len - lv.len) == 0):
                        out.stack[sp].node = k
                        out.stack[sp].level = lvl + 1 + k.slashes
                        sp += 1
    return <int>out.count


# --- Python wrapper (tests, benchmarks) ----------------------------------------

cdef void _append_pair(void* ctx, const uint8_t* f, uint32_t n, uint8_t qos) noexcept nogil:
    with gil:
        (<list>ctx).append(((<const char*>f)[:n].decode("utf-8"), qos))


cdef void _append_name(void* ctx, const uint8_t* f, uint32_t n, uint8_t qos) noexcept nogil:
    with gil:
        (<list>ctx).append((<const char*>f)[:n].decode("utf-8"))


cdef int _check(int r, str what) except -3:
    if r == TOPICS_ERR_NOMEM:
        raise MemoryError()
    if r == TOPICS_ERR_INVALID:
        raise ValueError(what)
    return r


cdef class TopicIndex:
    """Python wrapper used by tests and bench: filters and topics as str."""
    cdef TopicTrie* t
    cdef MatchResult res

    def __cinit__(self):
        self.t = topics_new()
        if self.t == NULL:
            raise MemoryError()
        topics_result_init(&self.res)

    def __dealloc__(self):
        topics_free(self.t)
        topics_result_free(&self.res)

    def subscribe(self, str topic_filter, uint32_t sub, uint8_t qos):
        """True when the filter had no local subscriber before (0 -> 1)."""
        cdef bytes b = topic_filter.encode("utf-8")
        return _check(topics_subscribe(self.t, b, len(b), sub, qos),
                                 f"invalid subscription {topic_filter!r} qos {qos}") == 1

    def unsubscribe(self, str topic_filter, uint32_t sub):
        """True when that was the filter's last local subscriber (1 -> 0)."""
        cdef bytes b = topic_filter.encode("utf-8")
        return topics_unsubscribe(self.t, b, len(b), sub) == 1

    def add_peer(self, str topic_filter, uint8_t worker):
        cdef bytes b = topic_filter.encode("utf-8")
        return _check(topics_add_peer_interest(self.t, b, len(b), worker),
                                 f"invalid peer interest {topic_filter!r} worker {worker}") == 1

    def remove_peer(self, str topic_filter, uint8_t worker):
        cdef bytes b = topic_filter.encode("utf-8")
        return topics_remove_peer_interest(self.t, b, len(b), worker) == 1

    def clear_peer(self, uint8_t worker):
        return topics_clear_peer(self.t, worker)

    def match(self, str topic):
        """({subscriber: qos}, peers bitmask)."""
        cdef bytes b = topic.encode("utf-8")
        cdef int r = _check(topics_match(self.t, b, len(b), &self.res), "")
        cdef int i
        return {self.res.entries[i].subscriber: self.res.entries[i].qos for i in range(r)}, self.res.peers

    def match_count(self, list topics):
        """Matches every topic (bytes) in one C loop; returns the total number
        of (topic, subscriber) results plus the number of peer bits set."""
        cdef bytes b
        cdef long total = 0
        cdef int r
        for b in topics:
            r = topics_match(self.t, b, len(b), &self.res)
            if r < 0:
                raise MemoryError()
            total += r + __builtin_popcountll(self.res.peers)
        return total

    def remove_subscriber(self, uint32_t sub):
        """Filters whose local count dropped to 0, as list[str]."""
        cdef list pairs = []
        topics_remove_subscriber(self.t, sub, _append_pair, <void*>pairs)
        return [f for f, _ in pairs]

    def subscriptions(self, uint32_t sub):
        cdef list out = []
        topics_subscriptions(self.t, sub, _append_pair, <void*>out)
        return out

    def filters(self):
        cdef list out = []
        topics_filters(self.t, _append_name, <void*>out)
        return out

    def count(self, str topic_filter):
        """Local subscribers on exactly this filter."""
        cdef bytes b = topic_filter.encode("utf-8")
        return topics_filter_count(self.t, b, len(b))

    @property
    def node_count(self):
        return topics_node_count(self.t)

    @property
    def subscription_count(self):
        return self.t.subscriptions

    @property
    def bytes_used(self):
        """Memory held by nodes, child tables and subscription arrays."""
        return self.t.bytes

    def __len__(self):
        return self.t.subscriptions

    def _set_generation(self, uint32_t generation):
        """Test hook: the match generation counter (to test its wrap-around)."""
        self.t.generation = generation

