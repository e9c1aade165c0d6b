// lowbit's low-bit GEMV with int8 activations (dp4a) for CUDA sm_90 — "q8" kernels.
//
// y[n] = sum_k x[k] * (q[n,k] - z[n,g]) * s[n,g], g = k / gs, with x quantized once per 32 values
// (xq int8 = rint(x * 127 / max|x|), xd = (max|x| / 127, sum of the 32 xq)), so one 32-code block is
//   s * d * (sum_k xq[k] * q[k]  -  z * sum_k xq[k])   -- the inner sum is integer dp4a work.
// Weights in the q8 layout of backends/cuda/layout.py (same codes, same bits, reordered at load so that
// one mask yields 4 codes in the 4 bytes of a word, in the order of 4 consecutive xq bytes):
//   A [N, K/CPS] uint4   4-bit: word j of a step, byte b: low nibble = code 8j+b, high = code 8j+4+b
//                        2-bit (and the low 2 bits of 3-bit): word j, byte b, bits 2p.. = code 16j+4p+b
//   H [N, K/64] uint2    3-bit only: word i, byte b, bit p = high bit of code 32i+4p+b
// So a 32-code block costs per 4 codes: one shift + one mask (+ shift/mask/or of the high bit) + dp4a,
// instead of a shift, mask, half subtract and half FMA per 2 codes (gemv.cu).
#pragma once
#include <cuda_fp16.h>
#include <stdint.h>

template <int BITS> struct Q8Fmt { static constexpr int CPS = 64; };  // codes per lane step (16 B of A)
template <> struct Q8Fmt<4> { static constexpr int CPS = 32; };

#ifndef LOWBIT_CPU_EMU  // tests/cuda_emu.h runs these sources on the CPU and supplies plain loads instead
__device__ __forceinline__ uint4 q8_ld_stream(const uint4* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}
__device__ __forceinline__ uint2 q8_ld_stream2(const uint2* p) {
  uint2 v;
  asm volatile("ld.global.nc.L1::no_allocate.v2.u32 {%0,%1}, [%2];" : "=r"(v.x), "=r"(v.y) : "l"(p));
  return v;
}
#endif

// Integer dot of the 32-code block sb of one step (words w, high-bit words h) with 8 xq words.
template <int BITS>
__device__ __forceinline__ int q8_block_dot(const uint4& wv, const uint2& hv, int sb, const int* xw) {
  const uint32_t w[4] = {wv.x, wv.y, wv.z, wv.w};
  int acc = 0;
  if (BITS == 4) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      acc = __dp4a((int)(w[j] & 0x0F0F0F0Fu), xw[2 * j], acc);
      acc = __dp4a((int)((w[j] >> 4) & 0x0F0F0F0Fu), xw[2 * j + 1], acc);
    }
  } else {
    const uint32_t hb = (BITS == 3) ? (sb ? hv.y : hv.x) : 0u;
#pragma unroll
    for (int jj = 0; jj < 2; ++jj) {
      const uint32_t ww = w[2 * sb + jj];
#pragma unroll
      for (int p = 0; p < 4; ++p) {
        uint32_t c = (ww >> (2 * p)) & 0x03030303u;
        if (BITS == 3) {
          const int sh = 4 * jj + p;  // bit plane of the high bits
          c |= (sh >= 2 ? (hb >> (sh - 2)) : (hb << (2 - sh))) & 0x04040404u;
        }
        acc = __dp4a((int)c, xw[4 * jj + p], acc);
      }
    }
  }
  return acc;
}

// part[r] += dot of rows rows[r] over steps [s_begin, s_end) (lane-strided); xq/xd from global
// (XG: through the read-only cache) or shared memory.
template <int BITS, int R, int U, bool XG>
__device__ __forceinline__ void q8_rows(const uint4* __restrict__ A, const uint2* __restrict__ H,
                                        const float* __restrict__ S, const uint8_t* __restrict__ Z, const int* rows,
                                        int steps, int G, int gs, int s_begin, int s_end, const int4* xq,
                                        const float2* xd, float* part) {
  constexpr int CPS = Q8Fmt<BITS>::CPS;
  constexpr int SUB = CPS / 32;
  const int lane = threadIdx.x & 31;
  for (int s0 = s_begin + lane; s0 < s_end; s0 += 32 * U) {
    uint4 w[U][R];
    uint2 h[U][R];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int s = min(s0 + 32 * u, s_end - 1);
#pragma unroll
      for (int r = 0; r < R; ++r) {
        w[u][r] = q8_ld_stream(A + (size_t)rows[r] * steps + s);
        if (BITS == 3) h[u][r] = q8_ld_stream2(H + (size_t)rows[r] * steps + s);
        else h[u][r] = make_uint2(0u, 0u);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int s = s0 + 32 * u;
      if (s >= s_end) break;
#pragma unroll
      for (int sb = 0; sb < SUB; ++sb) {
        const int kb = s * SUB + sb;  // 32-code block index
        int4 x0, x1;
        float2 dd;
        if (XG) { x0 = __ldg(xq + 2 * kb); x1 = __ldg(xq + 2 * kb + 1); dd = __ldg(xd + kb); }
        else { x0 = xq[2 * kb]; x1 = xq[2 * kb + 1]; dd = xd[kb]; }
        const int xw[8] = {x0.x, x0.y, x0.z, x0.w, x1.x, x1.y, x1.z, x1.w};
        const int g = (kb * 32) / gs;
#pragma unroll
        for (int r = 0; r < R; ++r) {
          const int dot = q8_block_dot<BITS>(w[u][r], h[u][r], sb, xw);
          const float sc = __ldg(S + (size_t)rows[r] * G + g);
          const float zf = (float)__ldg(Z + (size_t)rows[r] * G + g);
          part[r] = fmaf(sc * dd.x, fmaf(-zf, dd.y, (float)dot), part[r]);
        }
      }
    }
  }
}

template <int R>
__device__ __forceinline__ void q8_warp_sum(float* part) {
#pragma unroll
  for (int r = 0; r < R; ++r) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) part[r] += __shfl_xor_sync(0xffffffffu, part[r], o);
  }
}

// Standalone GEMV: a warp owns R consecutive rows, blockIdx.y splits the steps (atomicAdd into y).
template <int BITS, int R, int U, bool SPLIT>
__device__ __forceinline__ void q8_gemv(const uint4* A, const uint2* H, const float* S, const uint8_t* Z,
                                        const int4* xq, const float2* xd, float* y, int N, int K, int G, int gs,
                                        int sps) {
  const int warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  const int row0 = warp * R;
  if (row0 >= N) return;
  const int steps = K / Q8Fmt<BITS>::CPS;
  const int s_begin = blockIdx.y * sps;
  const int s_end = min(steps, s_begin + sps);
  int rows[R];
  float part[R];
#pragma unroll
  for (int r = 0; r < R; ++r) { rows[r] = min(row0 + r, N - 1); part[r] = 0.f; }
  q8_rows<BITS, R, U, true>(A, H, S, Z, rows, steps, G, gs, s_begin, s_end, xq, xd, part);
  q8_warp_sum<R>(part);
  if ((threadIdx.x & 31) == 0) {
#pragma unroll
    for (int r = 0; r < R; ++r)
      if (row0 + r < N) { if (SPLIT) atomicAdd(y + row0 + r, part[r]); else y[row0 + r] = part[r]; }
  }
}

// xq/xd of fp16 x[K] (K a multiple of 32): 4 lanes a 32-value block, 8 values a lane.
extern "C" __global__ void q8_quantize_x(const __half* __restrict__ x, int8_t* __restrict__ xq,
                                         float2* __restrict__ xd, int K) {
  const int base = (blockIdx.x * blockDim.x + threadIdx.x) * 8;
  const bool ok = base < K;
  float v[8];
  uint4 raw = ok ? *reinterpret_cast<const uint4*>(x + base) : make_uint4(0, 0, 0, 0);
  const __half2* hp = reinterpret_cast<const __half2*>(&raw);
  float amax = 0.f;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __half22float2(hp[i]);
    v[2 * i] = f.x; v[2 * i + 1] = f.y;
    amax = fmaxf(amax, fmaxf(fabsf(f.x), fabsf(f.y)));
  }
  amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 1));
  amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 2));
  const float inv = amax > 0.f ? 127.f / amax : 0.f;
  int sum = 0;
  uint32_t packed[2] = {0u, 0u};
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int q = __float2int_rn(v[i] * inv);
    sum += q;
    packed[i >> 2] |= ((uint32_t)(q & 0xff)) << (8 * (i & 3));
  }
  sum += __shfl_xor_sync(0xffffffffu, sum, 1);
  sum += __shfl_xor_sync(0xffffffffu, sum, 2);
  if (ok) {
    *reinterpret_cast<uint2*>(xq + base) = make_uint2(packed[0], packed[1]);
    if ((threadIdx.x & 3) == 0) xd[base / 32] = make_float2(amax / 127.f, (float)sum);
  }
}

#define Q8_GEMV_KERNEL(NAME, BITS, R, U, SPLIT, THREADS)                                                         \
  extern "C" __global__ void __launch_bounds__(THREADS)                                                          \
      NAME(const uint4* A, const uint2* H, const float* S, const uint8_t* Z, const int4* xq, const float2* xd,   \
           float* y, int N, int K, int G, int gs, int sps) {                                                      \
    q8_gemv<BITS, R, U, SPLIT>(A, H, S, Z, xq, xd, y, N, K, G, gs, sps);                                        \
  }
