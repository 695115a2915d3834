// Instantiations of the block-sparse attention forward kernel (attention_fwd.cuh) for __half, one
// per head dim; the dispatch is in attention_fwd.cu.

#include "attention_fwd.cuh"

namespace lrkernels {
namespace cuda {
namespace attn {

LRK_ATTN_FWD_INSTANTIATE(__half, 32)
LRK_ATTN_FWD_INSTANTIATE(__half, 64)
LRK_ATTN_FWD_INSTANTIATE(__half, 96)
LRK_ATTN_FWD_INSTANTIATE(__half, 128)

}  // namespace attn
}  // namespace cuda
}  // namespace lrkernels
