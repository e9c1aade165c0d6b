/* lowbit CPU kernels: W(2/3/4/8-bit, grouped scales + zero points) x A(int8 per group) linears.
 *
 * Identity: with activation codes xq = rint(x / sa) per group g of G inputs (sa = amax/127) and
 * weight codes c, zero points z, scales sw,
 *     y[m, n] = sum_g fma-chain( (float)D[m, n, g] * (sw[n, g] * sa[m, g]) ),
 *     D[m, n, g] = sum_{k in g} c[n, k] * xq[m, k]  -  z[n, g] * sum_{k in g} xq[m, k]   (int32, exact)
 * so the integer part is exact and every ISA path below gives bit-identical results (same int32
 * dots, same float operations in the same order: -ffp-contract=off plus explicit fma).
 *
 * Packed layout (written by lowbit.backends.kernels.layout.repack): rows in tiles of 16 (one 32-bit
 * lane per row), K in groups of G (G % 32 == 0; 2/3-bit G = 16: see pair_mode).  For tile t and group g the codes form 64-byte
 * vectors; vector v holds S = 8/b steps; byte 4r+j, bits [b*s, b*s+b) is the code of row r at
 * k = g*G + v*4S + 4s + j.  3-bit: the low two bits use the 2-bit layout (G/16 vectors), followed by
 * G/32 64-byte vectors of high bits: vector w, byte 4r+j, bit 4u+s is bit 2 of the code that low-plane
 * vector v = 2w+u, step s holds at that byte -> 3 bits per weight.
 * scales: float [tiles][groups][16]; zeros: uint8 [tiles][groups][16].
 *
 * Paths: AVX-512 VNNI + GFNI (vpdpbusd: u8 codes x s8 activations), AVX2 (vpmaddubsw + vpmaddwd), generic C;
 * chosen once at load time from cpuid (override: lowbit_set_isa).
 */
#include <immintrin.h>
#include <math.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define TILE 16
#ifndef LOWBIT_PREFETCH
#define LOWBIT_PREFETCH 1024 /* bytes ahead in the code stream (0: none) */
#endif

enum { ISA_GENERIC = 0, ISA_AVX2 = 1, ISA_AVX512VNNI = 2 };
static int g_isa = -1;
static int g_threads = 0;

typedef void (*lowbit_chunk_fn)(void *arg, int chunk);
void lowbit_pool_run(lowbit_chunk_fn fn, void *arg, int n, int threads); /* lowbit_pool.c */

int lowbit_best_isa(void) {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("gfni"))
        return ISA_AVX512VNNI;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return ISA_AVX2;
    return ISA_GENERIC;
}

int lowbit_isa(void) {
    if (g_isa < 0) g_isa = lowbit_best_isa();
    return g_isa;
}

/* Force a path (tests); returns the path in use (a path this CPU lacks is refused). */
int lowbit_set_isa(int isa) {
    if (isa >= 0 && isa <= lowbit_best_isa()) g_isa = isa;
    return lowbit_isa();
}

void lowbit_set_threads(int n) { g_threads = n; }

static int nthreads(void) {
#ifdef _OPENMP
    return g_threads > 0 ? g_threads : omp_get_max_threads();
#else
    return 1;
#endif
}

int lowbit_num_threads(void) { return nthreads(); }

/* bytes of packed codes for one (tile, group) */
static inline size_t tg_bytes(int bits, int G) { return (size_t)TILE * G * bits / 8; }

/* 2/3-bit codes in scale groups of 16 are laid out in blocks of 32 (two groups: the pair's two vectors
 * and, for 3 bits, their high-bits vector); scales and zero points stay per group of 16. */
static inline int pair_mode(int bits, int G) { return G == 16 && bits <= 3; }

/* ---------------------------------------------------------------- activations */
/* One group: amax, codes rint(x * 127/amax) (round half to even) clipped to +-127, their sum.  The
 * vector paths compute the same float products and roundings, so all paths give identical codes. */
static inline int32_t quant_tail(const float *x, int8_t *q, int from, int to, float inv) {
    int32_t s = 0;
    for (int k = from; k < to; k++) {
        int v = (int)nearbyintf(x[k] * inv);
        v = v > 127 ? 127 : (v < -127 ? -127 : v);
        q[k] = (int8_t)v;
        s += v;
    }
    return s;
}

__attribute__((target("avx512f,avx512bw"))) static int32_t quant_group512(const float *x, int8_t *q, int n, int G,
                                                                            float *scale) {
    __m512 mx = _mm512_setzero_ps();
    int k = 0;
    for (; k + 16 <= n; k += 16) mx = _mm512_max_ps(mx, _mm512_abs_ps(_mm512_loadu_ps(x + k)));
    float amax = _mm512_reduce_max_ps(mx);
    for (int t = k; t < n; t++) amax = fmaxf(amax, fabsf(x[t]));
    float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
    __m512 vinv = _mm512_set1_ps(inv);
    const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
    __m512i sum = _mm512_setzero_si512();
    for (k = 0; k + 16 <= n; k += 16) {
        __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + k), vinv));
        v = _mm512_min_epi32(_mm512_max_epi32(v, lo), hi);
        sum = _mm512_add_epi32(sum, v);
        _mm_storeu_si128((__m128i *)(q + k), _mm512_cvtepi32_epi8(v));
    }
    int32_t s = _mm512_reduce_add_epi32(sum) + quant_tail(x, q, k, n, inv);
    memset(q + n, 0, (size_t)(G - n));
    *scale = amax / 127.0f;
    return s;
}

static int32_t quant_group_generic(const float *x, int8_t *q, int n, int G, float *scale) {
    float amax = 0.0f;
    for (int k = 0; k < n; k++) amax = fmaxf(amax, fabsf(x[k]));
    float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
    int32_t s = quant_tail(x, q, 0, n, inv);
    memset(q + n, 0, (size_t)(G - n));
    *scale = amax / 127.0f;
    return s;
}

void lowbit_quantize_act(int M, int K, int Kp, int G, const float *x, int8_t *xq, float *xs, int32_t *xsum) {
    int ng = Kp / G, v512 = lowbit_isa() == ISA_AVX512VNNI;
    for (int m = 0; m < M; m++) {
        for (int g = 0; g < ng; g++) {
            int k0 = g * G, n = k0 + G < K ? G : (K > k0 ? K - k0 : 0);
            const float *xr = x + (size_t)m * K + k0;
            int8_t *qr = xq + (size_t)m * Kp + k0;
            float *sc = xs + (size_t)m * ng + g;
            xsum[(size_t)m * ng + g] = v512 ? quant_group512(xr, qr, n, G, sc) : quant_group_generic(xr, qr, n, G, sc);
        }
    }
}

/* ---------------------------------------------------------------- generic C */
static inline int code_at(int bits, int G, const uint8_t *tg, int r, int kk) {
    int S = bits == 3 ? 4 : 8 / bits, b = bits == 3 ? 2 : bits;
    int span = 4 * S, v = kk / span, s = (kk % span) / 4, j = kk % 4;
    int c = (tg[v * 64 + 4 * r + j] >> (b * s)) & ((1 << b) - 1);
    if (bits == 3) {
        uint8_t hb = tg[(size_t)G / 16 * 64 + (size_t)(v / 2) * 64 + 4 * r + j];
        c |= ((hb >> (4 * (v % 2) + s)) & 1) << 2;
    }
    return c;
}

static void tile_generic(int bits, int M, int Kp, int N, int G, int t, const uint8_t *codes, const float *scales,
                         const uint8_t *zeros, const int8_t *xq, const float *xs, const int32_t *xsum, float *y) {
    int ng = Kp / G, Gc = pair_mode(bits, G) ? 32 : G; /* Gc: codes' block */
    for (int m = 0; m < M; m++) {
        float acc[TILE] = {0};
        for (int g = 0; g < ng; g++) {
            const uint8_t *tg = codes + ((size_t)t * (Kp / Gc) + g * G / Gc) * tg_bytes(bits, Gc);
            const int8_t *xg = xq + (size_t)m * Kp + (size_t)g * G;
            for (int r = 0; r < TILE; r++) {
                int32_t d = 0;
                for (int kk = 0; kk < G; kk++) d += code_at(bits, Gc, tg, r, g * G % Gc + kk) * xg[kk];
                size_t i = ((size_t)t * ng + g) * TILE + r;
                d -= (int32_t)zeros[i] * xsum[(size_t)m * ng + g];
                float p = scales[i] * xs[(size_t)m * ng + g];
                acc[r] = fmaf((float)d, p, acc[r]);
            }
        }
        for (int r = 0; r < TILE && t * TILE + r < N; r++) y[(size_t)m * N + t * TILE + r] = acc[r];
    }
}

/* ---------------------------------------------------------------- AVX-512 VNNI */
#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,fma,gfni"), always_inline)) static inline

/* acc += u8 c . s8 x per 32-bit lane, accumulating in place: gcc's intrinsic copies the accumulator
 * around every vpdpbusd in unrolled loops (two extra moves per dot product). */
#define DPBUSD(acc, c, x) __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(c), "v"(x))

/* Step s of a code vector w, as u8 lanes scaled by 2^sh(s) (the per-step accumulators are shifted back,
 * exactly, once per group): one AND per step instead of shift + AND.  3-bit ORs in its high-plane bit,
 * moved from bit 4u+s of the high-bits byte to bit sh+2 by one vgf2p8affineqb (a bit-selection matrix),
 * in the same vpternlogd as the AND; its top step is shifted down (lo + 4*hi would not fit a byte). */
AVX512 __m512i step512(const int bits, __m512i w, int s, int u, __m512i hv) {
    if (bits == 8) return w;
    if (bits == 4) return _mm512_and_si512(w, _mm512_set1_epi8((char)(0x0F << (4 * s))));
    if (bits == 2) return _mm512_and_si512(w, _mm512_set1_epi8((char)(3 << (2 * s))));
    int sh = s == 3 ? 0 : 2 * s, q = 4 * u + s, o = sh + 2; /* input bit q -> output bit o */
    __m512i h = _mm512_gf2p8affine_epi64_epi8(hv, _mm512_set1_epi64((long long)((1ULL << q) << (8 * (7 - o)))), 0);
    if (s == 3) w = _mm512_srli_epi16(w, 6);
    return _mm512_ternarylogic_epi32(w, _mm512_set1_epi8((char)(3 << sh)), h, 0xEA); /* (w & mask) | h */
}

static inline int step_shift(int bits, int s) { return bits == 8 ? 0 : bits == 4 ? 4 * s : bits == 2 ? 2 * s : (s == 3 ? 0 : 2 * s); }

AVX512 void tile512(const int bits, const int MB, const int U1, int Kp, int N, int G, int t, const uint8_t *codes,
                    const float *scales, const uint8_t *zeros, const int8_t *xq, const float *xs,
                    const int32_t *xsum, float *y) {
    const int b = bits == 3 ? 2 : bits, S = 8 / b, ng = Kp / G, nv = G * b / 32;
    /* independent vpdpbusd chains per step (hide its latency); nv is a multiple of U (G % 32 == 0) */
    /* compile-time constant (acc stays in registers); U1: one chain per step (groups of 2 vectors) */
    const int U = MB == 1 && !U1 ? (S == 1 ? 4 : 2) : 1;
    __m512 facc[4];
    for (int m = 0; m < MB; m++) facc[m] = _mm512_setzero_ps();
    for (int g = 0; g < ng; g++) {
        const uint8_t *tg = codes + ((size_t)t * ng + g) * tg_bytes(bits, G);
        const uint8_t *hb = tg + (size_t)nv * 64; /* 3-bit: high bits, one vector per pair of vectors */
        __m512i acc[16];
        for (int a = 0; a < MB * S * U; a++) acc[a] = _mm512_setzero_si512();
        const int8_t *xg = xq + (size_t)g * G;
        const int V = U > 2 ? U : 2; /* vectors a step of the loop: nv is a multiple (G % 32 == 0) */
        for (int v = 0; v < nv; v += V) {
            if (LOWBIT_PREFETCH)
                for (int u = 0; u < V; u++) _mm_prefetch((const char *)(tg + (v + u) * 64 + LOWBIT_PREFETCH), _MM_HINT_T0);
            __m512i hv = bits == 3 ? _mm512_loadu_si512(hb + v / 2 * 64) : _mm512_setzero_si512();
            for (int u = 0; u < V; u++) {
                __m512i w = _mm512_loadu_si512(tg + (v + u) * 64);
                for (int s = 0; s < S; s++) {
                    __m512i c = step512(bits, w, s, u, hv);
                    int kk = (v + u) * 4 * S + 4 * s;
                    for (int m = 0; m < MB; m++) {
                        int32_t x4;
                        memcpy(&x4, xg + (size_t)m * Kp + kk, 4);
                        int a = (m * S + s) * U + u % U;
                        DPBUSD(acc[a], c, _mm512_set1_epi32(x4));
                    }
                }
            }
        }
        size_t i = ((size_t)t * ng + g) * TILE;
        __m512i z = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(zeros + i)));
        __m512 sw = _mm512_loadu_ps(scales + i);
        for (int m = 0; m < MB; m++) {
            __m512i d = _mm512_setzero_si512();
            for (int s = 0; s < S; s++) {
                __m512i e = acc[(m * S + s) * U];
                for (int u = 1; u < U; u++) e = _mm512_add_epi32(e, acc[(m * S + s) * U + u]);
                int sh = step_shift(bits, s);
                d = _mm512_add_epi32(d, sh ? _mm512_srai_epi32(e, sh) : e); /* exact: e is a multiple of 2^sh */
            }
            int32_t xsm = xsum[(size_t)m * ng + g];
            /* z * xsum: |xsum| <= 127 G fits 16 bits up to G = 256 (one vpmaddwd), else vpmulld */
            __m512i zx = G <= 256 ? _mm512_madd_epi16(z, _mm512_set1_epi32((int32_t)(uint16_t)(int16_t)xsm))
                                  : _mm512_mullo_epi32(z, _mm512_set1_epi32(xsm));
            d = _mm512_sub_epi32(d, zx);
            __m512 p = _mm512_mul_ps(sw, _mm512_set1_ps(xs[(size_t)m * ng + g]));
            facc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), p, facc[m]);
        }
    }
    int rows = N - t * TILE < TILE ? N - t * TILE : TILE;
    __mmask16 km = (__mmask16)((1u << rows) - 1);
    for (int m = 0; m < MB; m++) _mm512_mask_storeu_ps(y + (size_t)m * N + t * TILE, km, facc[m]);
}

#define DEF512(BITS, MB)                                                                                        \
    __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,fma,gfni"))) static void tile512_##BITS##_##MB(      \
        int Kp, int N, int G, int t, const uint8_t *c, const float *s, const uint8_t *z, const int8_t *xq,     \
        const float *xs, const int32_t *xsum, float *y) {                                                      \
        tile512(BITS, MB, 0, Kp, N, G, t, c, s, z, xq, xs, xsum, y);                                           \
    }
#define DEF512_BITS(BITS) DEF512(BITS, 1) DEF512(BITS, 2) DEF512(BITS, 3) DEF512(BITS, 4)
DEF512_BITS(2)
/* one-row GEMV of 2/3-bit codes in small groups (2 vectors a group): one chain per step, fewer adds */
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,fma,gfni"))) static void tile512_small(
    int bits, int Kp, int N, int G, int t, const uint8_t *c, const float *s, const uint8_t *z, const int8_t *xq,
    const float *xs, const int32_t *xsum, float *y) {
    if (bits == 2) tile512(2, 1, 1, Kp, N, G, t, c, s, z, xq, xs, xsum, y);
    else tile512(3, 1, 1, Kp, N, G, t, c, s, z, xq, xs, xsum, y);
}
DEF512_BITS(3)
DEF512_BITS(4)
DEF512_BITS(8)

typedef void (*tile_fn)(int, int, int, int, const uint8_t *, const float *, const uint8_t *, const int8_t *,
                        const float *, const int32_t *, float *);
static const tile_fn T512[4][4] = {
    {tile512_2_1, tile512_2_2, tile512_2_3, tile512_2_4}, {tile512_3_1, tile512_3_2, tile512_3_3, tile512_3_4},
    {tile512_4_1, tile512_4_2, tile512_4_3, tile512_4_4}, {tile512_8_1, tile512_8_2, tile512_8_3, tile512_8_4}};

/* 2/3-bit codes in groups of 16 (pair_mode): per block of 32, vector u belongs to scale group 2*block+u;
 * one chain per (step, vector), the epilogue per group.  MB <= 2 (registers). */
AVX512 void tile512p(const int bits, const int MB, int Kp, int N, int t, const uint8_t *codes, const float *scales,
                     const uint8_t *zeros, const int8_t *xq, const float *xs, const int32_t *xsum, float *y) {
    const int S = 4, ngc = Kp / 32, ng = Kp / 16;
    __m512 facc[2];
    for (int m = 0; m < MB; m++) facc[m] = _mm512_setzero_ps();
    for (int gc = 0; gc < ngc; gc++) {
        const uint8_t *tg = codes + ((size_t)t * ngc + gc) * tg_bytes(bits, 32);
        if (LOWBIT_PREFETCH)
            for (int u = 0; u < 2; u++) _mm_prefetch((const char *)(tg + u * 64 + LOWBIT_PREFETCH), _MM_HINT_T0);
        __m512i acc[16];
        for (int a = 0; a < MB * S * 2; a++) acc[a] = _mm512_setzero_si512();
        __m512i hv = bits == 3 ? _mm512_loadu_si512(tg + 128) : _mm512_setzero_si512();
        for (int u = 0; u < 2; u++) {
            __m512i w = _mm512_loadu_si512(tg + u * 64);
            for (int s = 0; s < S; s++) {
                __m512i c = step512(bits, w, s, u, hv);
                for (int m = 0; m < MB; m++) {
                    int32_t x4;
                    memcpy(&x4, xq + (size_t)m * Kp + (size_t)gc * 32 + u * 16 + 4 * s, 4);
                    DPBUSD(acc[(m * S + s) * 2 + u], c, _mm512_set1_epi32(x4));
                }
            }
        }
        for (int u = 0; u < 2; u++) {
            int g = 2 * gc + u;
            size_t i = ((size_t)t * ng + g) * TILE;
            __m512i z = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(zeros + i)));
            __m512 sw = _mm512_loadu_ps(scales + i);
            for (int m = 0; m < MB; m++) {
                __m512i d = _mm512_setzero_si512();
                for (int s = 0; s < S; s++) {
                    int sh = step_shift(bits, s);
                    __m512i e = acc[(m * S + s) * 2 + u];
                    d = _mm512_add_epi32(d, sh ? _mm512_srai_epi32(e, sh) : e);
                }
                int32_t xsm = xsum[(size_t)m * ng + g];
                d = _mm512_sub_epi32(d, _mm512_madd_epi16(z, _mm512_set1_epi32((int32_t)(uint16_t)(int16_t)xsm)));
                __m512 p = _mm512_mul_ps(sw, _mm512_set1_ps(xs[(size_t)m * ng + g]));
                facc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), p, facc[m]);
            }
        }
    }
    int rows = N - t * TILE < TILE ? N - t * TILE : TILE;
    __mmask16 km = (__mmask16)((1u << rows) - 1);
    for (int m = 0; m < MB; m++) _mm512_mask_storeu_ps(y + (size_t)m * N + t * TILE, km, facc[m]);
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,fma,gfni"))) static void tile512_pair(
    int bits, int MB, int Kp, int N, int t, const uint8_t *c, const float *s, const uint8_t *z, const int8_t *xq,
    const float *xs, const int32_t *xsum, float *y) {
    if (bits == 2) { if (MB == 1) tile512p(2, 1, Kp, N, t, c, s, z, xq, xs, xsum, y); else tile512p(2, 2, Kp, N, t, c, s, z, xq, xs, xsum, y); }
    else { if (MB == 1) tile512p(3, 1, Kp, N, t, c, s, z, xq, xs, xsum, y); else tile512p(3, 2, Kp, N, t, c, s, z, xq, xs, xsum, y); }
}

/* ---------------------------------------------------------------- AVX2 */
#define AVX2F __attribute__((target("avx2,fma"), always_inline)) static inline

/* u8 codes (each < 256) x s8 activations, 4 consecutive bytes summed per 32-bit lane (exact) */
AVX2F __m256i dot4_avx2(__m256i c, __m256i x, int bits) {
    const __m256i ones = _mm256_set1_epi16(1);
    if (bits < 8) return _mm256_madd_epi16(_mm256_maddubs_epi16(c, x), ones); /* pairs <= 2*15*127 */
    const __m256i lo4 = _mm256_set1_epi8(0x0F);
    __m256i lo = _mm256_maddubs_epi16(_mm256_and_si256(c, lo4), x);
    __m256i hi = _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(c, 4), lo4), x);
    return _mm256_add_epi32(_mm256_madd_epi16(lo, ones), _mm256_madd_epi16(hi, _mm256_set1_epi16(16)));
}

AVX2F void tile256(const int bits, const int MB, int Kp, int N, int G, int t, const uint8_t *codes,
                   const float *scales, const uint8_t *zeros, const int8_t *xq, const float *xs,
                   const int32_t *xsum, float *y) {
    const int b = bits == 3 ? 2 : bits, S = 8 / b, ng = Kp / G, nv = G * b / 32;
    const __m256i mask = _mm256_set1_epi8((char)((1 << b) - 1));
    __m256 facc[4][2];
    for (int m = 0; m < MB; m++) facc[m][0] = facc[m][1] = _mm256_setzero_ps();
    for (int g = 0; g < ng; g++) {
        const uint8_t *tg = codes + ((size_t)t * ng + g) * tg_bytes(bits, G);
        const uint8_t *hb = tg + (size_t)nv * 64;
        __m256i acc[4][2];
        for (int m = 0; m < MB; m++) acc[m][0] = acc[m][1] = _mm256_setzero_si256();
        for (int v = 0; v < nv; v++) {
            for (int h = 0; h < 2; h++) {
                __m256i w = _mm256_loadu_si256((const __m256i *)(tg + v * 64 + 32 * h));
                for (int s = 0; s < S; s++) {
                    __m256i c = b == 8 ? w : _mm256_and_si256(_mm256_srli_epi16(w, b * s), mask);
                    if (bits == 3) { /* bit q = 4(v%2)+s of the high-bits byte -> bit 2 */
                        __m256i hv = _mm256_loadu_si256((const __m256i *)(hb + (v / 2) * 64 + 32 * h));
                        int q = 4 * (v % 2) + s;
                        hv = q >= 2 ? _mm256_srli_epi16(hv, q - 2) : _mm256_slli_epi16(hv, 2 - q);
                        c = _mm256_or_si256(c, _mm256_and_si256(hv, _mm256_set1_epi8(4)));
                    }
                    int kk = g * G + v * 4 * S + 4 * s;
                    for (int m = 0; m < MB; m++) {
                        int32_t x4;
                        memcpy(&x4, xq + (size_t)m * Kp + kk, 4);
                        acc[m][h] = _mm256_add_epi32(acc[m][h], dot4_avx2(c, _mm256_set1_epi32(x4), bits));
                    }
                }
            }
        }
        size_t i = ((size_t)t * ng + g) * TILE;
        for (int h = 0; h < 2; h++) {
            __m256i z = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(zeros + i + 8 * h)));
            __m256 sw = _mm256_loadu_ps(scales + i + 8 * h);
            for (int m = 0; m < MB; m++) {
                __m256i d = _mm256_sub_epi32(acc[m][h], _mm256_mullo_epi32(z, _mm256_set1_epi32(xsum[(size_t)m * ng + g])));
                __m256 p = _mm256_mul_ps(sw, _mm256_set1_ps(xs[(size_t)m * ng + g]));
                facc[m][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), p, facc[m][h]);
            }
        }
    }
    int rows = N - t * TILE < TILE ? N - t * TILE : TILE;
    for (int m = 0; m < MB; m++) {
        float buf[TILE];
        _mm256_storeu_ps(buf, facc[m][0]);
        _mm256_storeu_ps(buf + 8, facc[m][1]);
        memcpy(y + (size_t)m * N + t * TILE, buf, sizeof(float) * rows);
    }
}

#define DEF256(BITS, MB)                                                                                        \
    __attribute__((target("avx2,fma"))) static void tile256_##BITS##_##MB(                                    \
        int Kp, int N, int G, int t, const uint8_t *c, const float *s, const uint8_t *z, const int8_t *xq,     \
        const float *xs, const int32_t *xsum, float *y) {                                                      \
        tile256(BITS, MB, Kp, N, G, t, c, s, z, xq, xs, xsum, y);                                              \
    }
#define DEF256_BITS(BITS) DEF256(BITS, 1) DEF256(BITS, 2) DEF256(BITS, 3) DEF256(BITS, 4)
DEF256_BITS(2)
DEF256_BITS(3)
DEF256_BITS(4)
DEF256_BITS(8)
static const tile_fn T256[4][4] = {
    {tile256_2_1, tile256_2_2, tile256_2_3, tile256_2_4}, {tile256_3_1, tile256_3_2, tile256_3_3, tile256_3_4},
    {tile256_4_1, tile256_4_2, tile256_4_3, tile256_4_4}, {tile256_8_1, tile256_8_2, tile256_8_3, tile256_8_4}};

/* ---------------------------------------------------------------- entry points */
static int bits_index(int bits) { return bits == 2 ? 0 : bits == 3 ? 1 : bits == 4 ? 2 : bits == 8 ? 3 : -1; }

/* y[M, N] from pre-quantized activations (xq [M, Kp], xs/xsum [M, Kp/G]).  Returns 0, or -1 on bad
 * arguments.  Rows of M are blocked by 4 (the weight tile is unpacked once per block: prefill GEMM). */
struct gemm_args {
    int bits, M, Kp, N, G, isa, tiles_per_chunk, nt;
    const uint8_t *codes, *zeros;
    const float *scales, *xs;
    const int8_t *xq;
    const int32_t *xsum;
    float *y;
};

static void gemm_tiles(void *p, int chunk) {
    const struct gemm_args *a = (const struct gemm_args *)p;
    int bits = a->bits, M = a->M, Kp = a->Kp, N = a->N, G = a->G, isa = a->isa, bi = bits_index(bits);
    int pair = pair_mode(bits, G), ng = Kp / G, t1 = (chunk + 1) * a->tiles_per_chunk;
    const int mbmax = pair && isa == ISA_AVX512VNNI ? 2 : 4;
    for (int t = chunk * a->tiles_per_chunk; t < t1 && t < a->nt; t++) {
        for (int m0 = 0; m0 < M; m0 += mbmax) {
            int mb = M - m0 < mbmax ? M - m0 : mbmax;
            const int8_t *xq_m = a->xq + (size_t)m0 * Kp;
            const float *xs_m = a->xs + (size_t)m0 * ng;
            const int32_t *xsum_m = a->xsum + (size_t)m0 * ng;
            float *y_m = a->y + (size_t)m0 * N;
            const uint8_t *codes = a->codes, *zeros = a->zeros;
            const float *scales = a->scales;
            if (pair && isa == ISA_AVX512VNNI)
                tile512_pair(bits, mb, Kp, N, t, codes, scales, zeros, xq_m, xs_m, xsum_m, y_m);
            else if (pair) /* AVX2: the generic C loop (slow) */
                tile_generic(bits, mb, Kp, N, G, t, codes, scales, zeros, xq_m, xs_m, xsum_m, y_m);
            else if (isa == ISA_AVX512VNNI && mb == 1 && bits <= 3 && G * 2 / 32 < 4)
                tile512_small(bits, Kp, N, G, t, codes, scales, zeros, xq_m, xs_m, xsum_m, y_m);
            else if (isa == ISA_AVX512VNNI)
                T512[bi][mb - 1](Kp, N, G, t, codes, scales, zeros, xq_m, xs_m, xsum_m, y_m);
            else if (isa == ISA_AVX2)
                T256[bi][mb - 1](Kp, N, G, t, codes, scales, zeros, xq_m, xs_m, xsum_m, y_m);
            else
                tile_generic(bits, mb, Kp, N, G, t, codes, scales, zeros, xq_m, xs_m, xsum_m, y_m);
        }
    }
}

/* y[M, N] from pre-quantized activations (xq [M, Kp], xs/xsum [M, Kp/G]).  Returns 0, or -1 on bad
 * arguments.  Rows of M are blocked by 4 (the weight tile is unpacked once per block: prefill GEMM).
 * Tiles go to the work pool (lowbit_pool.c) in chunks of about CHUNK_BYTES of codes, at least 4 chunks
 * a thread, claimed dynamically. */
#define CHUNK_BYTES (128 << 10)
int lowbit_gemm_q(int bits, int M, int Kp, int N, int G, const uint8_t *codes, const float *scales,
                  const uint8_t *zeros, const int8_t *xq, const float *xs, const int32_t *xsum, float *y) {
    int pair = pair_mode(bits, G);
    if (bits_index(bits) < 0 || G <= 0 || (G % 32 && !pair) || Kp % (pair ? 32 : G) || M <= 0 || N <= 0) return -1;
    int nt = (N + TILE - 1) / TILE, th = nthreads();
    size_t tile_bytes = (size_t)TILE * Kp * bits / 8 * (M > 4 ? 4 : M);
    int per = (int)(CHUNK_BYTES / (tile_bytes ? tile_bytes : 1));
    int most = nt / (4 * th); /* at least 4 chunks a thread */
    per = per > most ? most : per;
    per = per < 1 ? 1 : per;
    struct gemm_args a = {bits, M, Kp, N, G, lowbit_isa(), per, nt, codes, zeros, scales, xs, xq, xsum, y};
    lowbit_pool_run(gemm_tiles, &a, (nt + per - 1) / per, th);
    return 0;
}

/* y[M, N] = x[M, K] @ W: quantizes x per group (workspace: M*Kp + 8*M*Kp/G bytes, or NULL to allocate). */
int lowbit_linear(int bits, int M, int K, int Kp, int N, int G, const float *x, const uint8_t *codes,
                  const float *scales, const uint8_t *zeros, float *y, void *workspace) {
    if (G <= 0 || Kp % G || K > Kp) return -1;
    size_t ng = (size_t)Kp / G, need = (size_t)M * Kp + 8 * (size_t)M * ng + 64;
    void *ws = workspace ? workspace : malloc(need);
    if (!ws) return -2;
    float *xs = (float *)ws;
    int32_t *xsum = (int32_t *)(xs + (size_t)M * ng);
    int8_t *xq = (int8_t *)(xsum + (size_t)M * ng);
    lowbit_quantize_act(M, K, Kp, G, x, xq, xs, xsum);
    int rc = lowbit_gemm_q(bits, M, Kp, N, G, codes, scales, zeros, xq, xs, xsum, y);
    if (!workspace) free(ws);
    return rc;
}

__attribute__((target("avx512f"))) static uint64_t sum512(const uint64_t *p, size_t n) {
    __m512i a = _mm512_setzero_si512(), b = a, c = a, d = a;
    size_t i = 0;
    for (; i + 32 <= n; i += 32) {
        a = _mm512_add_epi64(a, _mm512_loadu_si512(p + i));
        b = _mm512_add_epi64(b, _mm512_loadu_si512(p + i + 8));
        c = _mm512_add_epi64(c, _mm512_loadu_si512(p + i + 16));
        d = _mm512_add_epi64(d, _mm512_loadu_si512(p + i + 24));
    }
    uint64_t s = (uint64_t)_mm512_reduce_add_epi64(_mm512_add_epi64(_mm512_add_epi64(a, b), _mm512_add_epi64(c, d)));
    for (; i < n; i++) s += p[i];
    return s;
}

__attribute__((target("avx2"))) static uint64_t sum256(const uint64_t *p, size_t n) {
    __m256i a = _mm256_setzero_si256(), b = a, c = a, d = a;
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        a = _mm256_add_epi64(a, _mm256_loadu_si256((const __m256i *)(p + i)));
        b = _mm256_add_epi64(b, _mm256_loadu_si256((const __m256i *)(p + i + 4)));
        c = _mm256_add_epi64(c, _mm256_loadu_si256((const __m256i *)(p + i + 8)));
        d = _mm256_add_epi64(d, _mm256_loadu_si256((const __m256i *)(p + i + 12)));
    }
    uint64_t t[4];
    _mm256_storeu_si256((__m256i *)t, _mm256_add_epi64(_mm256_add_epi64(a, b), _mm256_add_epi64(c, d)));
    uint64_t s = t[0] + t[1] + t[2] + t[3];
    for (; i < n; i++) s += p[i];
    return s;
}

static uint64_t sum_generic(const uint64_t *p, size_t n) {
    uint64_t s = 0;
    for (size_t i = 0; i < n; i++) s += p[i];
    return s;
}

struct sum_args {
    const uint64_t *p;
    size_t n, chunk;
    int isa;
    _Atomic uint64_t total;
};

static void sum_chunk(void *arg, int c) {
    struct sum_args *a = (struct sum_args *)arg;
    size_t lo = a->chunk * (size_t)c, hi = lo + a->chunk < a->n ? lo + a->chunk : a->n;
    uint64_t s = a->isa == ISA_AVX512VNNI ? sum512(a->p + lo, hi - lo)
                 : a->isa == ISA_AVX2     ? sum256(a->p + lo, hi - lo)
                                          : sum_generic(a->p + lo, hi - lo);
    atomic_fetch_add(&a->total, s);
}

/* Read bandwidth probe: sum of n uint64 words over `reps` passes, on the kernels' threads and work pool
 * (chunks of 128 KiB claimed dynamically, as the linears' tiles are): the memory floor's denominator. */
uint64_t lowbit_stream_read(const uint64_t *p, size_t n, int reps) {
    struct sum_args a = {p, n, (CHUNK_BYTES) / 8, lowbit_isa(), 0};
    int chunks = (int)((n + a.chunk - 1) / a.chunk);
    for (int r = 0; r < reps; r++) lowbit_pool_run(sum_chunk, &a, chunks, nthreads());
    return atomic_load(&a.total);
}
