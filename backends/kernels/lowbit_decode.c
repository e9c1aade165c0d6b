/* lowbit decode-step helpers around the low-bit linears (batch 1, float32): RMSNorm, rotary embedding
 * + KV-cache append + grouped-query attention for one new token, SwiGLU.  Plain C; attention heads (past a
 * cache length) and SwiGLU run on the kernels' threads: at decode these touch kilobytes, the linears megabytes.
 *
 * rmsnorm:  y = x / sqrt(mean(x^2) + eps) * w            (w NULL: 1)
 * rope:     pairs (i, i + d/2) of each head rotated by pos * theta_i (cos/sin given for this position)
 * attend:   out[h] = softmax(q[h] . K[g]^T / sqrt(d)) V[g], g = h / (heads / kv_heads), over positions 0..pos
 * swiglu:   out = silu(gu[:n]) * gu[n:]
 */
#include <math.h>
#include <stddef.h>
#include <stdlib.h>

int lowbit_num_threads(void); /* lowbit_cpu.c: the kernels' thread count */
typedef void (*lowbit_chunk_fn)(void *arg, int chunk);
void lowbit_pool_run(lowbit_chunk_fn fn, void *arg, int n, int threads); /* lowbit_pool.c */

void lowbit_rmsnorm(int n, const float *x, const float *w, float eps, float *y) {
    double ss = 0.0;
    for (int i = 0; i < n; i++) ss += (double)x[i] * x[i];
    float r = (float)(1.0 / sqrt(ss / n + eps));
    for (int i = 0; i < n; i++) y[i] = x[i] * r * (w ? w[i] : 1.0f);
}

static void rope(float *v, int heads, int d, const float *c, const float *s) {
    for (int h = 0; h < heads; h++) {
        float *p = v + (size_t)h * d;
        for (int i = 0; i < d / 2; i++) {
            float a = p[i], b = p[i + d / 2];
            p[i] = a * c[i] - b * s[i];
            p[i + d / 2] = a * s[i] + b * c[i];
        }
    }
}

struct attend_args {
    int heads_per_kv, d, pos, cap;
    const float *q, *kc, *vc;
    float *out;
    float scale;
};

/* One head: out[h] = softmax(q[h] . K[g]^T * scale) V[g] over positions 0..pos. */
static void attend_head(void *p, int h) {
    const struct attend_args *a = (const struct attend_args *)p;
    int d = a->d, pos = a->pos, g = h / a->heads_per_kv;
    float stack[pos < 4096 ? pos + 1 : 1], *sc = pos < 4096 ? stack : malloc(sizeof(float) * (size_t)(pos + 1));
    if (!sc) return;
    const float *qh = a->q + (size_t)h * d;
    float mx = -INFINITY, sum = 0.0f;
    for (int t = 0; t <= pos; t++) {
        const float *kt = a->kc + ((size_t)g * a->cap + t) * d;
        float dot = 0.0f;
        for (int i = 0; i < d; i++) dot += qh[i] * kt[i];
        sc[t] = dot * a->scale;
        mx = sc[t] > mx ? sc[t] : mx;
    }
    for (int t = 0; t <= pos; t++) sum += sc[t] = expf(sc[t] - mx);
    float *oh = a->out + (size_t)h * d;
    for (int i = 0; i < d; i++) oh[i] = 0.0f;
    for (int t = 0; t <= pos; t++) {
        const float *vt = a->vc + ((size_t)g * a->cap + t) * d;
        float w = sc[t] / sum;
        for (int i = 0; i < d; i++) oh[i] += w * vt[i];
    }
    if (sc != stack) free(sc);
}

/* qkv = [q (heads*d) | k (kv*d) | v (kv*d)] of the new token at `pos`; caches [kv, cap, d]. */
void lowbit_rope_attend(int heads, int kv, int d, int pos, int cap, float *qkv, const float *cos_, const float *sin_,
                        float *kc, float *vc, float *out, float *scratch /* pos + 1 floats */) {
    float *q = qkv, *k = qkv + (size_t)heads * d, *v = k + (size_t)kv * d;
    rope(q, heads, d, cos_, sin_);
    rope(k, kv, d, cos_, sin_);
    for (int g = 0; g < kv; g++)
        for (int i = 0; i < d; i++) {
            kc[((size_t)g * cap + pos) * d + i] = k[(size_t)g * d + i];
            vc[((size_t)g * cap + pos) * d + i] = v[(size_t)g * d + i];
        }
    struct attend_args args = {heads / kv, d, pos, cap, q, kc, vc, out, 1.0f / sqrtf((float)d)};
    /* heads on the kernels' threads once the cache is long enough to pay for waking them */
    int th = (size_t)heads * (pos + 1) * d >= 16384 ? lowbit_num_threads() : 1;
    (void)scratch; /* scores live on each chunk's stack */
    lowbit_pool_run(attend_head, &args, heads, th);
}

struct swiglu_args {
    int n;
    const float *gu;
    float *out;
};

#define SWIGLU_CHUNK 1024
static void swiglu_chunk(void *p, int c) {
    const struct swiglu_args *a = (const struct swiglu_args *)p;
    int hi = (c + 1) * SWIGLU_CHUNK < a->n ? (c + 1) * SWIGLU_CHUNK : a->n;
    for (int i = c * SWIGLU_CHUNK; i < hi; i++) a->out[i] = a->gu[i] / (1.0f + expf(-a->gu[i])) * a->gu[a->n + i];
}

void lowbit_swiglu(int n, const float *gu, float *out) {
    struct swiglu_args a = {n, gu, out};
    lowbit_pool_run(swiglu_chunk, &a, (n + SWIGLU_CHUNK - 1) / SWIGLU_CHUNK, n >= 4096 ? lowbit_num_threads() : 1);
}

void lowbit_add(int n, float *x, const float *y) {
    for (int i = 0; i < n; i++) x[i] += y[i];
}
