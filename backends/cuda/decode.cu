// The small kernels of one Llama decode step on the GPU (batch 1, fp16 activations between kernels,
// fp32 residual stream).  The linears are gemv.cu's kernels, accumulating into the residual.
#include <cuda_fp16.h>
#include <stdint.h>

// out[i] = x[i] / rms(x) * w[i] (fp16), x fp32 [n]; one block of 256 threads.
extern "C" __global__ void rmsnorm_f16(const float* __restrict__ x, const float* __restrict__ w,
                                       __half* __restrict__ out, int n, float eps) {
  __shared__ float red[32];
  float ss = 0.f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) ss += x[i] * x[i];
  for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = ss;
  __syncthreads();
  if (threadIdx.x < 32) {
    float v = threadIdx.x < (blockDim.x >> 5) ? red[threadIdx.x] : 0.f;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (threadIdx.x == 0) red[0] = rsqrtf(v / n + eps);
  }
  __syncthreads();
  const float r = red[0];
  for (int i = threadIdx.x; i < n; i += blockDim.x) out[i] = __float2half(x[i] * r * w[i]);
}

// out[i] = silu(gu[i]) * gu[hidden + i] (fp16)
extern "C" __global__ void silu_mul_f16(const float* __restrict__ gu, __half* __restrict__ out, int hidden) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < hidden) {
    const float g = gu[i];
    out[i] = __float2half(g / (1.f + __expf(-g)) * gu[hidden + i]);
  }
}

// x[i] = emb[token[0] * dim + i] (fp32 residual from fp16 embeddings)
extern "C" __global__ void embed_f32(const __half* __restrict__ emb, const int* __restrict__ token,
                                     float* __restrict__ x, int dim) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < dim) x[i] = __half2float(emb[(size_t)token[0] * dim + i]);
}

// One warp per query head (head_dim 64: lane owns the pair 2*lane, 2*lane+1).  qkv fp32 =
// [q (heads*64) | k (kv_heads*64) | v (kv_heads*64)] of the new token at position pos[0]; RoPE
// (interleaved pairs, theta) on q and k; the new k/v are written to the fp16 caches [kv_heads, max_ctx, 64]
// by the first query head of each group and used from registers by every head; out fp16 [heads*64].
extern "C" __global__ void rope_attention(const float* __restrict__ qkv, __half* __restrict__ kc,
                                          __half* __restrict__ vc, __half* __restrict__ out,
                                          const int* __restrict__ pos_p, int heads, int kv_heads, int max_ctx,
                                          float theta) {
  const int h = blockIdx.x, lane = threadIdx.x, kvh = h / (heads / kv_heads);
  const int pos = pos_p[0];
  const float inv = powf(theta, -2.f * lane / 64.f);
  float sn, cs;
  sincosf(pos * inv, &sn, &cs);
  const float* q = qkv + h * 64;
  const float* k = qkv + heads * 64 + kvh * 64;
  const float* v = qkv + (heads + kv_heads) * 64 + kvh * 64;
  const float q0 = q[2 * lane] * cs - q[2 * lane + 1] * sn, q1 = q[2 * lane] * sn + q[2 * lane + 1] * cs;
  const float k0 = k[2 * lane] * cs - k[2 * lane + 1] * sn, k1 = k[2 * lane] * sn + k[2 * lane + 1] * cs;
  const float v0 = v[2 * lane], v1 = v[2 * lane + 1];
  __half2* kcache = reinterpret_cast<__half2*>(kc + (size_t)kvh * max_ctx * 64);
  __half2* vcache = reinterpret_cast<__half2*>(vc + (size_t)kvh * max_ctx * 64);
  if (h % (heads / kv_heads) == 0) {
    kcache[pos * 32 + lane] = __floats2half2_rn(k0, k1);
    vcache[pos * 32 + lane] = __floats2half2_rn(v0, v1);
  }
  const float scale = rsqrtf(64.f);
  float m = -1e30f, l = 0.f, a0 = 0.f, a1 = 0.f;  // online softmax
  for (int t = 0; t <= pos; ++t) {
    float2 kk, vv;
    if (t == pos) { kk = make_float2(k0, k1); vv = make_float2(v0, v1); }
    else { kk = __half22float2(kcache[t * 32 + lane]); vv = __half22float2(vcache[t * 32 + lane]); }
    float s = q0 * kk.x + q1 * kk.y;
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    s *= scale;
    const float mn = fmaxf(m, s), c = __expf(m - mn), p = __expf(s - mn);
    l = l * c + p;
    a0 = a0 * c + p * vv.x;
    a1 = a1 * c + p * vv.y;
    m = mn;
  }
  reinterpret_cast<__half2*>(out + h * 64)[lane] = __floats2half2_rn(a0 / l, a1 / l);
}
