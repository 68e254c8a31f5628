/* Fused CPU noise kernel: dst[i] = (accumulate ? src[i] : 0) + sum_s coeff_s * z_s(offset + i), float32.
 * Same bits as noise.py's reference semantics (Rademacher: bit g % 128 of Philox block g / 128, LSB first, set =
 * -1; Gaussian: uint16 lane g % 8 of block g / 8 through the inverse-CDF table). Built with -ffp-contract=off: no FMA, so the product and the sum
 * are rounded separately exactly as in the numpy and torch paths. */
#include <stdint.h>

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

/* Philox for one block under 16 keys at once (lane i: seeds[i], lanes >= n unused): the slots of a multi-slot
 * update share the counter, so their calls vectorize across slots. */
static inline void philox_keys16(uint64_t block, const uint64_t *seeds, int n, uint32_t out[4][16]) {
    uint32_t c0[16], c1[16], c2[16], c3[16], k0[16], k1[16];
    for (int i = 0; i < 16; i++) {
        uint64_t seed = i < n ? seeds[i] : 0;
        c0[i] = (uint32_t)block; c1[i] = (uint32_t)(block >> 32); c2[i] = 0; c3[i] = 0;
        k0[i] = (uint32_t)seed; k1[i] = (uint32_t)(seed >> 32);
    }
    for (int r = 0; r < 10; r++) {
        for (int i = 0; i < 16; i++) {
            uint64_t p0 = (uint64_t)M0 * c0[i], p1 = (uint64_t)M1 * c2[i];
            uint32_t n0 = (uint32_t)(p1 >> 32) ^ c1[i] ^ k0[i], n2 = (uint32_t)(p0 >> 32) ^ c3[i] ^ k1[i];
            c1[i] = (uint32_t)p1; c3[i] = (uint32_t)p0; c0[i] = n0; c2[i] = n2;
            k0[i] += W0; k1[i] += W1;
        }
    }
    for (int i = 0; i < 16; i++) { out[0][i] = c0[i]; out[1][i] = c1[i]; out[2][i] = c2[i]; out[3][i] = c3[i]; }
}

#if defined(__AVX512F__)
#include <immintrin.h>
#define HAVE_RUN_AVX512 1
/* philox_keys16 with AVX-512 intrinsics: 32x32->64 products by vpmuludq on the even and the odd lanes (the
 * compiler's own vectorization of the loop above uses the much slower 64-bit vpmullq). Same integer function. */
static inline void philox_keys16_avx512(uint64_t block, const uint64_t *seeds, int n, uint32_t out[4][16]) {
    uint32_t k0s[16], k1s[16];
    for (int i = 0; i < 16; i++) {
        uint64_t seed = i < n ? seeds[i] : 0;
        k0s[i] = (uint32_t)seed; k1s[i] = (uint32_t)(seed >> 32);
    }
    __m512i k0 = _mm512_loadu_si512(k0s), k1 = _mm512_loadu_si512(k1s);
    __m512i c0 = _mm512_set1_epi32((int)(uint32_t)block), c1 = _mm512_set1_epi32((int)(uint32_t)(block >> 32));
    __m512i c2 = _mm512_setzero_si512(), c3 = _mm512_setzero_si512();
    const __m512i m0 = _mm512_set1_epi64(M0), m1 = _mm512_set1_epi64(M1);
    const __m512i w0 = _mm512_set1_epi32((int)W0), w1 = _mm512_set1_epi32((int)W1);
    const __mmask16 odd = 0xAAAA;
    for (int r = 0; r < 10; r++) {
        __m512i e0 = _mm512_mul_epu32(c0, m0), o0 = _mm512_mul_epu32(_mm512_srli_epi64(c0, 32), m0);
        __m512i e1 = _mm512_mul_epu32(c2, m1), o1 = _mm512_mul_epu32(_mm512_srli_epi64(c2, 32), m1);
        __m512i lo0 = _mm512_mask_blend_epi32(odd, e0, _mm512_slli_epi64(o0, 32));
        __m512i hi0 = _mm512_mask_blend_epi32(odd, _mm512_srli_epi64(e0, 32), o0);
        __m512i lo1 = _mm512_mask_blend_epi32(odd, e1, _mm512_slli_epi64(o1, 32));
        __m512i hi1 = _mm512_mask_blend_epi32(odd, _mm512_srli_epi64(e1, 32), o1);
        c0 = _mm512_ternarylogic_epi32(hi1, c1, k0, 0x96);  /* hi1 ^ c1 ^ k0 */
        c2 = _mm512_ternarylogic_epi32(hi0, c3, k1, 0x96);
        c1 = lo1;
        c3 = lo0;
        k0 = _mm512_add_epi32(k0, w0);
        k1 = _mm512_add_epi32(k1, w1);
    }
    _mm512_storeu_si512(out[0], c0); _mm512_storeu_si512(out[1], c1);
    _mm512_storeu_si512(out[2], c2); _mm512_storeu_si512(out[3], c3);
}

/* One whole aligned Rademacher run (128 elements, Philox block `block`) over all m slots with AVX-512: the 128
 * partial sums stay in 8 registers; each 16 sign bits of a word are a mask that picks -c or +c per lane (exactly
 * signed_coeff's bits), then one IEEE add per element and slot, in slot order: the same operations, in the same
 * order, as the portable loops, so the same bits. */
static void rademacher_run_avx512(float *dst, const float *src, uint64_t block, const uint64_t *seeds,
                                  const float *coeffs, int m, int accumulate, int stream) {
    __m512 acc[8];
    uint32_t words[4][16];
    const __m512i sign = _mm512_set1_epi32((int)0x80000000u);
    for (int s0 = 0; s0 < m; s0 += 16) {
        int n = m - s0 < 16 ? m - s0 : 16;
        if (n < 4) {
            for (int i = 0; i < n; i++) {
                uint32_t w[4];
                philox(block, seeds[s0 + i], w);
                for (int q = 0; q < 4; q++) words[q][i] = w[q];
            }
        } else {
            philox_keys16_avx512(block, seeds + s0, n, words);
        }
        for (int i = 0; i < n; i++) {
            __m512 c = _mm512_set1_ps(coeffs[s0 + i]);
            __m512 nc = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(c), sign));
            for (int q = 0; q < 4; q++) {
                uint32_t w = words[q][i];
                __m512 lo = _mm512_mask_blend_ps((__mmask16)(w & 0xFFFFu), c, nc);
                __m512 hi = _mm512_mask_blend_ps((__mmask16)(w >> 16), c, nc);
                if (s0 + i) {
                    acc[2 * q] = _mm512_add_ps(acc[2 * q], lo);
                    acc[2 * q + 1] = _mm512_add_ps(acc[2 * q + 1], hi);
                } else {
                    acc[2 * q] = lo;
                    acc[2 * q + 1] = hi;
                }
            }
        }
    }
    for (int v = 0; v < 8; v++) {
        __m512 x = accumulate ? _mm512_add_ps(_mm512_loadu_ps(src + 16 * v), acc[v]) : acc[v];
        if (stream) _mm512_stream_ps(dst + 16 * v, x); else _mm512_storeu_ps(dst + 16 * v, x);
    }
}
#endif

/* -c when bit is 1, c when 0: a sign-bit XOR, branch-free (random bits defeat branch prediction). */
static inline float signed_coeff(uint32_t coeff_bits, uint32_t bit) {
    union { uint32_t u; float f; } v;
    v.u = coeff_bits ^ (bit << 31);
    return v.f;
}

/* All m slots in one pass: acc = ((c0 z0 + c1 z1) + c2 z2) + ..., then dst = src + acc (accumulate) or dst = acc.
 * Works through aligned runs of at most 128 elements, so acc stays in registers / L1. */
void noise_sum(float *dst, const float *src, int64_t n, uint64_t offset, const uint64_t *seeds,
               const float *coeffs, int m, int gaussian_dist, const float *table, int accumulate) {
    float acc[128], by_lane[8][16];
    int64_t i = 0;
    while (i < n) {
        uint64_t g0 = offset + (uint64_t)i;
        int64_t count = 128 - (int64_t)(g0 & 127);
        if (count > n - i) count = n - i;
#ifdef HAVE_RUN_AVX512
        if (!gaussian_dist && count == 128) {
            /* A separate destination (a perturbed copy) is written with streaming stores when aligned: no read
             * of lines that are about to be overwritten. */
            int stream = dst != src && ((uintptr_t)(dst + i) & 63) == 0;
            rademacher_run_avx512(dst + i, src + i, g0 >> 7, seeds, coeffs, m, accumulate, stream);
            i += 128;
            continue;
        }
#endif
        for (int s = 0; s < m; s++) {
            union { float f; uint32_t u; } c = {coeffs[s]};
            uint32_t w[4];
            if (!gaussian_dist && count == 128) {
                /* A whole aligned block: word by word, so each inner loop shifts one broadcast word (vectorizes
                 * without gathers). */
                philox(g0 >> 7, seeds[s], w);
                for (int q = 0; q < 4; q++) {
                    float *a = acc + 32 * q;
                    if (s) {
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
                    acc[j] = s ? acc[j] + v : v;
                }
            } else if (count == 128) {
                /* A whole aligned run: its 16 Gaussian blocks generated together, and summed lane-major
                 * (by_lane[lane][block] is element 8 * block + lane): simple loops, measured 1.45x faster. */
                uint32_t x[4][16];
                philox16(g0 >> 3, seeds[s], x);
                for (int lane = 0; lane < 8; lane++) {
                    const uint32_t *word = x[lane >> 1];
                    uint32_t shift = 16u * (uint32_t)(lane & 1);
                    float *a = by_lane[lane], coeff = coeffs[s];
                    if (s) {
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
                    acc[j] = s ? acc[j] + v : v;
                }
            }
        }
        if (gaussian_dist && count == 128) {
            for (int j = 0; j < 128; j++) acc[j] = by_lane[j & 7][j >> 3];
        }
        if (accumulate) {
            for (int64_t j = 0; j < count; j++) dst[i + j] = src[i + j] + acc[j];
        } else {
            for (int64_t j = 0; j < count; j++) dst[i + j] = acc[j];
        }
        i += count;
    }
#ifdef HAVE_RUN_AVX512
    _mm_sfence();  /* streaming stores visible before the caller reads dst */
#endif
}
