// VAE normalization + SiLU on (B, C, T, H, W) feature maps, contiguous or channels_last_3d.
//
// Elements are addressed as (b, c, s) with s = t*H*W + h*W + w: contiguous puts s fastest
// (b*C*S + c*S + s), channels_last_3d puts c fastest (b*C*S + s*C + c).
//   group_norm_silu: 1) per (b, group, chunk) Welford partials (count, mean, M2); 2) per (b, group)
//   the chunks merged in order (Chan's formula) into mean and 1/std; 3) elementwise apply. Reads x
//   twice and writes y once (the 3·N·s floor of KERNELS.md §4 when a group does not fit on chip).
//   channel_rms_norm_silu: one thread per (b, s) position loops over the C channels twice (sum of
//   squares, then apply); the second read hits L1/L2.
// Scalar accesses (no 16-byte vectors yet): these kernels are correct in both layouts first.
#pragma once

#include "common.cuh"

SF_KERNELS_BEGIN

struct VaeNormArgs {
  int64_t batch = 0, channels = 0, spatial = 0;  // B, C, S = T*H*W
  int groups = 1;
  bool channels_last = false;
  bool silu = true;
  float eps = 1e-6f;
  float sqrt_c = 1.f;  // channel RMS norm: sqrt(C)
  const void* x = nullptr;
  void* y = nullptr;
  const void* weight = nullptr;  // (C,) or null
  const void* bias = nullptr;    // (C,) or null
  float* partial = nullptr;      // group norm: (B*G, nchunks, 3) count, mean, M2
  float* stats = nullptr;        // group norm: (B*G, 2) mean, rstd
  int64_t chunk = 1;             // group elements per stats block
  int nchunks = 1;
};

SF_DEVICE int64_t vae_offset(const VaeNormArgs& a, int64_t b, int64_t c, int64_t s) {
  return a.channels_last ? (b * a.spatial + s) * a.channels + c : (b * a.channels + c) * a.spatial + s;
}

// Chan et al.: merge (nb, mb, m2b) into (n, m, m2).
SF_DEVICE void welford_merge(float& n, float& m, float& m2, float nb, float mb, float m2b) {
  if (nb == 0.f) return;
  const float nn = n + nb;
  const float delta = mb - m;
  m += delta * (nb / nn);
  m2 += m2b + delta * delta * (n * nb / nn);
  n = nn;
}

// grid (nchunks, B*G), blockDim.x <= 1024 threads.
template <typename Tx>
__global__ void __launch_bounds__(1024) group_norm_stats_kernel(const VaeNormArgs a) {
  __shared__ float sh_n[1024], sh_m[1024], sh_m2[1024];
  const int64_t bg = blockIdx.y;
  const int64_t b = bg / a.groups, g = bg % a.groups;
  const int64_t cg = a.channels / a.groups;
  const int64_t m_total = cg * a.spatial;
  const int64_t i0 = blockIdx.x * a.chunk;
  const int64_t i1 = i0 + a.chunk < m_total ? i0 + a.chunk : m_total;
  const Tx* x = static_cast<const Tx*>(a.x);
  float n = 0.f, mean = 0.f, m2 = 0.f;
  for (int64_t i = i0 + threadIdx.x; i < i1; i += blockDim.x) {
    const int64_t c = g * cg + (a.channels_last ? i % cg : i / a.spatial);
    const int64_t s = a.channels_last ? i / cg : i % a.spatial;
    const float v = to_float(x[vae_offset(a, b, c, s)]);
    n += 1.f;
    const float delta = v - mean;
    mean += delta / n;
    m2 += delta * (v - mean);
  }
  sh_n[threadIdx.x] = n;
  sh_m[threadIdx.x] = mean;
  sh_m2[threadIdx.x] = m2;
  __syncthreads();
  if (threadIdx.x == 0) {
    float tn = 0.f, tm = 0.f, tm2 = 0.f;
    for (unsigned t = 0; t < blockDim.x; ++t) welford_merge(tn, tm, tm2, sh_n[t], sh_m[t], sh_m2[t]);
    float* p = a.partial + (bg * a.nchunks + blockIdx.x) * 3;
    p[0] = tn;
    p[1] = tm;
    p[2] = tm2;
  }
}

// grid ceil(B*G / blockDim.x): one thread per (b, group) merges its chunks in order.
__global__ void __launch_bounds__(256) group_norm_finalize_kernel(const VaeNormArgs a) {
  const int64_t bg = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (bg >= a.batch * a.groups) return;
  float n = 0.f, mean = 0.f, m2 = 0.f;
  for (int k = 0; k < a.nchunks; ++k) {
    const float* p = a.partial + (bg * a.nchunks + k) * 3;
    welford_merge(n, mean, m2, p[0], p[1], p[2]);
  }
  a.stats[bg * 2] = mean;
  a.stats[bg * 2 + 1] = rsqrtf(m2 / n + a.eps);
}

// Elementwise, grid-stride over memory order.
template <typename Tx, typename Tp>
__global__ void __launch_bounds__(256) group_norm_apply_kernel(const VaeNormArgs a) {
  const int64_t total = a.batch * a.channels * a.spatial;
  const int64_t cg = a.channels / a.groups;
  const Tx* x = static_cast<const Tx*>(a.x);
  Tx* y = static_cast<Tx*>(a.y);
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = idx / (a.channels * a.spatial);
    const int64_t c = a.channels_last ? idx % a.channels : (idx / a.spatial) % a.channels;
    const float* st = a.stats + (b * a.groups + c / cg) * 2;
    float v = (to_float(x[idx]) - st[0]) * st[1];
    if (a.weight) v = v * to_float(static_cast<const Tp*>(a.weight)[c]);
    if (a.bias) v = v + to_float(static_cast<const Tp*>(a.bias)[c]);
    if (a.silu) v = v * (1.f / (1.f + expf(-v)));
    y[idx] = from_float<Tx>(v);
  }
}

// grid ceil(B*S / blockDim.x): one thread per (b, s) position.
template <typename Tx, typename Tp>
__global__ void __launch_bounds__(256) channel_rms_norm_kernel(const VaeNormArgs a) {
  const int64_t pos = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (pos >= a.batch * a.spatial) return;
  const int64_t b = pos / a.spatial, s = pos % a.spatial;
  const Tx* x = static_cast<const Tx*>(a.x);
  Tx* y = static_cast<Tx*>(a.y);
  float sq = 0.f;
  for (int64_t c = 0; c < a.channels; ++c) {
    const float v = to_float(x[vae_offset(a, b, c, s)]);
    sq += v * v;
  }
  const float nrm = fmaxf(sqrtf(sq), a.eps);  // F.normalize: x / max(||x||, eps)
  for (int64_t c = 0; c < a.channels; ++c) {
    const int64_t off = vae_offset(a, b, c, s);
    float v = to_float(x[off]) / nrm * a.sqrt_c * to_float(static_cast<const Tp*>(a.weight)[c]);
    if (a.bias) v = v + to_float(static_cast<const Tp*>(a.bias)[c]);
    if (a.silu) v = v * (1.f / (1.f + expf(-v)));
    y[off] = from_float<Tx>(v);
  }
}

SF_KERNELS_END
