/* The C of the shared counts of connections per client address
   (addrlimit.pxd, addrlimit.pyx): an accepted peer's address bytes, the
   keyed hash that picks its slot, and the atomic counts. */
#ifndef GW_ADDRLIMIT_H
#define GW_ADDRLIMIT_H

#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <netinet/in.h>

/* The address bytes of an accepted peer: 4 (IPv4, also IPv4-mapped IPv6) or
   16 (IPv6) bytes copied to out; 0 for any other family or a short length. */
static inline int gw_peer_address(const void* sa, unsigned len, uint8_t out[16]) {
    static const uint8_t mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
    sa_family_t family;
    if (len < sizeof(sa_family_t)) return 0;
    memcpy(&family, sa, sizeof family);
    if (family == AF_INET && len >= sizeof(struct sockaddr_in)) {
        memcpy(out, &((const struct sockaddr_in*)sa)->sin_addr, 4);
        return 4;
    }
    if (family == AF_INET6 && len >= sizeof(struct sockaddr_in6)) {
        const uint8_t* a = (const uint8_t*)&((const struct sockaddr_in6*)sa)->sin6_addr;
        if (memcmp(a, mapped, 12) == 0) {
            memcpy(out, a + 12, 4);
            return 4;
        }
        memcpy(out, a, 16);
        return 16;
    }
    return 0;
}

static inline uint64_t gw_mix64(uint64_t x) {     /* splitmix64's finaliser */
    x ^= x >> 30; x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27; x *= 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

/* The slot of an address: a keyed hash of its bytes (and length, so an IPv4
   address and an IPv6 one with the same leading bytes differ). */
static inline uint32_t gw_address_slot(uint64_t seed, const uint8_t* a, int n, uint32_t mask) {
    uint64_t w0 = 0, w1 = 0;
    memcpy(&w0, a, n < 8 ? (size_t)n : 8);
    if (n > 8) memcpy(&w1, a + 8, (size_t)(n - 8));
    return (uint32_t)(gw_mix64(gw_mix64(seed ^ w0 ^ (uint64_t)n) ^ w1) & mask);
}

static inline uint32_t gw_count_add(uint32_t* p) {
    return __atomic_add_fetch(p, 1, __ATOMIC_ACQ_REL);
}
/* Takes one away, never below 0 (a count given back twice would otherwise
   wrap and refuse that slot for good). */
static inline void gw_count_sub(uint32_t* p) {
    uint32_t v = __atomic_load_n(p, __ATOMIC_ACQUIRE);
    while (v != 0 && !__atomic_compare_exchange_n(p, &v, v - 1, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {}
}

#endif
