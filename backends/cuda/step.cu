// One whole Llama decode step (batch 1) in ONE persistent kernel: lowbit's fused GPU decoder.
//
// The grid is one 512-thread block per multiprocessor (all resident); phases are separated by a
// grid-wide barrier (a counter in global memory).  Per layer, 4 phases:
//   A  RMSNorm(x)·n1 → int8 (in each block's shared memory)  → QKV GEMV → qkv
//   B  RoPE + attention over the fp16 KV cache (each block recomputes all heads in shared memory; block 0
//      appends the new k, v to the cache) → int8 → O GEMV, added to the residual x in its epilogue
//   C  RMSNorm(x)·n2 → int8 → gate/up GEMV (rows interleaved gate, up) → SiLU(gate)·up in the epilogue → act
//   D  act → int8 → down GEMV, added to x
// then RMSNorm → LM head.  Weights never depend on activations, so each phase first asks L2 to prefetch
// this block's slice of the NEXT phase's weights (prefetch.global.L2): the DRAM stream runs on across
// the barriers.  Linears use q8.cu's int8-activation dot (dp4a) over the q8 layout (layout.py).
// Cross-block data (x, qkv, act, KV cache) is read with ld.global.cg (L2), never through L1.
#include "q8.cu"

struct Lin {  // one linear in the q8 layout; K is padded to the step
  const uint4* A;
  const uint2* H;
  const float* S;
  const uint8_t* Z;
  int N, K, G, gs;
};
struct Layer {
  Lin qkv, o, gu, down;
  const float* n1;
  const float* n2;
  __half* kc;  // [kv_heads, max_ctx, 64]
  __half* vc;
};

#ifndef STEP_THREADS
#define STEP_THREADS 512
#endif
#define STEP_WARPS (STEP_THREADS / 32)
#define STEP_MAXK 8192   // longest GEMV input (dim, hidden)
#define STEP_MAXQ 4096   // heads * 64
#define STEP_MAXKV 1024  // kv_heads * 64
#include "step_attention.cu"

#ifndef LOWBIT_CPU_EMU
__device__ __forceinline__ unsigned ld_acquire(const unsigned* p) {
  unsigned v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void prefetch_l2(const char* p) { asm volatile("prefetch.global.L2 [%0];" ::"l"(p)); }
#endif
#ifndef STEP_SPIN_LIMIT
#define STEP_SPIN_LIMIT (1u << 20)
#endif

// Grid-wide barrier; bar[0] counts arrivals (zeroed before the launch), bar[1] flags a timeout.
__device__ __forceinline__ void grid_sync(unsigned* bar, unsigned& target) {
  __syncthreads();
  if (threadIdx.x == 0) {
    target += gridDim.x;
    __threadfence();
    atomicAdd(bar, 1u);
    unsigned spins = 0;  // a grid that is not all resident would wait forever: give up (and flag) after ~1 s
    while (ld_acquire(bar) < target) {
      if ((++spins & 255u) == 0 && (spins > STEP_SPIN_LIMIT || ld_acquire(bar + 1) != 0)) {
        atomicExch(bar + 1, 1u);
        break;
      }
    }
    __threadfence();
  }
  __syncthreads();
}

__device__ __forceinline__ void prefetch_range(const void* base, size_t begin, size_t end) {
  const char* p = reinterpret_cast<const char*>(base);
  for (size_t off = begin + (size_t)threadIdx.x * 128; off < end; off += (size_t)STEP_THREADS * 128)
    prefetch_l2(p + off);
}

template <int BITS>
__device__ __forceinline__ void prefetch_rows(const Lin& L, int r0, int r1, int flags) {
  if (!(flags & 1)) return;  // flags bit 0: prefetch the next phase's weights into L2
  const size_t steps = L.K / Q8Fmt<BITS>::CPS;
  prefetch_range(L.A, r0 * steps * 16, r1 * steps * 16);
  if (BITS == 3) prefetch_range(L.H, r0 * steps * 8, r1 * steps * 8);
  prefetch_range(L.S, (size_t)r0 * L.G * 4, (size_t)r1 * L.G * 4);
  prefetch_range(L.Z, (size_t)r0 * L.G, (size_t)r1 * L.G);
}

// This block's rows of an N-row linear (PAIRS: whole (gate, up) pairs).
template <bool PAIRS>
__device__ __forceinline__ void block_rows(int N, int& r0, int& r1) {
  const int units = PAIRS ? N / 2 : N;
  const int u0 = (int)((long long)units * blockIdx.x / gridDim.x);
  const int u1 = (int)((long long)units * (blockIdx.x + 1) / gridDim.x);
  r0 = PAIRS ? 2 * u0 : u0;
  r1 = PAIRS ? 2 * u1 : u1;
}

// xq/xd (shared) ← int8 of v[K] (· rms(v)⁻¹ · nw where nw is given).  SRC_SMEM: v in shared memory.
template <bool SRC_SMEM>
__device__ void stage_x(const float* v, int K, const float* __restrict__ nw, float eps, int8_t* xq, float2* xd,
                        float* red) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  float r = 1.f;
  if (nw != nullptr) {
    float ss = 0.f;
    for (int i = tid; i < K; i += STEP_THREADS) {
      const float a = SRC_SMEM ? v[i] : __ldcg(v + i);
      ss = fmaf(a, a, ss);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
    if (lane == 0) red[warp] = ss;
    __syncthreads();
    float t = 0.f;
#pragma unroll
    for (int i = 0; i < STEP_WARPS; ++i) t += red[i];
    r = rsqrtf(t / K + eps);
  }
  for (int wb = warp * 256; wb < K; wb += STEP_THREADS * 8) {  // warp-uniform bound: shuffles below
    const int base = wb + lane * 8;
    const bool ok = base < K;
    float a[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) a[i] = 0.f;
    if (ok) {
      float4 p0, p1;
      if (SRC_SMEM) { p0 = *reinterpret_cast<const float4*>(v + base); p1 = *reinterpret_cast<const float4*>(v + base + 4); }
      else { p0 = __ldcg(reinterpret_cast<const float4*>(v + base)); p1 = __ldcg(reinterpret_cast<const float4*>(v + base + 4)); }
      a[0] = p0.x; a[1] = p0.y; a[2] = p0.z; a[3] = p0.w; a[4] = p1.x; a[5] = p1.y; a[6] = p1.z; a[7] = p1.w;
      if (nw != nullptr) {
#pragma unroll
        for (int i = 0; i < 8; ++i) a[i] *= r * __ldg(nw + base + i);
      }
    }
    float amax = 0.f;
#pragma unroll
    for (int i = 0; i < 8; ++i) amax = fmaxf(amax, fabsf(a[i]));
    amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 1));
    amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 2));
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    int sum = 0;
    uint32_t pk[2] = {0u, 0u};
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int q = __float2int_rn(a[i] * inv);
      sum += q;
      pk[i >> 2] |= ((uint32_t)(q & 0xff)) << (8 * (i & 3));
    }
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    if (ok) {
      *reinterpret_cast<uint2*>(xq + base) = make_uint2(pk[0], pk[1]);
      if ((lane & 3) == 0) xd[base / 32] = make_float2(amax / 127.f, (float)sum);
    }
  }
  __syncthreads();
}

// This block's rows of L: MODE 0 out[n] = y; 1 out[n] += y (residual); 2 out[n/2] = silu(y_n)·y_{n+1}.
template <int BITS, int MODE>
__device__ void block_gemv(const Lin& L, const int8_t* xq, const float2* xd, float* out) {
  int rb, re;
  block_rows<MODE == 2>(L.N, rb, re);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int steps = L.K / Q8Fmt<BITS>::CPS;
  for (int r0 = rb + 2 * warp; r0 < re; r0 += 2 * STEP_WARPS) {
    int rows[2] = {r0, min(r0 + 1, re - 1)};
    float part[2] = {0.f, 0.f};
    q8_rows<BITS, 2, 4, false>(L.A, L.H, L.S, L.Z, rows, steps, L.G, L.gs, 0, steps,
                               reinterpret_cast<const int4*>(xq), xd, part);
    q8_warp_sum<2>(part);
    if (lane == 0) {
      if (MODE == 2) {
        const float g = part[0];
        out[r0 >> 1] = g / (1.f + __expf(-g)) * part[1];
      } else {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          if (r0 + r < re) {
            if (MODE == 1) out[r0 + r] = __ldcg(out + r0 + r) + part[r];
            else out[r0 + r] = part[r];
          }
        }
      }
    }
  }
}

template <int BITS>
__device__ void decode_step(const Layer* __restrict__ layers, const Lin* __restrict__ head,
                            const float* __restrict__ nf, const __half* __restrict__ emb, const int* token,
                            const int* pos_p, float* x, float* qkv, float* act, float* logits, unsigned* bar,
                            int nlayers, int dim, int heads, int kvh, int max_ctx, float eps, float theta,
                            int flags) {
  __shared__ __align__(16) int8_t xq[STEP_MAXK];
  __shared__ float2 xd[STEP_MAXK / 32];
  __shared__ __align__(16) float att[STEP_MAXQ];
  __shared__ float sk[STEP_MAXKV], sv[STEP_MAXKV];
  __shared__ float red[STEP_WARPS];
  unsigned target = 0;
  const int pos = pos_p[0], tok = token[0];
  int r0, r1;
  {  // embed: x ← emb[token] (this block's slice)
    block_rows<false>(layers[0].qkv.N, r0, r1);
    prefetch_rows<BITS>(layers[0].qkv, r0, r1, flags);
    block_rows<false>(dim, r0, r1);
    for (int i = r0 + threadIdx.x; i < r1; i += STEP_THREADS) x[i] = __half2float(emb[(size_t)tok * dim + i]);
    grid_sync(bar, target);
  }
  for (int l = 0; l < nlayers; ++l) {
    const Layer& Ly = layers[l];
    block_rows<false>(Ly.o.N, r0, r1);  // A
    prefetch_rows<BITS>(Ly.o, r0, r1, flags);
    stage_x<false>(x, dim, Ly.n1, eps, xq, xd, red);
    block_gemv<BITS, 0>(Ly.qkv, xq, xd, qkv);
    grid_sync(bar, target);
    block_rows<true>(Ly.gu.N, r0, r1);  // B
    prefetch_rows<BITS>(Ly.gu, r0, r1, flags);
    block_attention(qkv, Ly.kc, Ly.vc, pos, heads, kvh, max_ctx, theta, att, sk, sv);
    stage_x<true>(att, heads * 64, nullptr, eps, xq, xd, red);
    block_gemv<BITS, 1>(Ly.o, xq, xd, x);
    grid_sync(bar, target);
    block_rows<false>(Ly.down.N, r0, r1);  // C
    prefetch_rows<BITS>(Ly.down, r0, r1, flags);
    stage_x<false>(x, dim, Ly.n2, eps, xq, xd, red);
    block_gemv<BITS, 2>(Ly.gu, xq, xd, act);
    grid_sync(bar, target);
    const Lin& nxt = (l + 1 < nlayers) ? layers[l + 1].qkv : *head;  // D
    block_rows<false>(nxt.N, r0, r1);
    prefetch_rows<BITS>(nxt, r0, r1, flags);
    stage_x<false>(act, Ly.gu.N / 2, nullptr, eps, xq, xd, red);
    block_gemv<BITS, 1>(Ly.down, xq, xd, x);
    grid_sync(bar, target);
  }
  stage_x<false>(x, dim, nf, eps, xq, xd, red);
  block_gemv<BITS, 0>(*head, xq, xd, logits);
}

#define STEP_KERNEL(NAME, BITS)                                                                               \
  extern "C" __global__ void __launch_bounds__(STEP_THREADS, 1)                                               \
      NAME(const Layer* layers, const Lin* head, const float* nf, const __half* emb, const int* token,         \
           const int* pos, float* x, float* qkv, float* act, float* logits, unsigned* bar, int nlayers, int dim, \
           int heads, int kvh, int max_ctx, float eps, float theta, int flags) {                               \
    decode_step<BITS>(layers, head, nf, emb, token, pos, x, qkv, act, logits, bar, nlayers, dim, heads, kvh,  \
                      max_ctx, eps, theta, flags);                                                            \
  }
STEP_KERNEL(decode_step_b4, 4)
STEP_KERNEL(decode_step_b3, 3)
STEP_KERNEL(decode_step_b2, 2)
