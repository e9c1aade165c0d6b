// Runs lowbit's CUDA kernel sources (backends/cuda/*.cu) on the CPU, for parity tests without a GPU.
// One CUDA block = one forked process (so __shared__ statics are per block), one CUDA thread = one
// std::thread; global memory is one MAP_SHARED mapping; warp shuffles and barriers are std::barriers.
// Only what lowbit's kernels use is here.  Slow by design: tiny shapes only.
#pragma once
#define LOWBIT_CPU_EMU 1
#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <sched.h>
#include <vector_types.h>
#include <vector_functions.h>
#include <cuda_fp16.h>

#undef __global__
#undef __device__
#undef __forceinline__
#undef __launch_bounds__
#undef __shared__
#undef __align__
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

struct EmuDim { unsigned x = 0, y = 0, z = 0; };
inline thread_local EmuDim threadIdx;
inline EmuDim blockIdx, gridDim, blockDim;  // per process = per block

inline std::barrier<>* emu_block_bar = nullptr;
inline std::barrier<>* emu_warp_bar[64];
inline uint64_t emu_shfl[64][32];

inline void __syncthreads() { emu_block_bar->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu_warp_bar[threadIdx.x / 32]->arrive_and_wait(); }
template <class T>
inline T emu_shfl_from(T v, int src) {
  const int w = threadIdx.x / 32, l = threadIdx.x % 32;
  static_assert(sizeof(T) <= 8, "shuffle of a wide type");
  std::memcpy(&emu_shfl[w][l], &v, sizeof(T));
  emu_warp_bar[w]->arrive_and_wait();
  T r;
  std::memcpy(&r, &emu_shfl[w][src & 31], sizeof(T));
  emu_warp_bar[w]->arrive_and_wait();
  return r;
}
template <class T> inline T __shfl_xor_sync(unsigned, T v, int o) { return emu_shfl_from(v, (threadIdx.x % 32) ^ o); }
template <class T> inline T __shfl_sync(unsigned, T v, int src) { return emu_shfl_from(v, src); }

template <class T> inline T __ldg(const T* p) { return *p; }
template <class T> inline T __ldcg(const T* p) {
  std::atomic_thread_fence(std::memory_order_acquire);
  return *reinterpret_cast<const volatile T*>(p);
}
inline float4 __ldcg(const float4* p) {
  std::atomic_thread_fence(std::memory_order_acquire);
  return *p;
}
inline uint4 __ldcg(const uint4* p) {
  std::atomic_thread_fence(std::memory_order_acquire);
  return *p;
}
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline unsigned atomicExch(unsigned* p, unsigned v) { return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); }
inline int __dp4a(int a, int b, int c) {
  for (int i = 0; i < 4; ++i) c += (int)(int8_t)(a >> (8 * i)) * (int)(int8_t)(b >> (8 * i));
  return c;
}
inline int __float2int_rn(float f) { return (int)std::nearbyintf(f); }
inline float __expf(float f) { return std::exp(f); }
inline float rsqrtf(float f) { return 1.f / std::sqrt(f); }
using std::max;
using std::min;

inline __half2 __hfma2(__half2 a, __half2 b, __half2 c) {  // products of halves are exact in float
  const float2 fa = __half22float2(a), fb = __half22float2(b), fc = __half22float2(c);
  return __floats2half2_rn(std::fma(fa.x, fb.x, fc.x), std::fma(fa.y, fb.y, fc.y));
}
inline uint4 q8_ld_stream(const uint4* p) { return *p; }
inline uint4 ld_stream(const uint4* p) { return *p; }
inline uint2 ld_stream2(const uint2* p) { return *p; }
inline float atomicAdd(float* p, float v) {  // a CAS loop on the float's bits
  uint32_t old = __atomic_load_n(reinterpret_cast<uint32_t*>(p), __ATOMIC_SEQ_CST), nw;
  float f;
  do {
    std::memcpy(&f, &old, 4);
    f += v;
    std::memcpy(&nw, &f, 4);
  } while (!__atomic_compare_exchange_n(reinterpret_cast<uint32_t*>(p), &old, nw, false, __ATOMIC_SEQ_CST,
                                        __ATOMIC_SEQ_CST));
  std::memcpy(&f, &old, 4);
  return f;
}
inline uint2 q8_ld_stream2(const uint2* p) { return *p; }
inline unsigned ld_acquire(const unsigned* p) {
  sched_yield();
  return __atomic_load_n(p, __ATOMIC_ACQUIRE);
}
inline void prefetch_l2(const char*) {}
#define STEP_SPIN_LIMIT 0xffffffffu
