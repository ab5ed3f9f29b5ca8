# The ACL's per-message check (the rules: gw/acl.py, the file's format and
# meaning). Each identity's rules are a topic trie (gw_ext/topics.pyx) whose
# subscriber ids are the kinds of access (ACL_SUB_*): one match walks the
# rules' structure, not the list of them. In front of it, every session has
# a small cache of topic -> verdict, so a publisher or subscriber that keeps
# to its topics pays one look-up per message. A reload makes a new AclRules
# with the next generation: every session's view and cache entries of an
# older one are rebuilt at its next check.

from libc.stdint cimport uint8_t, uint16_t, uint32_t
from gw_ext.topics cimport MatchResult, TopicTrie

cdef enum:
    ACL_READ = 1
    ACL_WRITE = 2
    ACL_CACHE_SLOTS = 16          # per session, direct-mapped by the topic's hash
    ACL_CACHE_TOPIC = 54          # longest topic a cache entry holds (longer ones are matched each time)
    ACL_SUB_READ = 0              # subscriber ids in a rules trie: which access a matching rule gives
    ACL_SUB_WRITE = 1
    ACL_SUB_DENY = 2

cdef struct AclCacheEntry:        # 64 bytes
    uint32_t gen                  # the rules' generation it was decided under (0: empty)
    uint16_t len
    uint8_t known                 # ACL_READ | ACL_WRITE: which verdicts are decided
    uint8_t allowed               # ... and which of those are allowed
    char[ACL_CACHE_TOPIC] topic

# One session's view of the ACL: its identity's rules, and its cache.
cdef struct AclView:
    uint32_t gen                  # the generation the tries belong to (0: not built)
    uint8_t deny_all              # memory ran out building it: denied everything (fails closed)
    TopicTrie* shared             # the user's (or the anonymous) topic lines: owned by the AclRules
    TopicTrie* own                # its patterns, substituted: owned by the view
    AclCacheEntry[ACL_CACHE_SLOTS] cache

cdef class AclRules:
    cdef readonly uint32_t generation
    cdef readonly object file             # gw.acl.AclFile
    cdef dict shared                      # user name (bytes) or None -> _Trie
    cdef MatchResult match                # reused by every cold match
    cdef TopicTrie* shared_trie(self, object username) except? NULL
    cdef int build_view(self, AclView* view, const char* username, uint16_t ulen, bint has_username,
                        const char* client_id, uint16_t clen) except -1
    cdef int cold_check(self, AclView* view, const uint8_t* topic, uint32_t n, uint8_t access) noexcept

cdef AclView* acl_view_new() noexcept nogil
cdef void acl_view_free(AclView* view) noexcept nogil
cdef int acl_allowed(AclRules rules, AclView** view, const char* username, uint16_t ulen, bint has_username,
                     const char* client_id, uint16_t clen, const uint8_t* topic, uint32_t n,
                     uint8_t access) except -1
