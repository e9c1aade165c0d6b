// RoPE + attention of one decode step for step.cu (included there; see its header).
#pragma once
#include <cuda_fp16.h>
#include <stdint.h>


// RoPE (interleaved pairs) + causal attention of the token at `pos` for every head, into att (shared,
// [heads*64] fp32); block 0 appends the new k, v to the caches.  Warps own heads, lanes own positions.
__device__ void block_attention(const float* qkv, __half* kc, __half* vc, int pos, int heads, int kvh,
                                int max_ctx, float theta, float* att, float* sk, float* sv) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const float inv = powf(theta, -2.f * lane / 64.f);
  float sn, cs;
  sincosf(pos * inv, &sn, &cs);
  for (int h = warp; h < heads + kvh; h += STEP_WARPS) {
    const float a = __ldcg(qkv + h * 64 + 2 * lane), b = __ldcg(qkv + h * 64 + 2 * lane + 1);
    const float r0 = a * cs - b * sn, r1 = a * sn + b * cs;
    if (h < heads) {
      att[h * 64 + 2 * lane] = r0;
      att[h * 64 + 2 * lane + 1] = r1;
    } else {
      const int kk = h - heads;
      const float* vp = qkv + (heads + kvh) * 64 + kk * 64;
      const float va = __ldcg(vp + 2 * lane), vb = __ldcg(vp + 2 * lane + 1);
      sk[kk * 64 + 2 * lane] = r0;
      sk[kk * 64 + 2 * lane + 1] = r1;
      sv[kk * 64 + 2 * lane] = va;
      sv[kk * 64 + 2 * lane + 1] = vb;
      if (blockIdx.x == 0) {
        reinterpret_cast<__half2*>(kc + ((size_t)kk * max_ctx + pos) * 64)[lane] = __floats2half2_rn(r0, r1);
        reinterpret_cast<__half2*>(vc + ((size_t)kk * max_ctx + pos) * 64)[lane] = __floats2half2_rn(va, vb);
      }
    }
  }
  __syncthreads();
  const int grp = heads / kvh;
  const float scale = rsqrtf(64.f);
  for (int h = warp; h < heads; h += STEP_WARPS) {
    const int kk = h / grp;
    const float* q = att + h * 64;
    float m = -INFINITY, l = 0.f, o0 = 0.f, o1 = 0.f;
    for (int c0 = 0; c0 <= pos; c0 += 32) {
      const int t = c0 + lane;
      float s = -INFINITY;
      if (t < pos) {
        const uint4* kr = reinterpret_cast<const uint4*>(kc + ((size_t)kk * max_ctx + t) * 64);
        float acc = 0.f;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          const uint4 kv = __ldcg(kr + j);
          const __half2* k2 = reinterpret_cast<const __half2*>(&kv);
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const float2 f = __half22float2(k2[e]);
            acc = fmaf(q[8 * j + 2 * e], f.x, fmaf(q[8 * j + 2 * e + 1], f.y, acc));
          }
        }
        s = acc * scale;
      } else if (t == pos) {
        float acc = 0.f;
        for (int d = 0; d < 64; ++d) acc = fmaf(q[d], sk[kk * 64 + d], acc);
        s = acc * scale;
      }
      float cmax = s;
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) cmax = fmaxf(cmax, __shfl_xor_sync(0xffffffffu, cmax, o));
      const float mn = fmaxf(m, cmax);
      const float corr = __expf(m - mn);
      const float p = (t <= pos) ? __expf(s - mn) : 0.f;
      float ps = p;
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) ps += __shfl_xor_sync(0xffffffffu, ps, o);
      l = l * corr + ps;
      o0 *= corr;
      o1 *= corr;
      const int cnt = min(32, pos - c0 + 1);
      for (int j0 = 0; j0 < cnt; j0 += 8) {  // 8 cached V loads in flight before their use
        float2 vv[8];
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          const int tj = c0 + j0 + j;
          if (tj < pos) {
            const unsigned raw = __ldcg(reinterpret_cast<const unsigned*>(vc + ((size_t)kk * max_ctx + tj) * 64) + lane);
            vv[j] = __half22float2(*reinterpret_cast<const __half2*>(&raw));
          } else {
            vv[j] = make_float2(sv[kk * 64 + 2 * lane], sv[kk * 64 + 2 * lane + 1]);  // tj == pos (or unused)
          }
        }
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          const float pj = __shfl_sync(0xffffffffu, p, (j0 + j) & 31);  // p = 0 past pos
          o0 = fmaf(pj, vv[j].x, o0);
          o1 = fmaf(pj, vv[j].y, o1);
        }
      }
      m = mn;
    }
    __syncwarp();
    att[h * 64 + 2 * lane] = o0 / l;
    att[h * 64 + 2 * lane + 1] = o1 / l;
  }
  __syncthreads();
}
