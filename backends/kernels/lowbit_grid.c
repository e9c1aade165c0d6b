/* lowbit CPU kernels for the grid form (lowbit.MatMulGrid: a mixture of data types per group, 2/3 bits).
 *
 * Identity: a group g (G inputs) of output row n picks grid t[n, g]; its weights are
 *     W[k, n] = s[n, g] * f[t] * lev[t][c[n, k]]          (lev: small integers, f: one float per grid)
 * with s = u8 code * step[n] (uint8 scales) or a float32 scale (step = 1).  With activation codes
 * xq = rint(x / sa) in groups of GA (GA = max(G, 32); sa = amax/127, lowbit_quantize_act),
 *     D[m, n, g] = sum_{k in g} lev[t][c] * xq[m, k]                        (int32, exact)
 *     in[m, n, b] = fma-chain over the groups g of activation block b (GA inputs) of (float)D * (s' * f[t])
 *     acc_j[m, n] = fma-chain over the blocks b = j (mod 4) of in[m, n, b] * sa[m, b]
 *     y[m, n]    = ((acc_0 + acc_1) + (acc_2 + acc_3)) * step[n]
 * (s' = the u8 code as float, or the float32 scale), the same float operations in the same order on every
 * path (-ffp-contract=off plus explicit fma): the paths are bit-identical.
 *
 * Layout (lowbit.backends.kernels.grid.repack_grid): codes in the 2/3-bit layout of lowbit_cpu.c in code
 * blocks of Gc = max(G, 32) (3 bits stay 3 bits: a 2-bit plane plus a 1-bit plane); grid indices as one
 * uint32 per (tile, group), row r in bits 2r..2r+1; scales u8 (or float32) [tiles][groups][16]; step float
 * [tiles * 16].  Bytes per weight: bits + (8 + 2) / G with uint8 scales, as in the file.
 *
 * AVX-512 path (VNNI + VBMI + GFNI): per 4-input step one vpermb maps (grid << bits | code) to lev + OFF as
 * u8 (OFF makes it unsigned; OFF * sum(xq) is subtracted per group), one vpdpbusd.  Otherwise generic C.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define TILE 16
#define GRID_OFF 16 /* lev + OFF >= 0 for |lev| <= 16 */

typedef void (*lowbit_chunk_fn)(void *arg, int chunk);
void lowbit_pool_run(lowbit_chunk_fn fn, void *arg, int n, int threads);
int lowbit_isa(void);
int lowbit_num_threads(void);
void lowbit_quantize_act(int M, int K, int Kp, int G, const float *x, int8_t *xq, float *xs, int32_t *xsum);

static int g_grid_fast = -1;

static int grid_fast(void) {
    if (g_grid_fast < 0) {
        __builtin_cpu_init();
        g_grid_fast = __builtin_cpu_supports("avx512vbmi") != 0;
    }
    return g_grid_fast && lowbit_isa() == 2;
}

struct grid_args {
    int bits, M, Kp, N, G, GA, per, nt, su8;
    const uint8_t *codes;
    const uint32_t *types;
    const void *scales;
    const float *step, *fac, *xs;
    const int8_t *lev, *xq;
    const int32_t *xsum; /* [M, Kp/G]: sum of xq over each weight group */
    float *y;
};

static inline int grid_code(int bits, int Gc, const uint8_t *blk, int r, int kk) {
    int v = kk / 16, s = (kk % 16) / 4, j = kk % 4;
    int c = (blk[v * 64 + 4 * r + j] >> (2 * s)) & 3;
    if (bits == 3) c |= ((blk[Gc / 16 * 64 + (v / 2) * 64 + 4 * r + j] >> (4 * (v % 2) + s)) & 1) << 2;
    return c;
}

static inline float grid_scale(const struct grid_args *a, size_t i) {
    return a->su8 ? (float)((const uint8_t *)a->scales)[i] : ((const float *)a->scales)[i];
}

static void tile_grid_generic(const struct grid_args *a, int t, int m) {
    int bits = a->bits, G = a->G, Gc = G < 32 ? 32 : G, Kp = a->Kp, ng = Kp / G, nb = Kp / Gc, L = 1 << bits;
    const int8_t *xq = a->xq + (size_t)m * Kp;
    float acc[4][TILE] = {{0}};
    for (int b = 0; b < nb; b++) {
        const uint8_t *blk = a->codes + ((size_t)t * nb + b) * (size_t)(bits * 2 * Gc);
        float sa = a->xs[(size_t)m * nb + b], inner[TILE];
        for (int gi = 0; gi < Gc / G; gi++) {
            int g = b * (Gc / G) + gi;
            uint32_t tw = a->types[(size_t)t * ng + g];
            for (int r = 0; r < TILE; r++) {
                int ty = (tw >> (2 * r)) & 3;
                int32_t d = 0;
                for (int kk = gi * G; kk < gi * G + G; kk++)
                    d += a->lev[ty * L + grid_code(bits, Gc, blk, r, kk)] * xq[b * Gc + kk];
                float p = grid_scale(a, ((size_t)t * ng + g) * TILE + r) * a->fac[ty];
                inner[r] = gi ? fmaf((float)d, p, inner[r]) : (float)d * p;
            }
        }
        for (int r = 0; r < TILE; r++) acc[b & 3][r] = fmaf(inner[r], sa, acc[b & 3][r]);
    }
    for (int r = 0; r < TILE && t * TILE + r < a->N; r++)
        a->y[(size_t)m * a->N + t * TILE + r] =
            ((acc[0][r] + acc[1][r]) + (acc[2][r] + acc[3][r])) * a->step[t * TILE + r];
}

#define V512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,gfni"), always_inline)) static inline
#define DPBUSD(acc, c, x) __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(c), "v"(x))

/* Grid indices of one (tile, group) as bytes: vpmultishiftqb copies bits 2r-bits.. of the broadcast uint32 into
 * every byte of lane r, so the row's grid index lands at bits [bits, bits+2) (other bits: neighbours' indices,
 * ignored: the level table repeats over them, the factor table over bits 0-1). */
V512 __m512i grid_types512(const int bits, uint32_t tw) {
    static const int8_t off2[64] = {
        62, 62, 62, 62, 0, 0, 0, 0, 2, 2, 2, 2, 4, 4, 4, 4, 6, 6, 6, 6, 8, 8, 8, 8, 10, 10, 10, 10, 12, 12, 12, 12,
        14, 14, 14, 14, 16, 16, 16, 16, 18, 18, 18, 18, 20, 20, 20, 20, 22, 22, 22, 22, 24, 24, 24, 24, 26, 26, 26, 26,
        28, 28, 28, 28};
    static const int8_t off3[64] = {
        61, 61, 61, 61, 63, 63, 63, 63, 1, 1, 1, 1, 3, 3, 3, 3, 5, 5, 5, 5, 7, 7, 7, 7, 9, 9, 9, 9, 11, 11, 11, 11,
        13, 13, 13, 13, 15, 15, 15, 15, 17, 17, 17, 17, 19, 19, 19, 19, 21, 21, 21, 21, 23, 23, 23, 23, 25, 25, 25, 25,
        27, 27, 27, 27};
    const __m512i ctl = _mm512_loadu_si512(bits == 2 ? off2 : off3);
    return _mm512_multishift_epi64_epi8(ctl, _mm512_set1_epi32((int)tw));
}

/* The same with the index at bits [0, 2) (2-bit steps 1 and 2 read their code in place, at bits 2s..2s+1). */
V512 __m512i grid_types512_low(uint32_t tw) {
    static const int8_t off0[64] = {
        0, 0, 0, 0, 2, 2, 2, 2, 4, 4, 4, 4, 6, 6, 6, 6, 8, 8, 8, 8, 10, 10, 10, 10, 12, 12, 12, 12, 14, 14, 14, 14,
        16, 16, 16, 16, 18, 18, 18, 18, 20, 20, 20, 20, 22, 22, 22, 22, 24, 24, 24, 24, 26, 26, 26, 26, 28, 28, 28, 28,
        30, 30, 30, 30};
    return _mm512_multishift_epi64_epi8(_mm512_loadu_si512(off0), _mm512_set1_epi32((int)tw));
}

V512 void tile_grid512(const int bits, const int G, const struct grid_args *a, int t, int m) {
    const int Gc = G < 32 ? 32 : G, Kp = a->Kp, ng = Kp / G, nb = Kp / Gc, su8 = a->su8;
    const size_t bb = (size_t)bits * 2 * Gc;
    int8_t tab[64];
    for (int i = 0; i < 64; i++) /* index t << bits | code, repeated over the bits above */
        tab[i] = (int8_t)(a->lev[((i >> bits) & 3) * (1 << bits) + (i & ((1 << bits) - 1))] + GRID_OFF);
    const __m512i table = _mm512_loadu_si512(tab);
    int8_t tab1[64], tab2[64]; /* 2-bit steps 1 and 2: index code << 2 | t and code << 4 | t (bits 2-3 free) */
    for (int i = 0; i < 64; i++) {
        tab1[i] = (int8_t)(a->lev[(i & 3) * 4 + ((i >> 2) & 3)] + GRID_OFF);
        tab2[i] = (int8_t)(a->lev[(i & 3) * 4 + ((i >> 4) & 3)] + GRID_OFF);
    }
    const __m512i table1 = _mm512_loadu_si512(tab1), table2 = _mm512_loadu_si512(tab2);
    const __m512i m12 = _mm512_set1_epi8(0x0C), m48 = _mm512_set1_epi8(0x30);
    float ft[16];
    for (int i = 0; i < 16; i++) ft[i] = a->fac[i >> 2]; /* dword bits 2-3: the 2-bit grid index */
    const __m512 ftab = _mm512_loadu_ps(ft);
    const __m512i m3 = _mm512_set1_epi8(3), m7 = _mm512_set1_epi8(7);
    const int8_t *xq = a->xq + (size_t)m * Kp;
    const int32_t *xsum = a->xsum + (size_t)m * ng;
    const float *xs = a->xs + (size_t)m * nb; /* activation groups of GA = Gc */
    const uint8_t *codes = a->codes + (size_t)t * nb * bb;
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int b = 0; b < nb; b++) {
        const uint8_t *blk = codes + (size_t)b * bb;
        _mm_prefetch((const char *)(blk + 1024), _MM_HINT_T0);
        if (bb > 64) _mm_prefetch((const char *)(blk + 1024 + 64), _MM_HINT_T0);
        __m512 inner = _mm512_setzero_ps();
#pragma GCC unroll 8
        for (int gi = 0; gi < Gc / G; gi++) {
            const int g = b * (Gc / G) + gi;
            const __m512i tb = grid_types512(bits, a->types[(size_t)t * ng + g]);
            const __m512i tb0 = bits == 2 ? grid_types512_low(a->types[(size_t)t * ng + g]) : tb;
            __m512i di[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(),
                             _mm512_setzero_si512()};
#pragma GCC unroll 32
            for (int kk = gi * G; kk < gi * G + G; kk += 4) {
                const int v = kk / 16, s = (kk % 16) / 4;
                __m512i w = _mm512_loadu_si512(blk + v * 64);
                if (s && (bits == 3 || s == 3)) w = _mm512_srli_epi16(w, 2 * s);
                __m512i idx, tabs = table;
                if (bits == 2 && s == 1) {
                    idx = _mm512_ternarylogic_epi32(w, tb0, m12, 0xE4); /* (w & 0x0C) | (tb0 & ~0x0C) */
                    tabs = table1;
                } else if (bits == 2 && s == 2) {
                    idx = _mm512_ternarylogic_epi32(w, tb0, m48, 0xE4); /* (w & 0x30) | (tb0 & ~0x30) */
                    tabs = table2;
                } else if (bits == 3) {
                    __m512i hv = _mm512_loadu_si512(blk + Gc / 16 * 64 + (v / 2) * 64);
                    const int q = 4 * (v % 2) + s; /* bit q of the high-plane byte -> bit 2 */
                    __m512i h = _mm512_gf2p8affine_epi64_epi8(hv, _mm512_set1_epi64((long long)((1ULL << q) << 40)), 0);
                    __m512i x = _mm512_ternarylogic_epi32(tb, h, m7, 0xDC); /* (tb & ~7) | h */
                    idx = _mm512_ternarylogic_epi32(w, x, m3, 0xE4);       /* (w & 3) | (x & ~3) */
                } else {
                    idx = _mm512_ternarylogic_epi32(w, tb, m3, 0xE4); /* (w & 3) | (tb & ~3) */
                }
                __m512i lv = _mm512_permutexvar_epi8(idx, tabs);
                __m512i xb = _mm512_set1_epi32(*(const int32_t *)(xq + b * Gc + kk));
                DPBUSD(di[(kk / 4) & 3], lv, xb); /* four independent chains (vpdpbusd latency) */
            }
            __m512i d = _mm512_add_epi32(_mm512_add_epi32(di[0], di[1]), _mm512_add_epi32(di[2], di[3]));
            d = _mm512_sub_epi32(d, _mm512_set1_epi32(GRID_OFF * xsum[g]));
            size_t si = ((size_t)t * ng + g) * TILE;
            __m512 p = su8 ? _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(
                                 _mm_loadu_si128((const __m128i *)((const uint8_t *)a->scales + si))))
                           : _mm512_loadu_ps((const float *)a->scales + si);
            if (bits == 2) p = _mm512_mul_ps(p, _mm512_permutexvar_ps(tb, ftab)); /* 3-bit factors are all 1 */
            inner = gi ? _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), p, inner) : _mm512_mul_ps(_mm512_cvtepi32_ps(d), p);
        }
        acc[b & 3] = _mm512_fmadd_ps(inner, _mm512_set1_ps(xs[b]), acc[b & 3]); /* four float chains by block */
    }
    int rows = a->N - t * TILE < TILE ? a->N - t * TILE : TILE;
    __m512 sum = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
    __m512 y = _mm512_mul_ps(sum, _mm512_loadu_ps(a->step + t * TILE));
    _mm512_mask_storeu_ps(a->y + (size_t)m * a->N + t * TILE, (__mmask16)((1u << rows) - 1), y);
}

#define GRID_CASE(B, GG) if (bits == B && G == GG) { tile_grid512(B, GG, a, t, m); return; }
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,gfni"))) static void tile_grid_fast(
    const struct grid_args *a, int t, int m) {
    const int bits = a->bits, G = a->G;
    GRID_CASE(2, 8) GRID_CASE(2, 16) GRID_CASE(2, 32) GRID_CASE(2, 64) GRID_CASE(2, 128)
    GRID_CASE(3, 8) GRID_CASE(3, 16) GRID_CASE(3, 32) GRID_CASE(3, 64) GRID_CASE(3, 128)
    tile_grid_generic(a, t, m);
}

static void grid_tiles(void *p, int chunk) {
    const struct grid_args *a = (const struct grid_args *)p;
    int fast = grid_fast();
    for (int t = chunk * a->per; t < (chunk + 1) * a->per && t < a->nt; t++)
        for (int m = 0; m < a->M; m++) fast ? tile_grid_fast(a, t, m) : tile_grid_generic(a, t, m);
}

/* Force the generic path (tests): 0 generic, 1 fast where the CPU has it; returns the path in use. */
int lowbit_grid_set_fast(int on) {
    g_grid_fast = -1;
    int best = grid_fast();
    g_grid_fast = on && best;
    return grid_fast();
}

#define GRID_CHUNK (128 << 10)
/* y[M, N] = x[M, K] @ W (grid form).  Workspace: M*Kp + 4*M*Kp/GA + 8*M*Kp/G + 64 bytes.  0, or -1 on
 * bad arguments (bits 2/3, G in 8..128 a power of two, Kp a multiple of max(G, 32)). */
int lowbit_grid_linear(int bits, int M, int K, int Kp, int N, int G, const float *x, const uint8_t *codes,
                       const uint32_t *types, const void *scales, int scales_u8, const float *step, const int8_t *lev,
                       const float *fac, float *y, void *workspace) {
    int GA = G < 32 ? 32 : G;
    if ((bits != 2 && bits != 3) || G < 8 || G > 128 || (G & (G - 1)) || Kp % GA || K > Kp || M <= 0 || N <= 0)
        return -1;
    int ng = Kp / G, nga = Kp / GA;
    int8_t *xq = (int8_t *)workspace;
    float *xs = (float *)(xq + (((size_t)M * Kp + 63) & ~(size_t)63));
    int32_t *xsa = (int32_t *)(xs + (size_t)M * nga);
    int32_t *xsum = xsa + (size_t)M * nga;
    lowbit_quantize_act(M, K, Kp, GA, x, xq, xs, xsa);
    for (int m = 0; m < M; m++)
        for (int g = 0; g < ng; g++) {
            int32_t s = 0;
            for (int k = g * G; k < g * G + G; k++) s += xq[(size_t)m * Kp + k];
            xsum[(size_t)m * ng + g] = s;
        }
    int nt = (N + TILE - 1) / TILE, th = lowbit_num_threads();
    size_t tile_bytes = (size_t)TILE * Kp * bits / 8 + (size_t)ng * 20;
    int per = (int)(GRID_CHUNK / tile_bytes), most = nt / (4 * th);
    per = per > most ? most : per;
    per = per < 1 ? 1 : per;
    struct grid_args a = {bits, M, Kp, N, G, GA, per, nt, scales_u8 != 0, codes, types, scales, step, fac, xs, lev, xq,
                          xsum, y};
    lowbit_pool_run(grid_tiles, &a, (nt + per - 1) / per, th);
    return 0;
}
