// Instantiations of the block-sparse attention forward kernel (attention_fwd.cuh) for
// __nv_bfloat16, one per head dim; the dispatch is in attention_fwd.cu.

#include "attention_fwd.cuh"

namespace lrkernels {
namespace cuda {
namespace attn {

LRK_ATTN_FWD_INSTANTIATE(__nv_bfloat16, 32)
LRK_ATTN_FWD_INSTANTIATE(__nv_bfloat16, 64)
LRK_ATTN_FWD_INSTANTIATE(__nv_bfloat16, 96)
LRK_ATTN_FWD_INSTANTIATE(__nv_bfloat16, 128)

}  // namespace attn
}  // namespace cuda
}  // namespace lrkernels
