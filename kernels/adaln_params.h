// Arguments of the adaLN kernels (kernels/adaln.cuh): plain C++, shared with the host launchers.
#pragma once

#include <stdint.h>

namespace sora_fast::kernels {

// Rows of x are `d` contiguous elements, `*_stride` elements apart. Tables (shift/scale/gate and
// their gradients) have row seq_ids[row] when seq_ids is set, else row `row` (per-token tables).
struct AdaLNArgs {
  int64_t n_rows = 0;
  int d = 0;
  float eps = 1e-6f;
  bool rms = false;    // RMSNorm (else LayerNorm)
  bool gated = false;  // gated_residual_adaln: x_new = x + gate * branch first
  const void* x = nullptr;
  int64_t x_stride = 0;
  const void* branch = nullptr;
  int64_t branch_stride = 0;
  const void* gate = nullptr;
  int64_t gate_stride = 0;
  const void* shift = nullptr;
  int64_t shift_stride = 0;
  const void* scale = nullptr;
  int64_t scale_stride = 0;
  const int32_t* seq_ids = nullptr;
  const void* weight = nullptr;  // (d,) or null
  const void* bias = nullptr;    // (d,) or null
  // forward outputs
  void* y = nullptr;
  int64_t y_stride = 0;
  void* x_new = nullptr;
  int64_t x_new_stride = 0;
  // backward inputs / outputs
  const void* dy = nullptr;
  int64_t dy_stride = 0;
  const void* dx_new = nullptr;  // incoming gradient of x_new (gated), may be null
  int64_t dx_new_stride = 0;
  void* dx = nullptr;
  int64_t dx_stride = 0;
  void* dbranch = nullptr;
  int64_t dbranch_stride = 0;
  // per-token table gradients (seq_ids null), written row by row
  void* dshift = nullptr;
  int64_t dshift_stride = 0;
  void* dscale = nullptr;
  int64_t dscale_stride = 0;
  void* dgate = nullptr;
  int64_t dgate_stride = 0;
  // deterministic reduction of the parameter gradients: block b handles the (sorted) positions
  // [b * rows_per_block, ...), row perm[pos] (or pos), and writes one partial per segment (run of
  // equal seq_ids inside its rows) to partial[(segment * nslots + slot) * d + col]; its first
  // segment is block_seg0[b].
  const int32_t* perm = nullptr;
  const int32_t* block_seg0 = nullptr;
  int64_t rows_per_block = 1;
  float* partial = nullptr;
};

// Second pass: out_slot[o, col] = sum over the segments of output row o, in segment order.
struct ParamReduceArgs {
  int d = 0;
  int nslots = 0;
  int num_table_rows = 0;            // B (per-sequence table gradients), or 0
  int num_segments = 0;              // all segments (for weight and bias)
  const int32_t* seq_seg_ptr = nullptr;  // (B + 1,) segment ranges of each sequence
  const float* partial = nullptr;
  float* out[5] = {nullptr, nullptr, nullptr, nullptr, nullptr};  // dshift, dscale, dgate, dweight, dbias (fp32, (rows, d))
  int slot[5] = {-1, -1, -1, -1, -1};                              // their slots in partial, -1 if absent
};

}  // namespace sora_fast::kernels
