/* The C harnesses' checks: a failed one prints where and what, and the
   harness exits 1 (tests/test_c_sources.py runs them). */
#ifndef GW_TEST_CHECK_H
#define GW_TEST_CHECK_H

#include <stdio.h>
#include <stdlib.h>

#define CHECK(cond) do { \
        if (!(cond)) { \
            fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond); \
            exit(1); \
        } \
    } while (0)

#define CHECK_EQ(a, b) do { \
        unsigned long long check_a_ = (unsigned long long)(a), check_b_ = (unsigned long long)(b); \
        if (check_a_ != check_b_) { \
            fprintf(stderr, "%s:%d: check failed: %s == %s (%llu != %llu, 0x%llx != 0x%llx)\n", \
                    __FILE__, __LINE__, #a, #b, check_a_, check_b_, check_a_, check_b_); \
            exit(1); \
        } \
    } while (0)

/* Deterministic pseudo-random numbers (xorshift64*). */
static inline unsigned long long check_rand(unsigned long long* s) {
    *s ^= *s >> 12; *s ^= *s << 25; *s ^= *s >> 27;
    return *s * 2685821657736338717ULL;
}

#endif
