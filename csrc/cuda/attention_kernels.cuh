// Launch API of the block-sparse attention CUDA kernels (semantics: docs/attention.md).
// Torch-free like the other *_kernels.cuh: the .cu files include only CUDA headers; the torch
// side lives in attention_fwd_cuda.cpp / attention_bwd_cuda.cpp (host compiler).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace lrkernels {
namespace cuda {

enum class AttnDType { kFloat16, kBFloat16 };

// One CSR-like block list: per (batch or 1, head or 1, row block) a count and left-packed
// column-block indices. Tensors contiguous: counts (Bl, Hl, n_row_blocks), indices
// (Bl, Hl, n_row_blocks, max_blocks). A broadcast dimension has stride 0:
//   count  = counts [b * batch_stride + h * head_stride + blk]
//   idx[i] = indices[(b * batch_stride + h * head_stride + blk) * max_blocks + i]
// `full_*` (may be null: no full blocks) use the same strides with their own max.
// h is the QUERY head (layouts are per query head, or broadcast).
struct BlockList {
  const int32_t* counts;
  const int32_t* indices;
  const int32_t* full_counts;   // nullptr: none
  const int32_t* full_indices;  // nullptr: none
  int64_t batch_stride;         // 0 when Bl == 1, else Hl * n_row_blocks
  int64_t head_stride;          // 0 when Hl == 1, else n_row_blocks
  int64_t n_row_blocks;
  int64_t max_blocks;
  int64_t max_full_blocks;
};

// Strides in elements; the head_dim stride is 1.
struct AttnStrides {
  int64_t batch;
  int64_t head;
  int64_t seq;
};

struct AttnShape {
  int64_t B, Hq, Hkv, Sq, Sk, D;
  int64_t block_q, block_k;           // layout block sizes: 64 or 128 each
  int64_t window_left, window_right;  // -1: unbounded; applied on partial blocks only
  float scale;
  AttnDType dtype;
};

// out (B, Hq, Sq, D) contiguous in dtype; lse (B, Hq, Sq) float32 contiguous.
struct AttnFwdArgs {
  AttnShape shape;
  const void* q;
  const void* k;
  const void* v;
  AttnStrides q_strides, k_strides, v_strides;
  BlockList kv;  // per query block: key blocks
  void* out;
  float* lse;
};

// Head dims the CUDA kernels take (others: a clear error from the launcher).
inline bool attention_head_dim_supported(int64_t d) {
  return d == 32 || d == 64 || d == 96 || d == 128;
}

cudaError_t launch_block_sparse_attention_fwd(const AttnFwdArgs& args, cudaStream_t stream);

// dout, out: (B, Hq, Sq, D) contiguous; lse (B, Hq, Sq) float32; dq (B, Hq, Sq, D), dk/dv
// (B, Hkv, Sk, D) contiguous outputs in dtype (16-byte aligned, like q / k / v's rows).
// workspace: attention_bwd_workspace_bytes(shape) bytes, 256-byte aligned, any contents (the
// launch initialises what it needs); it must not be reused before the launch's kernels finish.
struct AttnBwdArgs {
  AttnShape shape;
  const void* q;
  const void* k;
  const void* v;
  AttnStrides q_strides, k_strides, v_strides;
  const void* out;
  const void* dout;
  const float* lse;
  BlockList kv;        // per query block: key blocks (partial, full)
  BlockList q_blocks;  // per key block: query blocks, the transpose of kv (BlockLayout.transposed)
  void* workspace;
  void* dq;
  void* dk;
  void* dv;
};

// Bytes of workspace the backward needs for `shape` (0 when there is nothing to compute).
size_t attention_bwd_workspace_bytes(const AttnShape& shape);

cudaError_t launch_block_sparse_attention_bwd(const AttnBwdArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace lrkernels
