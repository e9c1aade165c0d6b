/* GEMV microbenchmark of lowbit's CPU kernels (lowbit_linear, one row): K = 2048, N given, formats
 * 8-bit g2048, 4-bit g128, 3-bit g128, 2-bit g32, 2-bit g128 on random codes.  Best of REPS passes over
 * copies of the weights totalling TOTAL_BYTES (past the caches: memory-bound; 1: one copy, in L2 for
 * N = 512: the kernels' compute cost).  Build against the kernels' library (python -c "from
 * lowbit.backends.kernels import cpu; print(cpu.build())"):
 *     gcc -O2 -o gemv benchmarks/kernels_gemv.c LIB.so -Wl,-rpath,$(dirname LIB.so)
 *     ./gemv THREADS TOTAL_BYTES REPS N        # e.g. ./gemv 1 1 3000 512;  ./gemv 2 6e8 4 5632 */
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
int lowbit_linear(int bits, int M, int K, int Kp, int N, int G, const float *x, const uint8_t *codes,
                  const float *scales, const uint8_t *zeros, float *y, void *workspace);
void lowbit_set_threads(int);
uint64_t lowbit_stream_read(const uint64_t *p, size_t n, int reps);
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }
static uint64_t st = 88172645463325252ULL;
static uint64_t xr(void) { st ^= st << 13; st ^= st >> 7; st ^= st << 17; return st; }
int main(int argc, char **argv) {
    int th = atoi(argv[1]); size_t total = (size_t)atof(argv[2]); int reps = atoi(argv[3]), K = 2048, N = atoi(argv[4]);
    lowbit_set_threads(th);
    if (total > (64u << 20)) {
        size_t n = (size_t)1 << 27; uint64_t *a = aligned_alloc(64, n * 8); memset(a, 1, n * 8);
        lowbit_stream_read(a, n, 1); double best = 1e9;
        for (int r = 0; r < 5; r++) { double t = now(); lowbit_stream_read(a, n, 1); t = now() - t; if (t < best) best = t; }
        printf("threads %d read %.1f GB/s\n", th, n * 8 / best / 1e9); free(a);
    }
    int fm[][2] = {{8, 2048}, {4, 128}, {3, 128}, {2, 32}, {2, 128}};
    double t4 = 0;
    for (int f = 0; f < 5; f++) {
        int bits = fm[f][0], G = fm[f][1], nt = (N + 15) / 16, ng = K / G;
        size_t cb = (size_t)nt * ng * 16 * G * bits / 8, sb = (size_t)nt * ng * 16, one = cb + 5 * sb;
        int copies = total / one; if (copies < 1) copies = 1;
        uint8_t *c = aligned_alloc(64, (cb * copies + 63) / 64 * 64); float *s = aligned_alloc(64, sb * 4 * copies);
        uint8_t *z = aligned_alloc(64, (sb * copies + 63) / 64 * 64);
        for (size_t j = 0; j < cb * copies / 8; j++) ((uint64_t *)c)[j] = xr();
        for (size_t j = 0; j < sb * copies; j++) { s[j] = 0.001f; z[j] = xr() & ((1 << bits) - 1); }
        float *x = aligned_alloc(64, K * 4), *y = aligned_alloc(64, N * 4);
        for (int k = 0; k < K; k++) x[k] = (float)((int)(xr() % 200) - 100) / 50.f;
        static char ws[1 << 16];
        double best = 1e9;
        for (int r = 0; r < reps; r++) {
            double t = now();
            for (int i = 0; i < copies; i++) lowbit_linear(bits, 1, K, K, N, G, x, c + cb * i, s + sb * i, z + sb * i, y, ws);
            t = (now() - t) / copies; if (t < best) best = t;
        }
        if (f == 1) t4 = best;
        printf("%d-bit g%-4d: %8.2f us %6.1f GB/s  vs 4-bit %.2f\n", bits, G, best * 1e6, one / best / 1e9, t4 ? best / t4 : 0);
        free(c); free(s); free(z); free(x); free(y);
    }
    return 0;
}
