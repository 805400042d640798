// adaLN family: LayerNorm/RMSNorm + modulation, optionally after a gated residual add; forward,
// backward, and the second pass of the deterministic parameter-gradient reduction.
//
// One block per row (forward) or per chunk of rows (backward). Each thread keeps kAdaLNElems fp32
// values of the row in registers, in chunks of V elements read and written with 16-byte accesses
// (V = 16 / sizeof(x element)) when the launcher found every row 16-byte aligned, else V = 1.
// x is read once and every output written once (docs/kernels.md §4 byte floors).
#pragma once

#include "adaln_params.h"
#include "common.cuh"

SF_KERNELS_BEGIN

constexpr int kAdaLNElems = 16;  // fp32 values of a row per thread: blockDim.x = d / 16 (rounded up to 32s)

// x (or x_new = round(x + gate * branch)) of this thread's chunks into xv; branch into br. Returns
// the thread's partial sum of the row.
template <int IT, int V, typename Tx, typename Tp>
SF_DEVICE float adaln_load_row(const AdaLNArgs& a, int64_t row, int64_t trow, float (&xv)[IT][V],
                               float (&br)[IT][V], bool store_x_new) {
  const int d = a.d;
  const Tx* x = static_cast<const Tx*>(a.x) + row * a.x_stride;
  float sum = 0.f;
SF_UNROLL
  for (int it = 0; it < IT; ++it) {
    const int col = (threadIdx.x + it * blockDim.x) * V;
SF_UNROLL
    for (int i = 0; i < V; ++i) xv[it][i] = br[it][i] = 0.f;
    if (col < d) {
      load_chunk<V>(x, col, d, xv[it]);
      if (a.gated) {
        float g[V];
        load_chunk<V>(static_cast<const Tx*>(a.branch) + row * a.branch_stride, col, d, br[it]);
        load_chunk<V>(static_cast<const Tp*>(a.gate) + trow * a.gate_stride, col, d, g);
        // x_new is rounded to x's dtype before the norm sees it, as the reference does.
SF_UNROLL
        for (int i = 0; i < V; ++i) xv[it][i] = round_to<Tx>(xv[it][i] + g[i] * br[it][i]);
        if (store_x_new) store_chunk<V>(static_cast<Tx*>(a.x_new) + row * a.x_new_stride, col, d, xv[it]);
      }
SF_UNROLL
      for (int i = 0; i < V; ++i) sum += xv[it][i];
    }
  }
  return sum;
}

// mean (0 for RMSNorm) and 1/sqrt(var + eps) of the row; two passes over registers.
template <int IT, int V>
SF_DEVICE void adaln_stats(const AdaLNArgs& a, const float (&xv)[IT][V], float sum, float& mean, float& rstd) {
  const int d = a.d;
  mean = 0.f;
  if (!a.rms) mean = block_sum(sum) / d;
  float sq = 0.f;
SF_UNROLL
  for (int it = 0; it < IT; ++it) {
    const int col = (threadIdx.x + it * blockDim.x) * V;
SF_UNROLL
    for (int i = 0; i < V; ++i) {
      const float c = xv[it][i] - mean;
      if (col + i < d) sq += c * c;
    }
  }
  rstd = rsqrtf(block_sum(sq) / d + a.eps);
}

template <int V, typename Tx, typename Tp>
__global__ void __launch_bounds__(1024) adaln_fwd_kernel(const AdaLNArgs a) {
  constexpr int IT = kAdaLNElems / V;
  const int64_t row = blockIdx.x;
  const int d = a.d;
  const int64_t trow = a.seq_ids ? a.seq_ids[row] : row;
  float xv[IT][V], br[IT][V];
  const float sum = adaln_load_row<IT, V, Tx, Tp>(a, row, trow, xv, br, true);
  float mean, rstd;
  adaln_stats<IT, V>(a, xv, sum, mean, rstd);
  const Tp* shift = static_cast<const Tp*>(a.shift) + trow * a.shift_stride;
  const Tp* scale = static_cast<const Tp*>(a.scale) + trow * a.scale_stride;
  Tx* y = static_cast<Tx*>(a.y) + row * a.y_stride;
SF_UNROLL
  for (int it = 0; it < IT; ++it) {
    const int col = (threadIdx.x + it * blockDim.x) * V;
    if (col < d) {
      float sh[V], sc[V], w[V], b[V], out[V];
      load_chunk<V>(shift, col, d, sh);
      load_chunk<V>(scale, col, d, sc);
      if (a.weight) load_chunk<V>(static_cast<const Tp*>(a.weight), col, d, w);
      if (a.bias) load_chunk<V>(static_cast<const Tp*>(a.bias), col, d, b);
SF_UNROLL
      for (int i = 0; i < V; ++i) {
        float v = (xv[it][i] - mean) * rstd;
        if (a.weight) v = v * w[i];
        if (a.bias) v = v + b[i];
        out[i] = v * (1.f + sc[i]) + sh[i];
      }
      store_chunk<V>(y, col, d, out);
    }
  }
}

// Writes this thread's columns of the shared-memory accumulators to the segment's partial and
// zeroes them. Each thread only touches its own columns, so no barrier is needed.
template <int IT, int V>
SF_DEVICE void adaln_flush(float* acc, float* partial, int64_t seg, int nslots, int d, bool to_global) {
SF_UNROLL
  for (int it = 0; it < IT; ++it) {
    const int col = (threadIdx.x + it * blockDim.x) * V;
    for (int s = 0; s < nslots; ++s)
SF_UNROLL
      for (int i = 0; i < V; ++i)
        if (col + i < d) {
          if (to_global) partial[(seg * nslots + s) * d + col + i] = acc[s * d + col + i];
          acc[s * d + col + i] = 0.f;
        }
  }
}

// At most 512 threads (d <= 512 * kAdaLNElems = 8192): three register arrays per thread (x, branch,
// dxhat) need more than the 64 registers a 1024-thread block allows; at 512 there are 128.
template <int V, typename Tx, typename Tp>
__global__ void __launch_bounds__(512) adaln_bwd_kernel(const AdaLNArgs a) {
  constexpr int IT = kAdaLNElems / V;
  SF_DYNAMIC_SMEM(float, acc);  // [nslots][d] fp32 parameter-gradient accumulators of this block
  const int d = a.d;
  const bool per_seq = a.seq_ids != nullptr;
  int nslots = 0;
  const int s_shift = per_seq ? nslots++ : -1;
  const int s_scale = per_seq ? nslots++ : -1;
  const int s_gate = per_seq && a.gated ? nslots++ : -1;
  const int s_w = a.weight ? nslots++ : -1;
  const int s_b = a.bias ? nslots++ : -1;
  adaln_flush<IT, V>(acc, a.partial, 0, nslots, d, false);  // zero: shared memory starts as garbage

  const int64_t p0 = blockIdx.x * a.rows_per_block;
  const int64_t p1 = p0 + a.rows_per_block < a.n_rows ? p0 + a.rows_per_block : a.n_rows;
  int64_t seg = nslots ? a.block_seg0[blockIdx.x] : 0;
  int cur = 0;
  for (int64_t pos = p0; pos < p1; ++pos) {
    const int64_t row = a.perm ? a.perm[pos] : pos;
    const int sid = per_seq ? a.seq_ids[row] : 0;
    if (pos > p0 && sid != cur) {
      adaln_flush<IT, V>(acc, a.partial, seg, nslots, d, true);
      ++seg;
    }
    cur = sid;
    const int64_t trow = per_seq ? sid : row;

    float xv[IT][V], br[IT][V], dh[IT][V];
    const float sum = adaln_load_row<IT, V, Tx, Tp>(a, row, trow, xv, br, false);
    float mean, rstd;
    adaln_stats<IT, V>(a, xv, sum, mean, rstd);

    const Tx* dy = static_cast<const Tx*>(a.dy) + row * a.dy_stride;
    const Tp* scale = static_cast<const Tp*>(a.scale) + trow * a.scale_stride;
    float s1 = 0.f, s2 = 0.f;
SF_UNROLL
    for (int it = 0; it < IT; ++it) {
      const int col = (threadIdx.x + it * blockDim.x) * V;
SF_UNROLL
      for (int i = 0; i < V; ++i) dh[it][i] = 0.f;
      if (col < d) {
        float g[V], sc[V], w[V], b[V], u[V], gs[V];
        load_chunk<V>(dy, col, d, g);
        load_chunk<V>(scale, col, d, sc);
        if (a.weight) load_chunk<V>(static_cast<const Tp*>(a.weight), col, d, w);
        if (a.bias) load_chunk<V>(static_cast<const Tp*>(a.bias), col, d, b);
SF_UNROLL
        for (int i = 0; i < V; ++i) {
          const float xh = (xv[it][i] - mean) * rstd;
          u[i] = a.weight ? xh * w[i] : xh;
          if (a.bias) u[i] += b[i];
          gs[i] = g[i] * u[i];
          const float du = g[i] * (1.f + sc[i]);
          dh[it][i] = a.weight ? du * w[i] : du;
          s1 += dh[it][i];
          s2 += dh[it][i] * xh;
          if (col + i < d) {
            if (s_shift >= 0) acc[s_shift * d + col + i] += g[i];
            if (s_scale >= 0) acc[s_scale * d + col + i] += gs[i];
            if (s_w >= 0) acc[s_w * d + col + i] += du * xh;
            if (s_b >= 0) acc[s_b * d + col + i] += du;
          }
        }
        if (!per_seq) {
          store_chunk<V>(static_cast<Tp*>(a.dshift) + row * a.dshift_stride, col, d, g);
          store_chunk<V>(static_cast<Tp*>(a.dscale) + row * a.dscale_stride, col, d, gs);
        }
      }
    }
    block_sum2(s1, s2);
    const float m1 = a.rms ? 0.f : s1 / d, m2 = s2 / d;
SF_UNROLL
    for (int it = 0; it < IT; ++it) {
      const int col = (threadIdx.x + it * blockDim.x) * V;
      if (col < d) {
        float dxv[V], din[V];
        if (a.dx_new) load_chunk<V>(static_cast<const Tx*>(a.dx_new) + row * a.dx_new_stride, col, d, din);
SF_UNROLL
        for (int i = 0; i < V; ++i) {
          const float xh = (xv[it][i] - mean) * rstd;
          dxv[i] = rstd * (dh[it][i] - m1 - xh * m2);
          if (a.dx_new) dxv[i] += din[i];
        }
        store_chunk<V>(static_cast<Tx*>(a.dx) + row * a.dx_stride, col, d, dxv);
        if (a.gated) {
          // branch again rather than kept in registers since pass 1 (a 4th register array spills):
          // the block read this row a moment ago, so it comes from L1/L2, not HBM.
          float g[V], bv[V], db[V], dg[V];
          load_chunk<V>(static_cast<const Tp*>(a.gate) + trow * a.gate_stride, col, d, g);
          load_chunk<V>(static_cast<const Tx*>(a.branch) + row * a.branch_stride, col, d, bv);
SF_UNROLL
          for (int i = 0; i < V; ++i) {
            db[i] = dxv[i] * g[i];
            dg[i] = dxv[i] * bv[i];
            if (s_gate >= 0 && col + i < d) acc[s_gate * d + col + i] += dg[i];
          }
          store_chunk<V>(static_cast<Tx*>(a.dbranch) + row * a.dbranch_stride, col, d, db);
          if (!per_seq) store_chunk<V>(static_cast<Tp*>(a.dgate) + row * a.dgate_stride, col, d, dg);
        }
      }
    }
  }
  if (p1 > p0 && nslots > 0) adaln_flush<IT, V>(acc, a.partial, seg, nslots, d, true);
}

// Second pass of the parameter gradients: grid (ceil(d / blockDim.x), num_table_rows + 1). Row o <
// num_table_rows sums sequence o's segments into dshift/dscale/dgate; the last row sums all
// segments into dweight/dbias. Fixed order: bitwise reproducible.
__global__ void __launch_bounds__(256) adaln_param_reduce_kernel(const ParamReduceArgs r) {
  const int col = blockIdx.x * blockDim.x + threadIdx.x;
  if (col >= r.d) return;
  const int o = blockIdx.y;
  const bool table = o < r.num_table_rows;
  const int lo = table ? r.seq_seg_ptr[o] : 0;
  const int hi = table ? r.seq_seg_ptr[o + 1] : r.num_segments;
  SF_UNROLL  // static indices into r.out / r.slot: no local-memory copy of the argument struct
  for (int k = 0; k < 5; ++k) {
    const int s = r.slot[k];
    if ((k < 3) != table || s < 0) continue;
    float total = 0.f;
    for (int seg = lo; seg < hi; ++seg) total += r.partial[(static_cast<int64_t>(seg) * r.nslots + s) * r.d + col];
    r.out[k][static_cast<int64_t>(table ? o : 0) * r.d + col] = total;
  }
}

SF_KERNELS_END
