/* Fused CPU noise kernel: dst[i] = (accumulate ? src[i] : 0) + term_sum_s(coeff_s * z_s(offset + i)), float32.
 * term_sum is noise.py's association (generator version 2): groups of 4 slots summed left to right, pairs of
 * groups added, the pairs summed left to right; for m <= 4 slots the plain left-to-right sum.
 * Same bits as noise.py's reference semantics (Rademacher: bit g % 128 of Philox block g / 128, LSB first, set =
 * -1; Gaussian: uint16 lane g % 8 of block g / 8 through the inverse-CDF table). Built with -ffp-contract=off: no
 * FMA, so the product and the sum are rounded separately exactly as in the torch-op reference; with -fopenmp
 * where the compiler has it (noise_pieces' threads). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* Built as a shared library (-fPIC), GCC inlines a static function called once into noise_sum, and two of them
 * then ran slower there, one thread, 131072 elements: rademacher_run_tables (64 slots 0.168 ms against 0.152 ms on
 * its own) and gaussian_terms_avx2 (1 slot 0.17 against 0.13 ms, 5 slots 0.78 against 0.57 ms). */
#define NOT_INLINED __attribute__((noinline))

#define M0 0xD2511F53u
#define M1 0xCD9E8D57u
#define W0 0x9E3779B9u
#define W1 0xBB67AE85u

static inline void philox(uint64_t block, uint64_t seed, uint32_t out[4]) {
    uint32_t c0 = (uint32_t)block, c1 = (uint32_t)(block >> 32), c2 = 0, c3 = 0;
    uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
    for (int r = 0; r < 10; r++) {
        uint64_t p0 = (uint64_t)M0 * c0, p1 = (uint64_t)M1 * c2;
        uint32_t n0 = (uint32_t)(p1 >> 32) ^ c1 ^ k0, n2 = (uint32_t)(p0 >> 32) ^ c3 ^ k1;
        c1 = (uint32_t)p1; c3 = (uint32_t)p0; c0 = n0; c2 = n2;
        k0 += W0; k1 += W1;
    }
    out[0] = c0; out[1] = c1; out[2] = c2; out[3] = c3;
}

/* Philox for 16 consecutive blocks at once, as structure-of-arrays loops the compiler turns into SIMD. */
static inline void philox16(uint64_t first_block, uint64_t seed, uint32_t out[4][16]) {
    uint32_t c0[16], c1[16], c2[16], c3[16];
    for (int i = 0; i < 16; i++) {
        c0[i] = (uint32_t)(first_block + i); c1[i] = (uint32_t)((first_block + i) >> 32); c2[i] = 0; c3[i] = 0;
    }
    uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
    for (int r = 0; r < 10; r++) {
        for (int i = 0; i < 16; i++) {
            uint64_t p0 = (uint64_t)M0 * c0[i], p1 = (uint64_t)M1 * c2[i];
            uint32_t n0 = (uint32_t)(p1 >> 32) ^ c1[i] ^ k0, n2 = (uint32_t)(p0 >> 32) ^ c3[i] ^ k1;
            c1[i] = (uint32_t)p1; c3[i] = (uint32_t)p0; c0[i] = n0; c2[i] = n2;
        }
        k0 += W0; k1 += W1;
    }
    for (int i = 0; i < 16; i++) { out[0][i] = c0[i]; out[1][i] = c1[i]; out[2][i] = c2[i]; out[3][i] = c3[i]; }
}

#if defined(__AVX512F__)
#include <immintrin.h>
#define HAVE_RUN_AVX512 1
#if defined(__AVX512VBMI__) && defined(__GFNI__)
#define HAVE_RUN_TABLES 1  /* byte permutes and the GF(2) affine bit transpose */
#endif
/* philox() of J <= 4 chains of 16 lanes, interleaved so that the multiplies' latency overlaps: chain j's lane i is
 * block first + step j + i under seeds[kstep j] (step 0: the same 16 blocks under J seeds, for few slots the calls
 * vectorize across runs, not slots; kstep 0: one seed over 16 J consecutive blocks). The first round is folded: a
 * counter (lo, hi, 0, 0) gives c0 = hi ^ k0, c1 = 0, c2 = hi32(M0 lo) ^ k1 and c3 = lo32(M0 lo). The high and low
 * halves of the 32x32 products are gathered by one two-source permute each. Same integer function. */
static inline __attribute__((always_inline)) void philox_chains(uint64_t first, int step, const uint64_t *seeds,
                                                                int kstep, int J, __m512i out[4][4]) {
    const __m512i m0 = _mm512_set1_epi64(M0), m1 = _mm512_set1_epi64(M1);
    const __m512i lo_idx = _mm512_setr_epi32(0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30);
    const __m512i hi_idx = _mm512_setr_epi32(1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
    __m512i c0[4], c1[4], c2[4], c3[4], keys[4 * 20], counter_hi[4], p_hi[4], p_lo[4];
    for (int j = 0; j < (kstep ? J : 1); j++) {  /* chain j's round keys k0 + r W0 and k1 + r W1 */
        uint32_t k0 = (uint32_t)seeds[kstep * j], k1 = (uint32_t)(seeds[kstep * j] >> 32);
        for (int r = 0; r < 10; r++) {
            keys[20 * j + 2 * r] = _mm512_set1_epi32((int)(k0 + (uint32_t)r * W0));
            keys[20 * j + 2 * r + 1] = _mm512_set1_epi32((int)(k1 + (uint32_t)r * W1));
        }
    }
    for (int j = 0; j < (step ? J : 1); j++) {  /* chain j's counters, and the first round's product */
        uint32_t lo[16], hi[16];
        for (int i = 0; i < 16; i++) {
            uint64_t block = first + (uint64_t)(step * j + i);
            lo[i] = (uint32_t)block; hi[i] = (uint32_t)(block >> 32);
        }
        __m512i counter_lo = _mm512_loadu_si512(lo);
        __m512i e = _mm512_mul_epu32(counter_lo, m0), o = _mm512_mul_epu32(_mm512_srli_epi64(counter_lo, 32), m0);
        counter_hi[j] = _mm512_loadu_si512(hi);
        p_hi[j] = _mm512_permutex2var_epi32(e, hi_idx, o);
        p_lo[j] = _mm512_permutex2var_epi32(e, lo_idx, o);
    }
    for (int j = 0; j < J; j++) {
        const __m512i *k = keys + 20 * (kstep ? j : 0);
        int c = step ? j : 0;
        c0[j] = _mm512_xor_si512(counter_hi[c], k[0]);
        c1[j] = _mm512_setzero_si512();
        c2[j] = _mm512_xor_si512(p_hi[c], k[1]);
        c3[j] = p_lo[c];
    }
    for (int r = 1; r < 10; r++) {
        for (int j = 0; j < J; j++) {
            const __m512i *k = keys + 20 * (kstep ? j : 0);
            __m512i e0 = _mm512_mul_epu32(c0[j], m0), o0 = _mm512_mul_epu32(_mm512_srli_epi64(c0[j], 32), m0);
            __m512i e1 = _mm512_mul_epu32(c2[j], m1), o1 = _mm512_mul_epu32(_mm512_srli_epi64(c2[j], 32), m1);
            __m512i hi0 = _mm512_permutex2var_epi32(e0, hi_idx, o0), lo0 = _mm512_permutex2var_epi32(e0, lo_idx, o0);
            __m512i hi1 = _mm512_permutex2var_epi32(e1, hi_idx, o1), lo1 = _mm512_permutex2var_epi32(e1, lo_idx, o1);
            c0[j] = _mm512_ternarylogic_epi32(hi1, c1[j], k[2 * r], 0x96);  /* hi1 ^ c1 ^ k0 */
            c2[j] = _mm512_ternarylogic_epi32(hi0, c3[j], k[2 * r + 1], 0x96);
            c1[j] = lo1;
            c3[j] = lo0;
        }
    }
    for (int j = 0; j < J; j++) { out[j][0] = c0[j]; out[j][1] = c1[j]; out[j][2] = c2[j]; out[j][3] = c3[j]; }
}

/* philox_chains of min(n, 4) chains, with J a constant in each case so that its loops unroll. */
static inline __attribute__((always_inline)) void philox_up_to_4(uint64_t first, int step, const uint64_t *seeds,
                                                                 int kstep, int n, __m512i out[4][4]) {
    switch (n >= 4 ? 4 : n) {
        case 4: philox_chains(first, step, seeds, kstep, 4, out); break;
        case 3: philox_chains(first, step, seeds, kstep, 3, out); break;
        case 2: philox_chains(first, step, seeds, kstep, 2, out); break;
        default: philox_chains(first, step, seeds, kstep, 1, out); break;
    }
}

/* philox() of the 16 consecutive blocks first.. (lane i: block first + i) under min(n, 4) seeds (one slot each). */
static inline __attribute__((always_inline)) void philox_runs(uint64_t first, const uint64_t *seeds, int n,
                                                              __m512i out[4][4]) {
    philox_up_to_4(first, 0, seeds, 1, n, out);
}

/* 1 to 16 whole aligned Rademacher runs (128 elements each, from Philox block `first`) over m <= 4 slots, with
 * AVX-512: their Philox calls first (philox_runs; lanes past `runs` are computed and unused), then per run each 16
 * sign bits of a word are a mask that picks -c or +c per lane (exactly signed_coeff's bits), and one IEEE add per
 * element and slot in slot order (term_sum for m <= 4): the portable loops' operations, so the same bits. */
static void rademacher_runs(float *dst, const float *src, uint64_t first, const uint64_t *seeds,
                            const float *coeffs, int m, int runs, int accumulate, int stream) {
    __m512i out[4][4];
    uint32_t words[4][4][16] __attribute__((aligned(64)));  /* [slot][word][run] */
    philox_runs(first, seeds, m, out);
    for (int j = 0; j < m; j++)
        for (int q = 0; q < 4; q++) _mm512_store_si512(words[j][q], out[j][q]);
    const __m512i sign = _mm512_set1_epi32((int)0x80000000u);
    __m512 c[4], nc[4];
    for (int j = 0; j < m; j++) {
        c[j] = _mm512_set1_ps(coeffs[j]);
        nc[j] = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(c[j]), sign));
    }
    for (int r = 0; r < runs; r++) {
        float *d = dst + 128 * r;
        const float *s = src + 128 * r;
        for (int q = 0; q < 4; q++) {
            uint32_t w = words[0][q][r];
            __m512 lo = _mm512_mask_blend_ps((__mmask16)(w & 0xFFFFu), c[0], nc[0]);
            __m512 hi = _mm512_mask_blend_ps((__mmask16)(w >> 16), c[0], nc[0]);
            for (int j = 1; j < m; j++) {
                w = words[j][q][r];
                lo = _mm512_add_ps(lo, _mm512_mask_blend_ps((__mmask16)(w & 0xFFFFu), c[j], nc[j]));
                hi = _mm512_add_ps(hi, _mm512_mask_blend_ps((__mmask16)(w >> 16), c[j], nc[j]));
            }
            if (accumulate) {
                lo = _mm512_add_ps(_mm512_loadu_ps(s + 32 * q), lo);
                hi = _mm512_add_ps(_mm512_loadu_ps(s + 32 * q + 16), hi);
            }
            if (stream) {
                _mm512_stream_ps(d + 32 * q, lo);
                _mm512_stream_ps(d + 32 * q + 16, hi);
            } else {
                _mm512_storeu_ps(d + 32 * q, lo);
                _mm512_storeu_ps(d + 32 * q + 16, hi);
            }
        }
    }
}

/* Lane permutations of two-source permutes: interleave the low (high) 8 lanes of a and b; then each pair of lanes of
 * the first 4 (last 4) pairs of a and of b in turn. Together they turn 4 registers [w][i] into 4 registers of dwords
 * 4i + w (a 4 x 16 transpose); rademacher_run_tables puts its sums in element order with them too. */
static const int32_t interleave_low[16] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23};
static const int32_t interleave_high[16] = {8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
static const int32_t pairs_first[16] = {0, 1, 16, 17, 2, 3, 18, 19, 4, 5, 20, 21, 6, 7, 22, 23};
static const int32_t pairs_last[16] = {8, 9, 24, 25, 10, 11, 26, 27, 12, 13, 28, 29, 14, 15, 30, 31};

/* coeff * z over one whole aligned Gaussian run (128 elements, 16 Philox blocks) from its blocks' words (w[q] lane b:
 * word q of block b), in element order: x[k] holds elements 16k..16k + 15. Element 8b + l is uint16 half l % 2 of
 * word l / 2 of block b, so once the words are in block-major order (a 4 x 16 transpose) their halves are the
 * table indices in element order; 16 table entries per vgatherdps. The portable loop's multiply, so the same bits. */
static inline __attribute__((always_inline)) void gaussian_values(const __m512i w[4], float coeff,
                                                                  const float *table, __m512 x[8]) {
    const __m512i low = _mm512_loadu_si512(interleave_low), high = _mm512_loadu_si512(interleave_high);
    const __m512i first = _mm512_loadu_si512(pairs_first), last = _mm512_loadu_si512(pairs_last);
    const __m512i w01[2] = {_mm512_permutex2var_epi32(w[0], low, w[1]), _mm512_permutex2var_epi32(w[0], high, w[1])};
    const __m512i w23[2] = {_mm512_permutex2var_epi32(w[2], low, w[3]), _mm512_permutex2var_epi32(w[2], high, w[3])};
    const __m512 cv = _mm512_set1_ps(coeff);
    for (int j = 0; j < 4; j++) {  /* blocks 4j..4j + 3: elements 32j..32j + 31 */
        __m512i idx = _mm512_permutex2var_epi32(w01[j >> 1], j & 1 ? last : first, w23[j >> 1]);
        x[2 * j] = _mm512_mul_ps(cv, _mm512_i32gather_ps(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(idx)), table, 4));
        x[2 * j + 1] = _mm512_mul_ps(cv, _mm512_i32gather_ps(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(idx, 1)),
                                                             table, 4));
    }
}

/* 1 to 4 whole aligned Gaussian runs of one slot (the perturbation's case): dst = (src +) coeff * z. Philox of the
 * runs' 64 blocks as 4 interleaved chains of one seed (`first`: the first run's first block). */
static void gaussian_runs(float *dst, const float *src, uint64_t first, uint64_t seed, float coeff,
                          const float *table, int runs, int accumulate, int stream) {
    __m512i words[4][4];
    philox_up_to_4(first, 16, &seed, 0, runs, words);
    for (int r = 0; r < runs; r++) {
        __m512 x[8];
        gaussian_values(words[r], coeff, table, x);
        for (int k = 0; k < 8; k++) {
            float *d = dst + 128 * r + 16 * k;
            __m512 y = accumulate ? _mm512_add_ps(_mm512_loadu_ps(src + 128 * r + 16 * k), x[k]) : x[k];
            if (stream) _mm512_stream_ps(d, y); else _mm512_storeu_ps(d, y);
        }
    }
}

#ifdef HAVE_RUN_TABLES
/* The table path keeps 8 slots' Philox chains in one register, one slot per 64-bit lane, its 32-bit word in the low
 * half: vpmuludq reads only the low halves, so a product's high half moves down by one 64-bit shift and no permute
 * gathers the halves (whatever the high halves hold is never read). On Zen 4 that, and the lookups below, spread
 * the work over the multiply, add and permute pipes: 64 slots 0.199 -> 0.152 ms per 131072 elements, one thread
 * (docs/PERFORMANCE.md). */

/* Philox's round keys of one octet of slots (lane i: seeds[i], lanes >= n: seed 0), in the low half of each 64-bit
 * lane: keys[2r] = k0 + r W0, keys[2r + 1] = k1 + r W1 for rounds r = 0..9. They depend on the seeds only, so one
 * call of noise_sum computes them once. */
static void octet_keys(const uint64_t *seeds, int n, __m512i keys[20]) {
    uint64_t k0[8], k1[8];
    for (int i = 0; i < 8; i++) {
        uint64_t seed = i < n ? seeds[i] : 0;
        k0[i] = (uint32_t)seed; k1[i] = (uint32_t)(seed >> 32);
    }
    for (int r = 0; r < 10; r++) {
        keys[2 * r] = _mm512_loadu_si512(k0);
        keys[2 * r + 1] = _mm512_loadu_si512(k1);
        for (int i = 0; i < 8; i++) { k0[i] = (uint32_t)(k0[i] + W0); k1[i] = (uint32_t)(k1[i] + W1); }
    }
}

/* philox() of one block under J <= 4 octets' keys (J chains of octet_keys), interleaved so that the multiplies'
 * latency overlaps. The first round is folded: its counter words 2 and 3 are 0 and words 0 and 1 are the same in
 * every lane. out[j][w]: word w of octet j's 8 slots, in the low halves. Same integer function as philox(). */
static inline __attribute__((always_inline)) void philox_octets(uint64_t block, const __m512i *keys, int J,
                                                                __m512i out[4][4]) {
    const __m512i m0 = _mm512_set1_epi64(M0), m1 = _mm512_set1_epi64(M1);
    uint64_t p = (uint64_t)M0 * (uint32_t)block;
    const __m512i hi = _mm512_set1_epi64((uint32_t)(block >> 32)), p_hi = _mm512_set1_epi64(p >> 32),
                  p_lo = _mm512_set1_epi64((uint32_t)p);
    __m512i c0[4], c1[4], c2[4], c3[4];
    for (int j = 0; j < J; j++) {
        c0[j] = _mm512_xor_si512(hi, keys[20 * j]);
        c1[j] = _mm512_setzero_si512();
        c2[j] = _mm512_xor_si512(p_hi, keys[20 * j + 1]);
        c3[j] = p_lo;
    }
    for (int r = 1; r < 10; r++) {
        for (int j = 0; j < J; j++) {
            __m512i p0 = _mm512_mul_epu32(c0[j], m0), p1 = _mm512_mul_epu32(c2[j], m1);
            c0[j] = _mm512_ternarylogic_epi64(_mm512_srli_epi64(p1, 32), c1[j], keys[20 * j + 2 * r], 0x96);
            c2[j] = _mm512_ternarylogic_epi64(_mm512_srli_epi64(p0, 32), c3[j], keys[20 * j + 2 * r + 1], 0x96);
            c1[j] = p1;  /* lo32(p1), in the low half */
            c3[j] = p0;
        }
    }
    for (int j = 0; j < J; j++) { out[j][0] = c0[j]; out[j][1] = c1[j]; out[j][2] = c2[j]; out[j][3] = c3[j]; }
}

/* For vpermt2b over two of an octet's Philox words (source bytes 0-63: the first word, 64-127: the second; slot s's
 * word at bytes 8s..8s+3): byte b of qword e is byte e of slot (7 - b)'s two words, so that gf2p8affine (bit i of
 * its result reads byte 7 - i) turns qword e into one byte per element, bit i = slot i: byte e' of the result is
 * element e' of the 64 that the two words cover. */
static inline __m512i octet_index(void) {
    uint8_t idx[64];
    for (int e = 0; e < 8; e++)
        for (int b = 0; b < 8; b++) idx[8 * e + b] = (uint8_t)((e >> 2) * 64 + 8 * (7 - b) + (e & 3));
    return _mm512_loadu_si512(idx);
}

/* x rotated right by s bits, s a multiple of 4 below 32 (the intrinsic needs an immediate). */
static inline __attribute__((always_inline)) __m512i rotate_right(__m512i x, int s) {
    switch (s) {
        case 4: return _mm512_ror_epi32(x, 4);
        case 8: return _mm512_ror_epi32(x, 8);
        case 12: return _mm512_ror_epi32(x, 12);
        case 16: return _mm512_ror_epi32(x, 16);
        case 20: return _mm512_ror_epi32(x, 20);
        case 24: return _mm512_ror_epi32(x, 24);
        case 28: return _mm512_ror_epi32(x, 28);
        default: return x;
    }
}

/* One octet's sign bits as one byte per element, and each element's pair sum (its two groups' looked-up sums
 * added, or its lone group's sum) accumulated into acc in term_sum's order (first: acc = the sum). vpermps reads
 * the low 4 bits of each dword of its index, so dword i of a bytes register, rotated right by 8k (+4 for the
 * second group's nibble), looks up element 4i + k: acc[4h + k] lane i holds element 64h + 4i + k (rademacher_run_tables
 * puts them back in order). A rotate runs beside the permutes and adds, where a byte permute (vpermb) competed with
 * them. */
static inline __attribute__((always_inline)) void octet_sums(const __m512i w[4], __m512i octet_idx,
                                                             const float *tables, int pair, int first,
                                                             __m512 acc[8]) {
    const __m512i identity = _mm512_set1_epi64(0x8040201008040201LL);
    const __m512i bytes[2] = {
        _mm512_gf2p8affine_epi64_epi8(identity, _mm512_permutex2var_epi8(w[0], octet_idx, w[1]), 0),
        _mm512_gf2p8affine_epi64_epi8(identity, _mm512_permutex2var_epi8(w[2], octet_idx, w[3]), 0)};
    const __m512 lo_table = _mm512_loadu_ps(tables);
    const __m512 hi_table = pair ? _mm512_loadu_ps(tables + 16) : lo_table;
    for (int h = 0; h < 2; h++)
        for (int k = 0; k < 4; k++) {
            __m512 sum = _mm512_permutexvar_ps(rotate_right(bytes[h], 8 * k), lo_table);
            if (pair) sum = _mm512_add_ps(sum, _mm512_permutexvar_ps(rotate_right(bytes[h], 8 * k + 4), hi_table));
            acc[4 * h + k] = first ? sum : _mm512_add_ps(acc[4 * h + k], sum);
        }
}

/* One whole aligned Rademacher run over m > 4 slots by table lookup: `tables` holds, for each group of 4 slots,
 * its 16 possible sums ((+-c0 +- c1) +- c2) +- c3 indexed by the 4 sign bits (computed in that order by
 * group_tables), so a lookup gives exactly the group's sum; each octet's two groups are added and the octets' sums
 * accumulated in order (octet_sums): term_sum's bits. Philox runs 4 octets (32 slots) at a time.
 * `keys`: octet_keys of each 8 slots. */
static NOT_INLINED void rademacher_run_tables(float *dst, const float *src, uint64_t block, const __m512i *keys,
                                              const float *tables, int m, int accumulate, int stream) {
    __m512 acc[8] = {0};  /* the first octet sets it (octet_sums' `first`); zeroed for the compiler's sake */
    __m512i words[4][4];
    const __m512i octet_idx = octet_index();
    if (m % 32 == 0) {  /* whole groups of 4 octets (32, 64, 512 slots...): unrolled without branches, 3 % faster */
        for (int s32 = 0; s32 < m; s32 += 32) {
            const float *t = tables + 4 * s32;  /* group s32 / 4's table */
            philox_octets(block, keys + 20 * (s32 / 8), 4, words);
            if (s32) octet_sums(words[0], octet_idx, t, 1, 0, acc); else octet_sums(words[0], octet_idx, t, 1, 1, acc);
            octet_sums(words[1], octet_idx, t + 32, 1, 0, acc);
            octet_sums(words[2], octet_idx, t + 64, 1, 0, acc);
            octet_sums(words[3], octet_idx, t + 96, 1, 0, acc);
        }
    } else
    for (int s32 = 0; s32 < m; s32 += 32) {
        int octets = (m - s32 + 7) / 8;
        const __m512i *k = keys + 20 * (s32 / 8);
        switch (octets >= 4 ? 4 : octets) {  /* constant J, so each case's loops unroll */
            case 4: philox_octets(block, k, 4, words); break;
            case 3: philox_octets(block, k, 3, words); break;
            case 2: philox_octets(block, k, 2, words); break;
            default: philox_octets(block, k, 1, words); break;
        }
        for (int c = 0; c < 4 && s32 + 8 * c < m; c++) {
            int s0 = s32 + 8 * c, pair = m - s0 > 4;
            const float *t = tables + 4 * s0;  /* group s0 / 4's table */
            if (!s0) octet_sums(words[c], octet_idx, t, 1, 1, acc);  /* m > 4: the first octet is a pair */
            else if (pair) octet_sums(words[c], octet_idx, t, 1, 0, acc);
            else octet_sums(words[c], octet_idx, t, 0, 0, acc);
        }
    }
    /* Back to element order: element 64h + 16n + t is acc[4h + t % 4] lane 4n + t / 4. Interleave lanes of
     * acc[4h] with acc[4h + 1] (low: P0, high: P1) and of acc[4h + 2] with acc[4h + 3] (Q0, Q1), then each 16
     * elements are one two-source permute of P and Q. */
    const __m512i low = _mm512_loadu_si512(interleave_low), high = _mm512_loadu_si512(interleave_high);
    const __m512i even = _mm512_loadu_si512(pairs_first), odd = _mm512_loadu_si512(pairs_last);
    for (int h = 0; h < 2; h++) {
        __m512 p[2] = {_mm512_permutex2var_ps(acc[4 * h], low, acc[4 * h + 1]),
                       _mm512_permutex2var_ps(acc[4 * h], high, acc[4 * h + 1])};
        __m512 q[2] = {_mm512_permutex2var_ps(acc[4 * h + 2], low, acc[4 * h + 3]),
                       _mm512_permutex2var_ps(acc[4 * h + 2], high, acc[4 * h + 3])};
        for (int n = 0; n < 4; n++) {
            __m512 x = _mm512_permutex2var_ps(p[n >> 1], n & 1 ? odd : even, q[n >> 1]);
            const int at = 64 * h + 16 * n;
            if (accumulate) x = _mm512_add_ps(_mm512_loadu_ps(src + at), x);
            if (stream) _mm512_stream_ps(dst + at, x); else _mm512_storeu_ps(dst + at, x);
        }
    }
}
#endif /* HAVE_RUN_TABLES */
#endif

#if !defined(__AVX512F__) && defined(__AVX2__)
#include <immintrin.h>
#define HAVE_RUN_AVX2 1
/* AVX2 (no AVX-512: e.g. AMD Zen 2/3). Philox's round keys of 8-lane chains: keys[20 j + 2 r] and
 * keys[20 j + 2 r + 1] are lane i's k0 + r W0 and k1 + r W1 in chain j. `spread` 0: (n + 7) / 8 chains of 8 seeds
 * each (lanes past n: seed 0); 1: n chains, chain j all seeds[j]. They depend on the seeds only, so one call of
 * noise_sum computes them once (each philox8 call then takes up to 4 chains of them). */
static void round_keys8(const uint64_t *seeds, int n, int spread, __m256i *keys) {
    int chains = spread ? n : (n + 7) / 8;
    for (int j = 0; j < chains; j++) {
        uint32_t a[8], b[8];
        for (int i = 0; i < 8; i++) {
            int s = spread ? j : 8 * j + i;
            uint64_t seed = s < n ? seeds[s] : 0;
            a[i] = (uint32_t)seed; b[i] = (uint32_t)(seed >> 32);
        }
        for (int r = 0; r < 10; r++) {
            keys[20 * j + 2 * r] = _mm256_loadu_si256((const __m256i *)a);
            keys[20 * j + 2 * r + 1] = _mm256_loadu_si256((const __m256i *)b);
            for (int i = 0; i < 8; i++) { a[i] += W0; b[i] += W1; }
        }
    }
}

/* Philox rounds first..9 of J <= 4 interleaved 8-lane chains (so that the multiplies' latency overlaps), in place:
 * c[j][0..3] holds chain j's state, and at the end its words 0..3; chain j's round keys start at keys[stride * j]
 * (stride 0: one key for all chains). The 32x32 products' high halves are gathered from the even and odd lanes'
 * 64-bit products by a blend, the low halves are one vpmulld. Same integer function as philox(). */
static inline __attribute__((always_inline)) void philox8(__m256i c[4][4], const __m256i *keys, int stride, int J,
                                                          int first) {
    const __m256i m0 = _mm256_set1_epi64x(M0), m1 = _mm256_set1_epi64x(M1);
    const __m256i m0_lo = _mm256_set1_epi32((int)M0), m1_lo = _mm256_set1_epi32((int)M1);
    for (int r = first; r < 10; r++) {
        for (int j = 0; j < J; j++) {
            __m256i e0 = _mm256_mul_epu32(c[j][0], m0), o0 = _mm256_mul_epu32(_mm256_srli_epi64(c[j][0], 32), m0);
            __m256i e1 = _mm256_mul_epu32(c[j][2], m1), o1 = _mm256_mul_epu32(_mm256_srli_epi64(c[j][2], 32), m1);
            __m256i lo0 = _mm256_mullo_epi32(c[j][0], m0_lo), lo1 = _mm256_mullo_epi32(c[j][2], m1_lo);
            __m256i hi0 = _mm256_blend_epi32(_mm256_srli_epi64(e0, 32), o0, 0xAA);
            __m256i hi1 = _mm256_blend_epi32(_mm256_srli_epi64(e1, 32), o1, 0xAA);
            c[j][0] = _mm256_xor_si256(_mm256_xor_si256(hi1, c[j][1]), keys[stride * j + 2 * r]);
            c[j][2] = _mm256_xor_si256(_mm256_xor_si256(hi0, c[j][3]), keys[stride * j + 2 * r + 1]);
            c[j][1] = lo1;
            c[j][3] = lo0;
        }
    }
}

/* A chain's state before round 0 for the 8 consecutive blocks first..first + 7: lane r's counter is first + r. */
static inline void counters8(uint64_t first, __m256i c[4]) {
    uint32_t l[8], h[8];
    for (int r = 0; r < 8; r++) {
        uint64_t b = first + (uint64_t)r;
        l[r] = (uint32_t)b; h[r] = (uint32_t)(b >> 32);
    }
    c[0] = _mm256_loadu_si256((const __m256i *)l);
    c[1] = _mm256_loadu_si256((const __m256i *)h);
    c[2] = c[3] = _mm256_setzero_si256();
}

/* The Philox words of up to 8 consecutive runs (lane r: block first + r) of m <= 4 slots, one chain per slot
 * (`keys`: round_keys8 with spread): words[(r * 4 + q) * 4 + s]. */
static void run_words8(uint64_t first, const __m256i *keys, int m, uint32_t *words) {
    __m256i c[4][4];
    counters8(first, c[0]);
    for (int j = 1; j < m; j++)
        for (int q = 0; q < 4; q++) c[j][q] = c[0][q];
    switch (m) {  /* constant J, so each case's loops unroll */
        case 4: philox8(c, keys, 20, 4, 0); break;
        case 3: philox8(c, keys, 20, 3, 0); break;
        case 2: philox8(c, keys, 20, 2, 0); break;
        default: philox8(c, keys, 20, 1, 0); break;
    }
    uint32_t tmp[8] __attribute__((aligned(32)));
    for (int j = 0; j < m; j++)
        for (int q = 0; q < 4; q++) {
            _mm256_store_si256((__m256i *)tmp, c[j][q]);
            for (int r = 0; r < 8; r++) words[(r * 4 + q) * 4 + j] = tmp[r];
        }
}

/* One whole aligned Rademacher run of m <= 4 slots, 32 elements (one word) at a time: slot s's word q shifted left
 * by 31 - bit puts each element's sign bit where blendv reads it, which picks -c or +c (exactly signed_coeff's
 * bits), summed left to right (term_sum for m <= 4). words[4 q + s]; signed_c[2s], signed_c[2s + 1]: +c, -c. */
static void rademacher_run_avx2(float *dst, const float *src, const uint32_t *words, const float *signed_c, int m,
                                int accumulate, int stream) {
    __m256i cnt[4];
    for (int v = 0; v < 4; v++) cnt[v] = _mm256_setr_epi32(31 - 8 * v, 30 - 8 * v, 29 - 8 * v, 28 - 8 * v,
                                                            27 - 8 * v, 26 - 8 * v, 25 - 8 * v, 24 - 8 * v);
    for (int q = 0; q < 4; q++) {
        __m256 t[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
        for (int s = 0; s < m; s++) {
            __m256i w = _mm256_set1_epi32((int)words[4 * q + s]);
            __m256 c = _mm256_broadcast_ss(signed_c + 2 * s), nc = _mm256_broadcast_ss(signed_c + 2 * s + 1);
            for (int v = 0; v < 4; v++) {
                __m256 x = _mm256_blendv_ps(c, nc, _mm256_castsi256_ps(_mm256_sllv_epi32(w, cnt[v])));
                t[v] = s ? _mm256_add_ps(t[v], x) : x;
            }
        }
        for (int v = 0; v < 4; v++) {
            float *d = dst + 32 * q + 8 * v;
            __m256 y = accumulate ? _mm256_add_ps(_mm256_loadu_ps(src + 32 * q + 8 * v), t[v]) : t[v];
            if (stream) _mm256_stream_ps(d, y); else _mm256_storeu_ps(d, y);
        }
    }
}

/* 8 slots' Philox words (lane s: slot s's word) as one byte per element: byte e, bit s = bit e of slot s. Bytes are
 * grouped by element octet (one in-lane shuffle and one dword permute: qword k = byte k of the 8 slots), then each
 * qword's 8x8 bit matrix is transposed by three delta swaps. */
static inline __m256i slot_bytes8(__m256i words) {
    const __m256i by_octet = _mm256_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15,
                                              0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    const __m256i octet_major = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    __m256i x = _mm256_permutevar8x32_epi32(_mm256_shuffle_epi8(words, by_octet), octet_major);
    static const long long masks[3] = {0x00AA00AA00AA00AALL, 0x0000CCCC0000CCCCLL, 0x00000000F0F0F0F0LL};
    static const int shifts[3] = {7, 14, 28};
    for (int k = 0; k < 3; k++) {
        __m256i t = _mm256_xor_si256(x, _mm256_srli_epi64(x, shifts[k]));
        t = _mm256_and_si256(t, _mm256_set1_epi64x(masks[k]));
        x = _mm256_xor_si256(x, _mm256_xor_si256(t, _mm256_slli_epi64(t, shifts[k])));
    }
    return x;
}

/* One whole aligned Rademacher run over m > 4 slots by table lookup, as rademacher_run_tables: `tables` holds each
 * group of 4 slots' 16 possible sums (group_tables, term_sum's order), `keys` round_keys8 of every 8 slots, `bytes`
 * room for (m + 7) / 8 * 128 bytes. Philox runs across 8 slots per chain, its first round folded (the counter is
 * the same in every lane, words 2 and 3 are 0); each octet of slots becomes one byte per element (slot_bytes8).
 * Then per 8 elements: each nibble looks up its group's sum (two vpermps of 8 entries, blendv on the nibble's top
 * bit), the two groups of a pair are added, and the pairs are accumulated in order: term_sum's bits. */
static void rademacher_run_octets(float *dst, const float *src, uint64_t block, const __m256i *keys,
                                  const float *tables, uint8_t *bytes, int m, int accumulate, int stream) {
    uint64_t p = (uint64_t)M0 * (uint32_t)block;
    const __m256i hi = _mm256_set1_epi32((int)(uint32_t)(block >> 32));
    const __m256i p_hi = _mm256_set1_epi32((int)(uint32_t)(p >> 32)), p_lo = _mm256_set1_epi32((int)(uint32_t)p);
    int octets = (m + 7) / 8;
    for (int o0 = 0; o0 < octets; o0 += 4) {
        int J = octets - o0 < 4 ? octets - o0 : 4;
        const __m256i *k = keys + 20 * o0;
        __m256i c[4][4];
        for (int j = 0; j < J; j++) {  /* round 0 of counter (lo, hi, 0, 0) */
            c[j][0] = _mm256_xor_si256(hi, k[20 * j]);
            c[j][1] = _mm256_setzero_si256();
            c[j][2] = _mm256_xor_si256(p_hi, k[20 * j + 1]);
            c[j][3] = p_lo;
        }
        switch (J) {  /* constant J, so each case's loops unroll */
            case 4: philox8(c, k, 20, 4, 1); break;
            case 3: philox8(c, k, 20, 3, 1); break;
            case 2: philox8(c, k, 20, 2, 1); break;
            default: philox8(c, k, 20, 1, 1); break;
        }
        for (int j = 0; j < J; j++)
            for (int q = 0; q < 4; q++)
                _mm256_storeu_si256((__m256i *)(bytes + 128 * (o0 + j) + 32 * q), slot_bytes8(c[j][q]));
    }
    /* lane i of a dword vector: element byte i in its lowest and highest byte, so bits 2:0 index the first group
     * and bit 31 is the second group's top bit */
    const __m256i spread = _mm256_setr_epi8(0, -1, -1, 0, 1, -1, -1, 1, 2, -1, -1, 2, 3, -1, -1, 3,
                                            4, -1, -1, 4, 5, -1, -1, 5, 6, -1, -1, 6, 7, -1, -1, 7);
    for (int q = 0; q < 4; q++) {
        __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
        for (int o = 0; o < octets; o++) {
            const float *t = tables + 32 * o;
            int pair = m - 8 * o > 4;  /* else a last group without a partner is the pair */
            for (int v = 0; v < 4; v++) {
                int64_t eight;  /* the bytes of elements 8v..8v+7 */
                memcpy(&eight, bytes + 128 * o + 32 * q + 8 * v, 8);
                __m256i idx = _mm256_shuffle_epi8(_mm256_set1_epi64x(eight), spread);
                __m256 sum = _mm256_blendv_ps(_mm256_permutevar8x32_ps(_mm256_loadu_ps(t), idx),
                                              _mm256_permutevar8x32_ps(_mm256_loadu_ps(t + 8), idx),
                                              _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
                if (pair) {
                    __m256i hi_idx = _mm256_srli_epi32(idx, 4);
                    sum = _mm256_add_ps(sum, _mm256_blendv_ps(_mm256_permutevar8x32_ps(_mm256_loadu_ps(t + 16), hi_idx),
                                                              _mm256_permutevar8x32_ps(_mm256_loadu_ps(t + 24), hi_idx),
                                                              _mm256_castsi256_ps(idx)));
                }
                acc[v] = o ? _mm256_add_ps(acc[v], sum) : sum;
            }
        }
        for (int v = 0; v < 4; v++) {
            float *d = dst + 32 * q + 8 * v;
            __m256 y = accumulate ? _mm256_add_ps(_mm256_loadu_ps(src + 32 * q + 8 * v), acc[v]) : acc[v];
            if (stream) _mm256_stream_ps(d, y); else _mm256_storeu_ps(d, y);
        }
    }
}

/* One slot's terms coeff * z over a whole aligned Gaussian run (16 blocks), in element order, stored (fresh) or
 * added: Philox for the 16 blocks as 2 chains of 8 under the slot's round keys (`keys`, round_keys8 with spread),
 * each chain's words put in block-major order (a 4 x 8 transpose: 128-bit lane h of row k holds block k + 4h's 4
 * words), whose 8 uint16 halves are that block's table indices in element order, and 8 entries per vgatherdps. */
static NOT_INLINED void gaussian_terms_avx2(uint64_t first, const __m256i *keys, float coeff, const float *table,
                                            float *terms, int fresh) {
    __m256i c[4][4];
    counters8(first, c[0]);
    counters8(first + 8, c[1]);
    philox8(c, keys, 0, 2, 0);
    const __m256 cv = _mm256_set1_ps(coeff);
    for (int j = 0; j < 2; j++) {
        __m256i w01l = _mm256_unpacklo_epi32(c[j][0], c[j][1]), w01h = _mm256_unpackhi_epi32(c[j][0], c[j][1]);
        __m256i w23l = _mm256_unpacklo_epi32(c[j][2], c[j][3]), w23h = _mm256_unpackhi_epi32(c[j][2], c[j][3]);
        const __m256i rows[4] = {_mm256_unpacklo_epi64(w01l, w23l), _mm256_unpackhi_epi64(w01l, w23l),
                                 _mm256_unpacklo_epi64(w01h, w23h), _mm256_unpackhi_epi64(w01h, w23h)};
        for (int k = 0; k < 4; k++)
            for (int h = 0; h < 2; h++) {
                __m128i idx = h ? _mm256_extracti128_si256(rows[k], 1) : _mm256_castsi256_si128(rows[k]);
                __m256 x = _mm256_mul_ps(cv, _mm256_i32gather_ps(table, _mm256_cvtepu16_epi32(idx), 4));
                float *t = terms + 8 * (8 * j + k + 4 * h);
                _mm256_storeu_ps(t, fresh ? x : _mm256_add_ps(_mm256_loadu_ps(t), x));
            }
    }
}
#endif /* AVX2 */

/* -c when bit is 1, c when 0: a sign-bit XOR, branch-free (random bits defeat branch prediction). */
static inline float signed_coeff(uint32_t coeff_bits, uint32_t bit) {
    union { uint32_t u; float f; } v;
    v.u = coeff_bits ^ (bit << 31);
    return v.f;
}

/* Folds slot s's terms (in `group`) into term_sum's partial sums, n elements: a group closes after its 4th slot or
 * the last one; the first group of a pair waits in `pair`, the second is added to it and the pair to `total`. */
static void close_slot(float *group, float *pair, float *total, int s, int m, int64_t n) {
    int last = s == m - 1;
    if ((s & 3) != 3 && !last) return;
    int second = (s >> 2) & 1, first_pair = s < 8;
    if (second) {
        for (int64_t j = 0; j < n; j++) pair[j] += group[j];
    } else if (!last) {
        for (int64_t j = 0; j < n; j++) pair[j] = group[j];
        return;
    } else {
        pair = group;  /* a last group without a partner is the pair */
    }
    if (first_pair) {
        for (int64_t j = 0; j < n; j++) total[j] = pair[j];
    } else {
        for (int64_t j = 0; j < n; j++) total[j] += pair[j];
    }
}

#if defined(HAVE_RUN_TABLES) || defined(HAVE_RUN_AVX2)
/* The 16 sums of each group of 4 slots for every sign pattern b (bit i set: slot 4j+i's z is -1), in term_sum's
 * order; bits of slots past the last are ignored (their entries repeat). */
static void group_tables(const float *coeffs, int m, float *tables) {
    for (int j = 0; 4 * j < m; j++) {
        int r = m - 4 * j < 4 ? m - 4 * j : 4;
        for (uint32_t b = 0; b < 16; b++) {
            union { float f; uint32_t u; } c = {coeffs[4 * j]};
            float sum = signed_coeff(c.u, b & 1u);
            for (int i = 1; i < r; i++) {
                c.f = coeffs[4 * j + i];
                sum += signed_coeff(c.u, (b >> i) & 1u);
            }
            tables[16 * j + b] = sum;
        }
    }
}
#endif

/* All m slots in one pass: acc = term_sum(c0 z0, c1 z1, ...), then dst = src + acc (accumulate) or dst = acc.
 * Works through aligned runs of at most 128 elements, so the partial sums stay in registers / L1. */
void noise_sum(float *dst, const float *src, int64_t n, uint64_t offset, const uint64_t *seeds,
               const float *coeffs, int m, int gaussian_dist, const float *table, int accumulate) {
    float group[128], pair[128], acc[128], by_lane[8][16];
    int64_t i = 0;
#ifdef HAVE_RUN_AVX512
    __m512i gauss_words[4][4];  /* a whole Gaussian run's Philox words of 4 slots */
#endif
#ifdef HAVE_RUN_TABLES
    float *tables = NULL;
    __m512i *keys = NULL;
    if (!gaussian_dist && m > 4) {
        int octets = (m + 7) / 8;
        tables = (float *)malloc(sizeof(float) * 16 * (size_t)((m + 3) / 4));
        if (posix_memalign((void **)&keys, 64, sizeof(__m512i) * 20 * (size_t)octets)) keys = NULL;
        if (tables && keys) {
            group_tables(coeffs, m, tables);
            for (int c = 0; c < octets; c++) octet_keys(seeds + 8 * c, m - 8 * c, keys + 20 * c);
        } else {
            free(tables);
            free(keys);
            tables = NULL;
            keys = NULL;
        }
    }
#endif
#ifdef HAVE_RUN_AVX2
    /* m <= 4: +c and -c per slot (a sign-bit flip, as signed_coeff) and the Philox words of 8 runs; m > 4: the
     * groups' tables and room for the slots' bytes of a run. Philox's round keys either way. */
    int few = m <= 4, octets = (m + 7) / 8;
    float *signed_c = NULL, *tables8 = NULL;
    uint32_t *words = NULL;
    uint8_t *bytes = NULL;
    __m256i *keys8 = NULL;
    int avx2 = 0;
    if (!gaussian_dist && m >= 1) {
        int chains = few ? m : octets;
        if (posix_memalign((void **)&keys8, 32, sizeof(__m256i) * 20 * (size_t)chains)) keys8 = NULL;
        if (few) {
            signed_c = (float *)malloc(sizeof(float) * 2 * (size_t)m);
            words = (uint32_t *)malloc(sizeof(uint32_t) * 128);
            avx2 = signed_c && words && keys8;
        } else {
            tables8 = (float *)malloc(sizeof(float) * 32 * (size_t)octets);
            bytes = (uint8_t *)malloc(128 * (size_t)octets);
            avx2 = tables8 && bytes && keys8;
        }
        if (avx2) {
            round_keys8(seeds, m, few, keys8);
            if (few) {
                for (int s = 0; s < m; s++) {
                    union { float f; uint32_t u; } c = {coeffs[s]};
                    signed_c[2 * s] = signed_coeff(c.u, 0);
                    signed_c[2 * s + 1] = signed_coeff(c.u, 1);
                }
            } else {
                group_tables(coeffs, m, tables8);
            }
        }
    }
    /* Gaussian: each slot's round keys. */
    __m256i *gauss_keys = NULL;
    if (gaussian_dist && m >= 1) {
        if (posix_memalign((void **)&gauss_keys, 32, sizeof(__m256i) * 20 * (size_t)m)) gauss_keys = NULL;
        if (gauss_keys) round_keys8(seeds, m, 1, gauss_keys);
    }
    int vector_gaussian = gauss_keys != NULL;
#elif defined(HAVE_RUN_AVX512)
    const int vector_gaussian = 1;
#else
    const int vector_gaussian = 0;
#endif
    while (i < n) {
        uint64_t g0 = offset + (uint64_t)i;
        int64_t count = 128 - (int64_t)(g0 & 127);
        if (count > n - i) count = n - i;
#ifdef HAVE_RUN_AVX2
        if (avx2 && count == 128) {
            int stream = dst != src && ((uintptr_t)(dst + i) & 31) == 0;
            if (few) {  /* Philox vectorized across 8 runs */
                int runs = n - i >= 8 * 128 ? 8 : (int)((n - i) / 128);
                run_words8(g0 >> 7, keys8, m, words);
                for (int r = 0; r < runs; r++)
                    rademacher_run_avx2(dst + i + 128 * r, src + i + 128 * r, words + 16 * r, signed_c, m, accumulate,
                                        stream);
                i += 128 * (int64_t)runs;
            } else {  /* across slots */
                rademacher_run_octets(dst + i, src + i, g0 >> 7, keys8, tables8, bytes, m, accumulate, stream);
                i += 128;
            }
            continue;
        }
#endif
#ifdef HAVE_RUN_AVX512
        if (gaussian_dist && count == 128 && m == 1) {
            int stream = dst != src && ((uintptr_t)(dst + i) & 63) == 0;
            int runs = n - i >= 4 * 128 ? 4 : (int)((n - i) / 128);
            gaussian_runs(dst + i, src + i, g0 >> 3, seeds[0], coeffs[0], table, runs, accumulate, stream);
            i += 128 * (int64_t)runs;
            continue;
        }
        if (!gaussian_dist && count == 128 && m >= 1) {
            /* A separate destination (a perturbed copy) is written with streaming stores when aligned: no read
             * of lines that are about to be overwritten. For m <= 4, term_sum is the left-to-right sum. */
            int stream = dst != src && ((uintptr_t)(dst + i) & 63) == 0;
            if (m <= 4) {
                int runs = n - i >= 16 * 128 ? 16 : (int)((n - i) / 128);
                rademacher_runs(dst + i, src + i, g0 >> 7, seeds, coeffs, m, runs, accumulate, stream);
                i += 128 * (int64_t)runs;
                continue;
            }
#ifdef HAVE_RUN_TABLES
            if (tables) {
                rademacher_run_tables(dst + i, src + i, g0 >> 7, keys, tables, m, accumulate, stream);
                i += 128;
                continue;
            }
#endif
        }
#endif
        /* by_lane's layout for a whole Gaussian run of the portable loop, natural otherwise (the vector paths
         * write their terms in element order): the same for all three partial sums. */
        int lane_major = gaussian_dist && count == 128 && !vector_gaussian;
        float *terms = lane_major ? &by_lane[0][0] : group;
        for (int s = 0; s < m; s++) {
            union { float f; uint32_t u; } c = {coeffs[s]};
            uint32_t w[4];
            int fresh = (s & 3) == 0;  /* the first slot of a group */
            if (!gaussian_dist && count == 128) {
                /* A whole aligned block: word by word, so each inner loop shifts one broadcast word (vectorizes
                 * without gathers). */
                philox(g0 >> 7, seeds[s], w);
                for (int q = 0; q < 4; q++) {
                    float *a = terms + 32 * q;
                    if (!fresh) {
                        for (uint32_t b = 0; b < 32; b++) a[b] += signed_coeff(c.u, (w[q] >> b) & 1u);
                    } else {
                        for (uint32_t b = 0; b < 32; b++) a[b] = signed_coeff(c.u, (w[q] >> b) & 1u);
                    }
                }
            } else if (!gaussian_dist) {
                philox(g0 >> 7, seeds[s], w);
                int64_t first = (int64_t)(g0 & 127);
                for (int64_t j = 0; j < count; j++) {
                    int64_t b = first + j;
                    float v = signed_coeff(c.u, (w[b >> 5] >> (b & 31)) & 1u);
                    terms[j] = fresh ? v : terms[j] + v;
                }
#ifdef HAVE_RUN_AVX512
            } else if (count == 128) {  /* Philox of 4 slots at once, then each slot's terms in element order */
                if ((s & 3) == 0) philox_runs(g0 >> 3, seeds + s, m - s, gauss_words);
                __m512 x[8];
                gaussian_values(gauss_words[s & 3], coeffs[s], table, x);
                for (int k = 0; k < 8; k++) {
                    float *t = terms + 16 * k;
                    _mm512_storeu_ps(t, fresh ? x[k] : _mm512_add_ps(_mm512_loadu_ps(t), x[k]));
                }
#endif
#ifdef HAVE_RUN_AVX2
            } else if (count == 128 && gauss_keys) {
                gaussian_terms_avx2(g0 >> 3, gauss_keys + 20 * s, coeffs[s], table, terms, fresh);
#endif
            } else if (count == 128) {
                /* A whole aligned run: its 16 Gaussian blocks generated together, and summed lane-major
                 * (by_lane[lane][block] is element 8 * block + lane): simple loops, measured 1.45x faster. */
                uint32_t x[4][16];
                philox16(g0 >> 3, seeds[s], x);
                for (int lane = 0; lane < 8; lane++) {
                    const uint32_t *word = x[lane >> 1];
                    uint32_t shift = 16u * (uint32_t)(lane & 1);
                    float *a = by_lane[lane], coeff = coeffs[s];
                    if (!fresh) {
                        for (int blk = 0; blk < 16; blk++) a[blk] += coeff * table[(word[blk] >> shift) & 0xFFFFu];
                    } else {
                        for (int blk = 0; blk < 16; blk++) a[blk] = coeff * table[(word[blk] >> shift) & 0xFFFFu];
                    }
                }
            } else {
                uint64_t block = (uint64_t)-1;
                for (int64_t j = 0; j < count; j++) {
                    uint64_t g = g0 + (uint64_t)j;
                    if ((g >> 3) != block) { block = g >> 3; philox(block, seeds[s], w); }
                    int64_t lane = (int64_t)(g & 7);
                    float v = coeffs[s] * table[(w[lane >> 1] >> (16 * (lane & 1))) & 0xFFFFu];
                    terms[j] = fresh ? v : terms[j] + v;
                }
            }
            close_slot(terms, pair, acc, s, m, count == 128 ? 128 : count);
        }
        if (lane_major) {
            float natural[128];
            for (int j = 0; j < 128; j++) natural[j] = acc[(j & 7) * 16 + (j >> 3)];
            for (int j = 0; j < 128; j++) acc[j] = natural[j];
        }
        if (accumulate) {
            for (int64_t j = 0; j < count; j++) dst[i + j] = src[i + j] + acc[j];
        } else {
            for (int64_t j = 0; j < count; j++) dst[i + j] = acc[j];
        }
        i += count;
    }
#ifdef HAVE_RUN_TABLES
    free(tables);
    free(keys);
#endif
#ifdef HAVE_RUN_AVX2
    free(signed_c);
    free(words);
    free(tables8);
    free(bytes);
    free(keys8);
    free(gauss_keys);
#endif
#if defined(HAVE_RUN_AVX512) || defined(HAVE_RUN_AVX2)
    _mm_sfence();  /* streaming stores visible before the caller reads dst */
#endif
}

/* The fused pass's unit: theta's update and the perturbed copy computed from it, one cache-sized chunk at a time, so
 * the perturbation reads the updated theta from cache, not memory. A multiple of 128: chunks are whole runs. */
#define FUSED_CHUNK 16384

/* Share `share` of `shares` of one pass over many pieces: the pieces' elements, in order, cut into `shares`
 * contiguous shares (whole 128-element runs), each piece k's part dst = src + sum (srcs[k] == NULL: dst = sum).
 * With an update (mu > 0, every piece with a src): first src += update_sum in place, then dst = src + sum, chunk by
 * chunk: the same bits as an update pass followed by a perturbation pass, with one read of src instead of two. */
static void pieces_share(float *const *dsts, float *const *srcs, const int64_t *counts, const uint64_t *offsets,
                         int npieces, const uint64_t *seeds, const float *coeffs, int m, const uint64_t *useeds,
                         const float *ucoeffs, int mu, int gaussian_dist, const float *table, int shares, int share) {
    int64_t total = 0;
    for (int k = 0; k < npieces; k++) total += counts[k];
    int64_t size = (total + shares - 1) / shares;
    size += (128 - size % 128) % 128;
    int64_t lo = size * share, hi = lo + size < total ? lo + size : total, at = 0;
    for (int k = 0; k < npieces && at < hi; at += counts[k], k++) {
        int64_t a = lo > at ? lo - at : 0, b = hi < at + counts[k] ? hi - at : counts[k];
        if (a >= b) continue;
        float *src = srcs[k] ? srcs[k] : dsts[k];
        if (mu == 0 || !srcs[k]) {
            noise_sum(dsts[k] + a, src + a, b - a, offsets[k] + (uint64_t)a, seeds, coeffs, m, gaussian_dist, table,
                      srcs[k] != NULL);
            continue;
        }
        for (int64_t x = a; x < b;) {
            uint64_t g = offsets[k] + (uint64_t)x;
            int64_t len = FUSED_CHUNK - (int64_t)(g % FUSED_CHUNK);
            if (len > b - x) len = b - x;
            noise_sum(src + x, src + x, len, g, useeds, ucoeffs, mu, gaussian_dist, table, 1);
            noise_sum(dsts[k] + x, src + x, len, g, seeds, coeffs, m, gaussian_dist, table, 1);
            x += len;
        }
    }
}

/* One pass of noise_sum over many pieces (a block's tensors, an embedding's rows), optionally fused with an update
 * of the srcs (mu slots; mu = 0: none): share `share` of `shares`, or (share < 0) all of them, in one OpenMP
 * parallel region when built with OpenMP. The Python side uses that region only when this library shares torch's
 * OpenMP runtime: its threads, still spinning after torch's last parallel region, take the shares at once (a thread
 * of our own would compete with them for the cores). */
void noise_pieces(float *const *dsts, float *const *srcs, const int64_t *counts, const uint64_t *offsets,
                  int npieces, const uint64_t *seeds, const float *coeffs, int m, const uint64_t *useeds,
                  const float *ucoeffs, int mu, int gaussian_dist, const float *table, int shares, int share) {
    if (share >= 0) {
        pieces_share(dsts, srcs, counts, offsets, npieces, seeds, coeffs, m, useeds, ucoeffs, mu, gaussian_dist,
                     table, shares, share);
        return;
    }
#ifdef _OPENMP
#pragma omp parallel for num_threads(shares) schedule(static, 1)
#endif
    for (int t = 0; t < shares; t++)
        pieces_share(dsts, srcs, counts, offsets, npieces, seeds, coeffs, m, useeds, ucoeffs, mu, gaussian_dist,
                     table, shares, t);
}

/* 1 when built with OpenMP (the Python side then checks that the runtime is torch's before using it). */
int kernel_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}
