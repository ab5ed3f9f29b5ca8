# The subscription index of a worker: a trie of topic filters keyed by level,
# answering for a PUBLISH topic name which local subscribers match (each once,
# with its highest granted QoS) and which peer workers have interest.
#
# A path-compressed trie: a node's label is one or more exact levels joined
# by '/' (a run of levels where nothing branches, no wildcard and nothing
# subscribed in between), so a filter of 128 levels that shares nothing with
# another is one node, not 128. '+' and '#' are always nodes of their own. A
# node exists for the root, for every filter with a local subscriber or peer
# interest, for every wildcard level, and wherever two paths part; inserting a
# filter that parts inside a label splits that node, and a node left with one
# exact child and nothing else is merged into it. So the shape is canonical:
# it depends only on the live filters, never on the order of operations.
#
# A node keeps its exact-name children in a packed array (up to 8, linear
# scan) or an open-addressing table (linear probing, backward-shift deletion,
# power-of-two size, grows at 3/4 load and shrinks below 1/8), keyed by the
# first level of their label, and its '+' and '#' children apart, so a match
# never scans. A node's local subscriptions are a packed array of
# (subscriber, qos, MQTT 5.0 options, Subscription Identifier); each subscriber keeps the list of its (node, position)
# pairs, so removing a session is O(its subscriptions). Both sides remove by
# swap-with-last and fix the moved element's back-reference. Nodes left with
# no subscriber, no peer interest and no child are freed on the spot (memory
# returns).
#
# Subscriber ids index a per-index array (back-references and the match's
# dedupe stamps), so they should be dense slots (connection/session slot
# numbers), not hashes.
#
# Filters given to subscribe / add_peer_interest are checked for the
# structural rules (MQTT-4.7.1-2/-3, 4.7.3-1) and for the MQTT maximum length
# (65535 bytes, so every label length and level count fits its 16-bit field);
# UTF-8 is the codec's job (valid_topic_filter, valid_utf8). Topic names given
# to topics_match are not checked: the codec has already validated them.
#
# Everything is `noexcept nogil` and single-threaded (one index per worker;
# even topics_match writes the dedupe stamps). Nothing on the match path
# allocates except growing the caller's MatchResult.

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t

cdef enum:
    TOPICS_ERR_NOMEM = -1       # allocation failed; the index is unchanged
    TOPICS_ERR_INVALID = -2     # bad or too long filter, QoS > 2, worker >= 64, subscriber id > TOPICS_MAX_SUBSCRIBER
    TOPICS_MAX_WORKERS = 64
    TOPICS_MAX_SUBSCRIBER = 0x7FFFFFFE
    TOPICS_MAX_LEN = 65535      # longest filter or topic name (MQTT's 16-bit string length)

cdef enum:
    # A subscription's MQTT 5.0 options (SubEntry.opts; 0 for 3.1.1's).
    SUBOPT_NO_LOCAL = 1         # not delivered to its own subscriber's PUBLISHes (MatchResult.nolocal)
    SUBOPT_RAP = 2              # Retain As Published: live deliveries keep the RETAIN flag

cdef struct SubEntry:           # one local subscription, in its node (16 bytes)
    uint32_t subscriber
    uint32_t back               # its index in the subscriber's refs
    uint8_t qos
    uint8_t opts                # SUBOPT_*
    uint32_t subid              # MQTT 5.0 Subscription Identifier (0: none)

cdef struct TopicNode:
    # 80 bytes, the label's bytes right after them. The fields a match reads
    # first are in the node's first 64 bytes.
    uint64_t hash               # hash of the label's first level (exact-name nodes)
    uint16_t first_len          # bytes of the label's first level
    uint16_t label_len          # bytes of the label (0 for the root)
    uint16_t slashes            # '/' in the label: the levels it spans, less one
    uint16_t label_cap          # bytes allocated for the label (a split leaves room)
    uint32_t nkids
    uint32_t kcap
    uint32_t nsubs
    uint32_t subs_cap
    TopicNode** kids            # exact-name children: packed (kcap <= 8) or hash table
    TopicNode* plus             # the '+' child
    TopicNode* multi            # the '#' child
    SubEntry* subs
    uint64_t peers              # bit w: worker w has a subscription on exactly this filter
    TopicNode* parent           # NULL for the root

cdef struct SubRef:             # one subscription, in its subscriber's list
    TopicNode* node
    uint32_t pos                # its index in node.subs

cdef struct SubSlot:            # per subscriber id
    SubRef* refs
    uint32_t n
    uint32_t cap
    uint32_t stamp              # match generation that last reported this subscriber
    uint32_t outpos             # where, in that match's entries

cdef struct TopicTrie:
    TopicNode root              # the empty prefix; never freed, not counted in nodes; no label
    SubSlot* slots
    uint32_t nslots
    uint32_t generation
    uint64_t seed               # per-index hash seed
    size_t nodes                # trie nodes, root excluded
    size_t subscriptions        # local (filter, subscriber) pairs
    size_t bytes                # memory held by nodes, child tables and subscription arrays
    uint8_t* namebuf            # scratch for filters handed to callbacks
    uint32_t namebuf_cap

cdef struct MatchEntry:
    uint32_t subscriber
    uint8_t qos                 # the highest QoS among its matching subscriptions
    uint8_t opts                # SUBOPT_RAP when one of them has it

cdef struct TopicLevel:         # match scratch: one level of the topic name
    uint32_t off
    uint32_t len
    uint64_t hash

cdef struct MatchFrame:         # match scratch: a pending (node, level) of the walk
    TopicNode* node
    uint32_t level

cdef struct MatchResult:
    # Caller-owned, reused across matches (topics_result_init / _free). After
    # topics_match: entries[0:count] (each subscriber once) and peers.
    MatchEntry* entries
    uint32_t count
    uint32_t cap
    uint64_t peers              # bit w: worker w has at least one matching filter
    uint32_t nolocal            # set by the caller: subscriber + 1 whose No Local subscriptions
                                # do not match (the publisher's own session; 0: none)
    uint32_t nolocal_skipped    # counted by topics_match: subscriptions No Local left out
    TopicLevel* levels          # scratch, grown to the topic's level count
    MatchFrame* stack
    uint32_t scratch_cap

# Called with a filter (bytes valid only during the call) and a QoS. It must
# not modify the index.
ctypedef void (*topics_filter_cb)(void* ctx, const uint8_t* topic_filter, uint32_t len,
                                  uint8_t qos) noexcept nogil


# NULL when memory runs out.
cdef TopicTrie* topics_new() noexcept nogil
cdef void topics_free(TopicTrie* t) noexcept nogil

# Adds a local subscription or, for a filter the subscriber already has,
# replaces its QoS (MQTT-3.8.4-3). Returns 1 when the filter had no local
# subscriber before (announce interest to the peers), 0 when it had,
# TOPICS_ERR_NOMEM, TOPICS_ERR_INVALID.
cdef int topics_subscribe(TopicTrie* t, const uint8_t* topic_filter, uint32_t len,
                          uint32_t subscriber, uint8_t qos) noexcept nogil
# The same with MQTT 5.0's subscription options (SUBOPT_*) and Subscription
# Identifier (0: none), which a replacing subscription replaces too.
cdef int topics_subscribe_ext(TopicTrie* t, const uint8_t* topic_filter, uint32_t len,
                              uint32_t subscriber, uint8_t qos, uint8_t opts, uint32_t subid) noexcept nogil
# A subscriber's subscription on exactly this filter: 1 with *qos, *opts,
# *subid set, 0 when it has none.
cdef int topics_subscription_info(TopicTrie* t, const uint8_t* topic_filter, uint32_t len, uint32_t subscriber,
                                  uint8_t* qos, uint8_t* opts, uint32_t* subid) noexcept nogil
# The Subscription Identifiers of a subscriber's subscriptions matching a
# topic name (a shared one's filter after its $share/{name}/), at most max
# into ids; how many there are (may be more than max). O(its subscriptions).
cdef uint32_t topics_subscriber_ids(TopicTrie* t, uint32_t subscriber, const uint8_t* topic, uint32_t len,
                                    uint32_t* ids, uint32_t max) noexcept nogil
# Returns 1 when this removed the filter's last local subscriber (announce the
# loss of interest), 0 otherwise (also when not subscribed, or invalid filter).
cdef int topics_unsubscribe(TopicTrie* t, const uint8_t* topic_filter, uint32_t len,
                            uint32_t subscriber) noexcept nogil
# Removes every subscription of a subscriber (session ended); calls cb (when
# not NULL) with each filter whose last local subscriber this was, and the QoS
# it had. Returns how many. O(its subscriptions).
cdef int topics_remove_subscriber(TopicTrie* t, uint32_t subscriber,
                                  topics_filter_cb cb, void* ctx) noexcept nogil
# Calls cb with each (filter, qos) of a subscriber (to move a persistent
# session to another worker). Returns how many.
cdef int topics_subscriptions(TopicTrie* t, uint32_t subscriber,
                              topics_filter_cb cb, void* ctx) noexcept nogil
# Calls cb (qos 0) with each filter that has local subscribers (what a
# respawned peer asks for). Returns how many. Walks the whole trie.
cdef int topics_filters(TopicTrie* t, topics_filter_cb cb, void* ctx) noexcept nogil
# Local subscribers on exactly this filter (0 when none or invalid).
cdef uint32_t topics_filter_count(TopicTrie* t, const uint8_t* topic_filter, uint32_t len) noexcept nogil

# Peer interest, one bit per (filter, worker); idempotent. add returns 1 when
# the bit was newly set, 0 when already set, TOPICS_ERR_NOMEM or
# TOPICS_ERR_INVALID; remove returns 1 when it was set, 0 otherwise.
cdef int topics_add_peer_interest(TopicTrie* t, const uint8_t* topic_filter, uint32_t len,
                                  uint8_t worker) noexcept nogil
cdef int topics_remove_peer_interest(TopicTrie* t, const uint8_t* topic_filter, uint32_t len,
                                     uint8_t worker) noexcept nogil
# Drops every interest of one worker (it died); returns how many filters had
# it. Walks the whole trie, allocates nothing.
cdef int topics_clear_peer(TopicTrie* t, uint8_t worker) noexcept nogil

# MatchResult lifetime (init zeroes it; free releases its arrays).
cdef void topics_result_init(MatchResult* out) noexcept nogil
cdef void topics_result_free(MatchResult* out) noexcept nogil
# Fills `out` for a PUBLISH topic name (MQTT 4.7: '+' one level, '#' the
# parent and any levels below, empty levels are levels, filters starting with
# a wildcard do not match names starting with '$'). Each matching subscriber
# appears once with its highest QoS (MQTT-3.3.5-1); peers is the OR of the
# matching filters' peer bits. Returns out.count, TOPICS_ERR_NOMEM when
# growing out failed, TOPICS_ERR_INVALID for a name over TOPICS_MAX_LEN.
# One filter (valid, as subscribe checks it) against one topic name.
cdef bint topics_filter_matches(const uint8_t* f, uint32_t flen, const uint8_t* t, uint32_t tlen) noexcept nogil
cdef int topics_match(TopicTrie* t, const uint8_t* topic, uint32_t len, MatchResult* out) noexcept nogil

cdef inline size_t topics_node_count(const TopicTrie* t) noexcept nogil:
    return t.nodes
