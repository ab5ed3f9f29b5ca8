# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The ACL's per-message check: rules tries per identity, a cache per session
(declarations and why: acl.pxd; the file and its meaning: gw/acl.py)."""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport uint8_t, uint16_t, uint32_t
from libc.stdlib cimport calloc, free
from libc.string cimport memcmp, memcpy
from gw_ext.topics cimport (MatchResult, TopicTrie, topics_free, topics_match, topics_new, topics_result_free,
                            topics_result_init, topics_subscribe)

from gw.acl import DENY, READ, WRITE

_next_generation = 1


cdef class _Trie:
    """Owns one rules trie (shared by every session of one user)."""
    cdef TopicTrie* trie

    def __dealloc__(self):
        if self.trie != NULL:
            topics_free(self.trie)


cdef int _add_rules(TopicTrie* t, list rules) except -1:
    """Puts (access, filter) rules in a trie; -1 (MemoryError) if one does not
    fit: the caller then denies everything rather than lose a deny line."""
    cdef bytes f
    cdef int r
    for access, f in rules:
        for bit, sub in ((DENY, ACL_SUB_DENY), (READ, ACL_SUB_READ), (WRITE, ACL_SUB_WRITE)):
            if access & bit:
                r = topics_subscribe(t, <const uint8_t*>PyBytes_AS_STRING(f), PyBytes_GET_SIZE(f), sub, 0)
                if r < 0:
                    raise MemoryError("an ACL rule did not fit in its trie")
    return 0


cdef class AclRules:
    """One version of the ACL file, ready for the worker's checks."""

    def __cinit__(self):
        topics_result_init(&self.match)

    def __init__(self, acl_file):
        global _next_generation
        self.file = acl_file
        self.shared = {}
        self.generation = _next_generation
        _next_generation += 1

    def __dealloc__(self):
        topics_result_free(&self.match)

    cdef TopicTrie* shared_trie(self, object username) except? NULL:
        cdef _Trie box = self.shared.get(username)
        if box is None:
            rules = self.file.anonymous if username is None else self.file.users.get(username)
            if not rules:
                return NULL
            box = _Trie()
            box.trie = topics_new()
            if box.trie == NULL:
                raise MemoryError()
            _add_rules(box.trie, rules)
            self.shared[username] = box
        return box.trie

    cdef int build_view(self, AclView* view, const char* username, uint16_t ulen, bint has_username,
                        const char* client_id, uint16_t clen) except -1:
        """Makes view this generation's, for the identity (user name, client id)."""
        cdef bytes user = PyBytes_FromStringAndSize(username, ulen) if has_username else None
        cdef bytes cid = PyBytes_FromStringAndSize(client_id, clen)
        cdef int i
        if view.own != NULL:
            topics_free(view.own)
            view.own = NULL
        view.shared = NULL
        view.deny_all = 1
        view.gen = self.generation
        for i in range(ACL_CACHE_SLOTS):
            view.cache[i].gen = 0
        rules = self.file.rules_for(user, cid)
        try:
            view.shared = self.shared_trie(user)
            n_own = len(rules) - len(self.file.anonymous if user is None else self.file.users.get(user, ()))
            if n_own:
                view.own = topics_new()
                if view.own == NULL:
                    raise MemoryError()
                _add_rules(view.own, rules[len(rules) - n_own:])
        except MemoryError:
            return 0        # fails closed
        view.deny_all = 0
        return 0

    cdef int cold_check(self, AclView* view, const uint8_t* topic, uint32_t n, uint8_t access) noexcept:
        """ACL_READ/ACL_WRITE bits the rules grant for topic: each trie matched once."""
        cdef uint8_t granted = 0
        cdef bint denied = False
        cdef TopicTrie* t
        cdef int k, count, which
        cdef uint32_t sub
        if view.deny_all:
            return 0
        for which in range(2):
            t = view.shared if which == 0 else view.own
            if t == NULL:
                continue
            count = topics_match(t, topic, n, &self.match)
            if count < 0:
                return 0    # out of memory: denied
            for k in range(count):
                sub = self.match.entries[k].subscriber
                if sub == ACL_SUB_DENY:
                    denied = True
                elif sub == ACL_SUB_READ:
                    granted |= ACL_READ
                elif sub == ACL_SUB_WRITE:
                    granted |= ACL_WRITE
        return 0 if denied else granted

    def check(self, username, bytes client_id, bytes topic, int access):
        """For tests and the reference: one check of a fresh view (no cache)."""
        cdef AclView* view = acl_view_new()
        cdef bytes user = username
        cdef int r
        if view == NULL:
            raise MemoryError()
        try:
            self.build_view(view, PyBytes_AS_STRING(user) if user is not None else NULL,
                            len(user) if user is not None else 0, user is not None,
                            PyBytes_AS_STRING(client_id), len(client_id))
            r = self.cold_check(view, <const uint8_t*>PyBytes_AS_STRING(topic), len(topic), <uint8_t>access)
        finally:
            acl_view_free(view)
        return bool(r & access)

    @property
    def rule_count(self):
        return self.file.rule_count


cdef AclView* acl_view_new() noexcept nogil:
    return <AclView*>calloc(1, sizeof(AclView))


cdef void acl_view_free(AclView* view) noexcept nogil:
    if view != NULL:
        if view.own != NULL:
            topics_free(view.own)
        free(view)


cdef inline uint32_t _topic_hash(const uint8_t* p, uint32_t n) noexcept nogil:
    # FNV-1a: picks a cache slot only (the entry keeps the whole topic to compare).
    cdef uint32_t h = 2166136261u
    cdef uint32_t i
    for i in range(n):
        h = (h ^ p[i]) * 16777619u
    return h


cdef int acl_allowed(AclRules rules, AclView** view, const char* username, uint16_t ulen, bint has_username,
                     const char* client_id, uint16_t clen, const uint8_t* topic, uint32_t n,
                     uint8_t access) except -1:
    """1 if the session may have `access` (ACL_READ or ACL_WRITE) on topic, else
    0. *view is the session's (made on its first check, rebuilt after a
    reload). A hit costs a hash of the topic, a compare and no allocation."""
    cdef AclView* v = view[0]
    cdef AclCacheEntry* e
    cdef uint8_t granted
    if v == NULL:
        v = acl_view_new()
        if v == NULL:
            return 0
        view[0] = v
    if v.gen != rules.generation:
        rules.build_view(v, username, ulen, has_username, client_id, clen)
    if n <= ACL_CACHE_TOPIC:
        e = &v.cache[_topic_hash(topic, n) & (ACL_CACHE_SLOTS - 1)]
        if e.gen == v.gen and e.len == n and memcmp(e.topic, topic, n) == 0:
            if e.known & access:
                return 1 if e.allowed & access else 0
        else:
            e.gen = v.gen
            e.len = <uint16_t>n
            e.known = 0
            e.allowed = 0
            memcpy(e.topic, topic, n)
        granted = <uint8_t>rules.cold_check(v, topic, n, access)
        e.known |= access
        e.allowed |= granted & access
        return 1 if granted & access else 0
    return 1 if rules.cold_check(v, topic, n, access) & access else 0


cdef class AclSession:
    """One session's view, through the same path as the worker's checks
    (acl_allowed: the cache, then the tries), for tests and benchmarks."""
    cdef AclView* view
    cdef public AclRules rules
    cdef bytes username
    cdef bytes client_id

    def __cinit__(self, AclRules rules, username, bytes client_id):
        self.rules = rules
        self.username = username
        self.client_id = client_id

    def __dealloc__(self):
        acl_view_free(self.view)

    cdef int _check(self, bytes topic, int access) except -1:
        return acl_allowed(self.rules, &self.view,
                           PyBytes_AS_STRING(self.username) if self.username is not None else NULL,
                           len(self.username) if self.username is not None else 0, self.username is not None,
                           PyBytes_AS_STRING(self.client_id), len(self.client_id),
                           <const uint8_t*>PyBytes_AS_STRING(topic), len(topic), <uint8_t>access)

    def allowed(self, bytes topic, int access):
        return self._check(topic, access) == 1

    def allowed_many(self, bytes topic, int access, long n):
        """n checks of the same topic in a C loop: how many were allowed."""
        cdef long i, yes = 0
        for i in range(n):
            yes += self._check(topic, access)
        return yes
