// Torch-side helpers of the two attention launchers (attention_fwd_cuda.cpp,
// attention_bwd_cuda.cpp; host compiler only): the kernels' input requirements met by copying
// the rare tensors that miss them, strides and block lists in the form of attention_kernels.cuh.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

#include "attention_kernels.cuh"

namespace lrkernels {
namespace attention_launch {

// Strides in elements; a dimension of size 1 is never stepped over, so its stride is reported as
// 0 (an arbitrary stride there must not cost the 16-byte row alignment the kernels need).
inline cuda::AttnStrides strides_of(const at::Tensor& t) {
  auto st = [&](int64_t d) { return t.size(d) == 1 ? int64_t{0} : t.stride(d); };
  return {st(0), st(1), st(2)};
}

// The kernels copy (B, H, S, D) rows with 16-byte cp.async: a unit last stride, a 16-byte
// aligned base and every other stride a multiple of 8 elements. Tensors that miss it (a view
// with an odd storage offset, padded rows) are copied; a fresh contiguous tensor always meets it.
inline at::Tensor with_aligned_rows(const at::Tensor& t) {
  const cuda::AttnStrides s = strides_of(t);
  const bool ok = (t.size(3) <= 1 || t.stride(3) == 1) &&
                  reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 && s.batch % 8 == 0 &&
                  s.head % 8 == 0 && s.seq % 8 == 0;
  return ok ? t : t.clone(at::MemoryFormat::Contiguous);
}

// Contiguous and 16-byte aligned (dout, out of the backward).
inline at::Tensor contiguous_aligned(const at::Tensor& t) {
  const at::Tensor c = t.contiguous();
  return reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 == 0 ? c : c.clone();
}

// A CSR-like block list from its (already checked) tensors; `keep` holds the contiguous copies
// alive until the launch has been enqueued.
inline cuda::BlockList block_list(const at::Tensor& counts, const at::Tensor& indices,
                                  const std::optional<at::Tensor>& full_counts,
                                  const std::optional<at::Tensor>& full_indices,
                                  at::Tensor (&keep)[4]) {
  keep[0] = counts.contiguous();
  keep[1] = indices.contiguous();
  const bool has_full = full_counts.has_value() && full_counts->defined() &&
                        full_indices.has_value() && full_indices->defined();
  keep[2] = has_full ? full_counts->contiguous() : at::Tensor();
  keep[3] = has_full ? full_indices->contiguous() : at::Tensor();
  const int64_t Bl = keep[0].size(0), Hl = keep[0].size(1), n_rows = keep[0].size(2);
  cuda::BlockList l{};
  l.counts = keep[0].data_ptr<int32_t>();
  l.indices = keep[1].numel() > 0 ? keep[1].data_ptr<int32_t>() : nullptr;
  l.full_counts = has_full ? keep[2].data_ptr<int32_t>() : nullptr;
  l.full_indices = has_full && keep[3].numel() > 0 ? keep[3].data_ptr<int32_t>() : nullptr;
  l.batch_stride = Bl == 1 ? 0 : Hl * n_rows;
  l.head_stride = Hl == 1 ? 0 : n_rows;
  l.n_row_blocks = n_rows;
  l.max_blocks = keep[1].size(3);
  l.max_full_blocks = has_full ? keep[3].size(3) : 0;
  return l;
}

}  // namespace attention_launch
}  // namespace lrkernels
