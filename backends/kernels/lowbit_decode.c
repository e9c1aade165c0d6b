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
#ifdef _OPENMP
#include <omp.h>
#endif

int lowbit_num_threads(void); /* lowbit_cpu.c: the kernels' thread count */

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
    float scale = 1.0f / sqrtf((float)d);
    int heads_per_kv = heads / kv;
    /* heads on the kernels' threads once the cache is long enough to pay for the fork (scratch: one row
     * of pos + 1 scores per head, the caller's for one thread) */
#pragma omp parallel num_threads(lowbit_num_threads()) if ((size_t)heads * (pos + 1) * d >= 16384)
    {
        float *sc = scratch;
#ifdef _OPENMP
        if (omp_get_num_threads() > 1) sc = malloc(sizeof(float) * (size_t)(pos + 1));
#endif
#pragma omp for schedule(static)
        for (int h = 0; h < heads; h++) {
            int g = h / heads_per_kv;
            const float *qh = q + (size_t)h * d;
            float mx = -INFINITY, sum = 0.0f;
            for (int t = 0; t <= pos; t++) {
                const float *kt = kc + ((size_t)g * cap + t) * d;
                float dot = 0.0f;
                for (int i = 0; i < d; i++) dot += qh[i] * kt[i];
                sc[t] = dot * scale;
                mx = sc[t] > mx ? sc[t] : mx;
            }
            for (int t = 0; t <= pos; t++) sum += sc[t] = expf(sc[t] - mx);
            float *oh = out + (size_t)h * d;
            for (int i = 0; i < d; i++) oh[i] = 0.0f;
            for (int t = 0; t <= pos; t++) {
                const float *vt = vc + ((size_t)g * cap + t) * d;
                float p = sc[t] / sum;
                for (int i = 0; i < d; i++) oh[i] += p * vt[i];
            }
        }
        if (sc != scratch) free(sc);
    }
}


void lowbit_swiglu(int n, const float *gu, float *out) {
#pragma omp parallel for schedule(static) num_threads(lowbit_num_threads()) if (n >= 4096)
    for (int i = 0; i < n; i++) out[i] = gu[i] / (1.0f + expf(-gu[i])) * gu[n + i];
}

void lowbit_add(int n, float *x, const float *y) {
    for (int i = 0; i < n; i++) x[i] += y[i];
}
