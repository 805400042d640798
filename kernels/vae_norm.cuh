// VAE normalization + SiLU on (B, C, T, H, W) feature maps, contiguous or channels_last_3d.
//
// Elements are addressed as (b, c, s) with s = t*H*W + h*W + w: contiguous puts s fastest
// (b*C*S + c*S + s), channels_last_3d puts c fastest (b*C*S + s*C + c).
//
// Main paths use 16-byte accesses: V = 16 / sizeof(x element) consecutive elements per access
// (8 bf16/fp16, 4 fp32). The launcher picks V only when x and y are 16-byte aligned and every
// vector is a run of one contiguous dimension (see launch_impl.inc); else V = 1 (scalar fallback).
//   group_norm_silu: 1) group_norm_stats_kernel: per (b, group, chunk) Welford partials (count,
//   mean, M2), one vector of V elements merged at a time (Chan's formula); 2) per (b, group) the
//   chunks merged in order into mean and 1/std; 3) group_norm_apply_kernel: elementwise, V at a
//   time. Reads x twice and writes y once (the 3·N·s floor of docs/kernels.md §4: a group of a video
//   feature map does not fit on chip). Vector conditions: contiguous S % V == 0 (a vector stays in
//   one channel); channels_last C % V == 0 for apply, C/G % V == 0 for stats (a vector stays in one
//   group's run of channels).
//   channel_rms_norm_silu:
//   - contiguous, S % V == 0 (channel_rms_norm_cf_kernel): a thread owns V consecutive positions
//     and loops over the C channels (stride S) twice: sum of squares, then apply; the second read
//     of the thread's C x 16 bytes hits L1/L2, not HBM, in practice.
//   - channels_last, C <= kRmsWarpElems * 32 (channel_rms_norm_cl_kernel): a warp per position,
//     lanes hold the C contiguous channels in registers (16-byte chunks when C % V == 0): x read
//     once, y written once.
//   - anything else (channel_rms_norm_kernel): a thread per position, scalar, two passes over C.
#pragma once

#include "common.cuh"

SF_KERNELS_BEGIN

constexpr int kRmsWarpElems = 32;  // fp32 channel values per lane in channel_rms_norm_cl_kernel: C <= 1024

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
  int64_t chunk = 1;             // group elements per stats block (a multiple of V when V > 1)
  int nchunks = 1;
};

SF_DEVICE int64_t vae_offset(const VaeNormArgs& a, int64_t b, int64_t c, int64_t s) {
  return a.channels_last ? (b * a.spatial + s) * a.channels + c : (b * a.channels + c) * a.spatial + s;
}

SF_DEVICE float silu_f(float v) { return v * (1.f / (1.f + expf(-v))); }

// Chan et al.: merge (nb, mb, m2b) into (n, m, m2).
SF_DEVICE void welford_merge(float& n, float& m, float& m2, float nb, float mb, float m2b) {
  if (nb == 0.f) return;
  const float nn = n + nb;
  const float delta = mb - m;
  m += delta * (nb / nn);
  m2 += m2b + delta * delta * (n * nb / nn);
  n = nn;
}

// Offset of the group's i-th element (i in [0, C/G * S)) of batch b, group g.
SF_DEVICE int64_t group_elem_offset(const VaeNormArgs& a, int64_t b, int64_t g, int64_t cg, int64_t i) {
  const int64_t c = g * cg + (a.channels_last ? i % cg : i / a.spatial);
  const int64_t s = a.channels_last ? i / cg : i % a.spatial;
  return vae_offset(a, b, c, s);
}

// grid (nchunks, B*G), blockDim.x <= 1024 threads. V > 1: the launcher checked that each aligned
// run of V group elements is contiguous in memory and 16-byte aligned, and that chunk % V == 0.
template <int V, typename Tx>
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
  for (int64_t i = i0 + threadIdx.x * static_cast<int64_t>(V); i < i1; i += static_cast<int64_t>(blockDim.x) * V) {
    if (V > 1 && i + V <= i1) {
      float v[V];
      load_floats<V>(x + group_elem_offset(a, b, g, cg, i), v);
      float sum = 0.f;
SF_UNROLL
      for (int k = 0; k < V; ++k) sum += v[k];
      const float mv = sum / V;
      float q = 0.f;
SF_UNROLL
      for (int k = 0; k < V; ++k) q += (v[k] - mv) * (v[k] - mv);
      welford_merge(n, mean, m2, static_cast<float>(V), mv, q);
    } else {
      const int64_t e = i + V < i1 ? i + V : i1;
      for (int64_t j = i; j < e; ++j) {
        const float v = to_float(x[group_elem_offset(a, b, g, cg, j)]);
        n += 1.f;
        const float delta = v - mean;
        mean += delta / n;
        m2 += delta * (v - mean);
      }
    }
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

// One element of channel c in group g of batch b (stats row b*G + g).
template <typename Tp>
SF_DEVICE float group_norm_apply_one(const VaeNormArgs& a, float x, int64_t b, int g, int c) {
  const float* st = a.stats + (b * a.groups + g) * 2;
  float v = (x - st[0]) * st[1];
  if (a.weight) v = v * to_float(static_cast<const Tp*>(a.weight)[c]);
  if (a.bias) v = v + to_float(static_cast<const Tp*>(a.bias)[c]);
  return a.silu ? silu_f(v) : v;
}

// Elementwise, grid-stride over memory order, V elements at a time. V > 1: the launcher checked
// alignment and that a vector stays in one channel (contiguous: S % V == 0) or one position
// (channels_last: C % V == 0). Channel and group advance incrementally along a channels_last
// vector: no 64-bit division per element (those compile to calls and cost stack spills).
template <int V, typename Tx, typename Tp>
__global__ void __launch_bounds__(256) group_norm_apply_kernel(const VaeNormArgs a) {
  const int64_t total = a.batch * a.channels * a.spatial;
  const int cg = static_cast<int>(a.channels / a.groups);
  const int64_t cs = a.channels * a.spatial;
  const Tx* x = static_cast<const Tx*>(a.x);
  Tx* y = static_cast<Tx*>(a.y);
  for (int64_t idx = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) * V; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x * V) {
    const int64_t b = idx / cs;
    int c = static_cast<int>(a.channels_last ? idx % a.channels : (idx / a.spatial) % a.channels);
    if (V > 1 && idx + V <= total) {
      float v[V];
      load_floats<V>(x + idx, v);
      if (a.channels_last) {
        int g = c / cg, r = c - g * cg;
SF_UNROLL
        for (int k = 0; k < V; ++k) {
          v[k] = group_norm_apply_one<Tp>(a, v[k], b, g, c + k);
          if (++r == cg) {
            r = 0;
            ++g;
          }
        }
      } else {
        const int g = c / cg;
SF_UNROLL
        for (int k = 0; k < V; ++k) v[k] = group_norm_apply_one<Tp>(a, v[k], b, g, c);
      }
      store_floats<V>(y + idx, v);
    } else {
      const int64_t e = idx + V < total ? idx + V : total;
      for (int64_t j = idx; j < e; ++j) {
        const int64_t bj = j / cs;
        const int cj = static_cast<int>(a.channels_last ? j % a.channels : (j / a.spatial) % a.channels);
        y[j] = from_float<Tx>(group_norm_apply_one<Tp>(a, to_float(x[j]), bj, cj / cg, cj));
      }
    }
  }
}

template <typename Tp>
SF_DEVICE float channel_rms_one(const VaeNormArgs& a, float x, float nrm, int64_t c) {
  float v = x / nrm * a.sqrt_c * to_float(static_cast<const Tp*>(a.weight)[c]);
  if (a.bias) v = v + to_float(static_cast<const Tp*>(a.bias)[c]);
  return a.silu ? silu_f(v) : v;
}

// Fallback, any layout: grid ceil(B*S / blockDim.x), one thread per (b, s) position, scalar.
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
    y[off] = from_float<Tx>(channel_rms_one<Tp>(a, to_float(x[off]), nrm, c));
  }
}

// Contiguous layout, S % V == 0, x and y 16-byte aligned: grid ceil(B*S/V / blockDim.x), a thread
// per V consecutive positions of one batch element; 16-byte loads/stores at stride S over C.
template <int V, typename Tx, typename Tp>
__global__ void __launch_bounds__(256) channel_rms_norm_cf_kernel(const VaeNormArgs a) {
  const int64_t nvec = a.spatial / V;
  const int64_t pv = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (pv >= a.batch * nvec) return;
  const int64_t b = pv / nvec, s0 = (pv % nvec) * V;
  const Tx* x = static_cast<const Tx*>(a.x) + b * a.channels * a.spatial + s0;
  Tx* y = static_cast<Tx*>(a.y) + b * a.channels * a.spatial + s0;
  float sq[V];
SF_UNROLL
  for (int k = 0; k < V; ++k) sq[k] = 0.f;
  for (int64_t c = 0; c < a.channels; ++c) {
    float v[V];
    load_floats<V>(x + c * a.spatial, v);
SF_UNROLL
    for (int k = 0; k < V; ++k) sq[k] += v[k] * v[k];
  }
SF_UNROLL
  for (int k = 0; k < V; ++k) sq[k] = fmaxf(sqrtf(sq[k]), a.eps);  // F.normalize: x / max(||x||, eps)
  for (int64_t c = 0; c < a.channels; ++c) {
    float v[V];
    load_floats<V>(x + c * a.spatial, v);
SF_UNROLL
    for (int k = 0; k < V; ++k) v[k] = channel_rms_one<Tp>(a, v[k], sq[k], c);
    store_floats<V>(y + c * a.spatial, v);
  }
}

// channels_last, C <= 32 * kRmsWarpElems: a warp per (b, s) position (blockDim.x a multiple of 32,
// grid ceil(B*S / (blockDim.x/32))). Lane l holds chunks l, l+32, ... of V channels in registers.
// V > 1: the launcher checked C % V == 0 and 16-byte alignment of x, y, weight and bias.
template <int V, typename Tx, typename Tp>
__global__ void __launch_bounds__(256) channel_rms_norm_cl_kernel(const VaeNormArgs a) {
  constexpr int IT = kRmsWarpElems / V;
  const int64_t pos = blockIdx.x * static_cast<int64_t>(blockDim.x / 32) + threadIdx.x / 32;
  if (pos >= a.batch * a.spatial) return;  // the whole warp leaves together: no shuffle is left half-done
  const int lane = threadIdx.x % 32;
  const int c_total = static_cast<int>(a.channels);
  const Tx* x = static_cast<const Tx*>(a.x) + pos * a.channels;
  Tx* y = static_cast<Tx*>(a.y) + pos * a.channels;
  float xv[IT][V];
  float sq = 0.f;
SF_UNROLL
  for (int it = 0; it < IT; ++it) {
    const int col = (lane + it * 32) * V;
    if (col < c_total) {
      load_chunk<V>(x, col, c_total, xv[it]);
SF_UNROLL
      for (int k = 0; k < V; ++k) sq += xv[it][k] * xv[it][k];
    }
  }
  const float nrm = fmaxf(sqrtf(warp_sum(sq)), a.eps);  // F.normalize: x / max(||x||, eps)
SF_UNROLL
  for (int it = 0; it < IT; ++it) {
    const int col = (lane + it * 32) * V;
    if (col < c_total) {
      float w[V], bb[V], out[V];
      load_chunk<V>(static_cast<const Tp*>(a.weight), col, c_total, w);
      if (a.bias) load_chunk<V>(static_cast<const Tp*>(a.bias), col, c_total, bb);
SF_UNROLL
      for (int k = 0; k < V; ++k) {
        float v = xv[it][k] / nrm * a.sqrt_c * w[k];
        if (a.bias) v = v + bb[k];
        out[k] = a.silu ? silu_f(v) : v;
      }
      store_chunk<V>(y, col, c_total, out);
    }
  }
}

SF_KERNELS_END
