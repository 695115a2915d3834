// Instantiations of the block-sparse attention backward kernel (attention_bwd.cuh) for __half, one
// per head dim; the prep kernel and the dispatch are in attention_bwd.cu.

#include "attention_bwd.cuh"

namespace lrkernels {
namespace cuda {
namespace attn {

LRK_ATTN_BWD_INSTANTIATE(__half, 32)
LRK_ATTN_BWD_INSTANTIATE(__half, 64)
LRK_ATTN_BWD_INSTANTIATE(__half, 96)
LRK_ATTN_BWD_INSTANTIATE(__half, 128)

}  // namespace attn
}  // namespace cuda
}  // namespace lrkernels
