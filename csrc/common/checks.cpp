#include "checks.h"

#include <c10/util/Exception.h>

namespace lrkernels {
namespace {

bool is_supported_float(at::ScalarType t) {
  return t == at::kDouble || t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

}  // namespace

void check_lowrank_linear_args(const at::Tensor& x, const at::Tensor& U, const at::Tensor& V,
                               const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(is_supported_float(x.scalar_type()),
              "lowrank_linear: x must be float64, float32, float16 or bfloat16, got ",
              x.scalar_type());
  TORCH_CHECK(U.scalar_type() == x.scalar_type(), "lowrank_linear: U must have x's dtype (",
              x.scalar_type(), "), got ", U.scalar_type());
  TORCH_CHECK(V.scalar_type() == x.scalar_type(), "lowrank_linear: V must have x's dtype (",
              x.scalar_type(), "), got ", V.scalar_type());
  TORCH_CHECK(U.device() == x.device(), "lowrank_linear: U must be on x's device (", x.device(),
              "), got ", U.device());
  TORCH_CHECK(V.device() == x.device(), "lowrank_linear: V must be on x's device (", x.device(),
              "), got ", V.device());
  TORCH_CHECK(x.dim() >= 1,
              "lowrank_linear: x must have shape (..., in_features), got a 0-d tensor");
  TORCH_CHECK(V.dim() == 2, "lowrank_linear: V must be 2-D (rank, in_features), got shape ",
              V.sizes());
  TORCH_CHECK(U.dim() == 2, "lowrank_linear: U must be 2-D (out_features, rank), got shape ",
              U.sizes());
  TORCH_CHECK(V.size(0) >= 1, "lowrank_linear: rank must be >= 1, got V of shape ", V.sizes());
  TORCH_CHECK(V.size(1) == x.size(-1), "lowrank_linear: V must have shape (rank, ", x.size(-1),
              ") to match x's last dimension, got ", V.sizes());
  TORCH_CHECK(U.size(1) == V.size(0), "lowrank_linear: U must have shape (out_features, ",
              V.size(0), ") to match V's rank, got ", U.sizes());
  TORCH_CHECK(x.size(-1) >= 1, "lowrank_linear: in_features must be >= 1, got x of shape ",
              x.sizes());
  TORCH_CHECK(U.size(0) >= 1, "lowrank_linear: out_features must be >= 1, got U of shape ",
              U.sizes());
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    TORCH_CHECK(b.scalar_type() == x.scalar_type(), "lowrank_linear: bias must have x's dtype (",
                x.scalar_type(), "), got ", b.scalar_type());
    TORCH_CHECK(b.device() == x.device(), "lowrank_linear: bias must be on x's device (",
                x.device(), "), got ", b.device());
    TORCH_CHECK(b.dim() == 1 && b.size(0) == U.size(0), "lowrank_linear: bias must have shape (",
                U.size(0), ",), got ", b.sizes());
  }
}

namespace {

// Checks shared by int8_linear (`activation` is x, reduced over K = qweight.size(1)) and its
// input gradient (`activation` is dy, reduced over N = qweight.size(0)).
int64_t check_int8_common(const char* op, const char* act_name, const at::Tensor& act,
                          int64_t act_features, const at::Tensor& qweight,
                          const at::Tensor& scales) {
  TORCH_CHECK(is_supported_float(act.scalar_type()), op, ": ", act_name,
              " must be float64, float32, float16 or bfloat16, got ", act.scalar_type());
  TORCH_CHECK(act.dim() >= 1, op, ": ", act_name, " must have at least one dimension");
  TORCH_CHECK(qweight.scalar_type() == at::kChar, op, ": qweight must be int8, got ",
              qweight.scalar_type());
  TORCH_CHECK(qweight.dim() == 2, op,
              ": qweight must be 2-D (out_features, in_features), got shape ", qweight.sizes());
  TORCH_CHECK(qweight.size(0) >= 1 && qweight.size(1) >= 1, op,
              ": qweight must have out_features >= 1 and in_features >= 1, got shape ",
              qweight.sizes());
  TORCH_CHECK(act.size(-1) == act_features, op, ": ", act_name, "'s last dimension must be ",
              act_features, " to match qweight of shape ", qweight.sizes(), ", got ", act.sizes());
  TORCH_CHECK(scales.scalar_type() == act.scalar_type(), op, ": scales must have ", act_name,
              "'s dtype (", act.scalar_type(), "), got ", scales.scalar_type());
  TORCH_CHECK(qweight.device() == act.device(), op, ": qweight must be on ", act_name,
              "'s device (", act.device(), "), got ", qweight.device());
  TORCH_CHECK(scales.device() == act.device(), op, ": scales must be on ", act_name, "'s device (",
              act.device(), "), got ", scales.device());
  const int64_t n = qweight.size(0);
  const int64_t k = qweight.size(1);
  if (scales.dim() == 1) {
    TORCH_CHECK(scales.size(0) == n, op, ": per-channel scales must have shape (", n, ",), got ",
                scales.sizes());
    return 0;
  }
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == n && scales.size(1) >= 1, op,
              ": scales must have shape (", n, ",) or (", n, ", in_features / group_size), got ",
              scales.sizes());
  const int64_t groups = scales.size(1);
  TORCH_CHECK(k % groups == 0, op, ": in_features (", k, ") is not divisible into ", groups,
              " groups (scales of shape ", scales.sizes(), ")");
  const int64_t group = k / groups;
  TORCH_CHECK(group == 32 || group == 64 || group == 128, op,
              ": group size must be 32, 64 or 128, got ", group, " (in_features ", k, ", ", groups,
              " groups)");
  return group;
}

}  // namespace

int64_t check_int8_linear_args(const at::Tensor& x, const at::Tensor& qweight,
                               const at::Tensor& scales, const std::optional<at::Tensor>& bias) {
  const int64_t group = check_int8_common(
      "int8_linear", "x", x, qweight.dim() == 2 ? qweight.size(1) : -1, qweight, scales);
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    TORCH_CHECK(b.scalar_type() == x.scalar_type(), "int8_linear: bias must have x's dtype (",
                x.scalar_type(), "), got ", b.scalar_type());
    TORCH_CHECK(b.device() == x.device(), "int8_linear: bias must be on x's device (", x.device(),
                "), got ", b.device());
    TORCH_CHECK(b.dim() == 1 && b.size(0) == qweight.size(0), "int8_linear: bias must have shape (",
                qweight.size(0), ",), got ", b.sizes());
  }
  return group;
}

int64_t check_int8_grad_input_args(const at::Tensor& dy, const at::Tensor& qweight,
                                   const at::Tensor& scales) {
  return check_int8_common("int8_linear_grad_input", "dy", dy,
                           qweight.dim() == 2 ? qweight.size(0) : -1, qweight, scales);
}

namespace {

// The packed weight and its scales (shared by the three packed ops): returns the group size and
// sets n, k (out_features, in_features).
int64_t check_int8_packed_pair(const char* op, const at::Tensor& qweight, const at::Tensor& scales,
                               int64_t* n, int64_t* k) {
  TORCH_CHECK(qweight.scalar_type() == at::kChar, op, ": qweight must be int8, got ",
              qweight.scalar_type());
  TORCH_CHECK(
      qweight.dim() == 3 && qweight.size(2) == 512 && qweight.size(0) >= 1 && qweight.size(1) >= 1,
      op, ": qweight must be packed (layout 2): (ceil(out / 32), in / 16, 512), got shape ",
      qweight.sizes());
  TORCH_CHECK(scales.device() == qweight.device(), op, ": scales must be on qweight's device (",
              qweight.device(), "), got ", scales.device());
  TORCH_CHECK(scales.dim() == 1 || scales.dim() == 2, op,
              ": scales must have shape (out,) or (out, in / group_size), got ", scales.sizes());
  *n = scales.size(0);
  *k = 16 * qweight.size(1);
  TORCH_CHECK(*n >= 1 && (*n + 31) / 32 == qweight.size(0), op, ": scales of shape ",
              scales.sizes(), " give out_features ", *n, ", but the packed qweight of shape ",
              qweight.sizes(), " holds ceil(out / 32) = ", qweight.size(0), " row units");
  if (scales.dim() == 1) return 0;
  const int64_t groups = scales.size(1);
  TORCH_CHECK(groups >= 1 && *k % groups == 0, op, ": in_features (", *k,
              ") is not divisible into ", groups, " groups (scales of shape ", scales.sizes(), ")");
  const int64_t group = *k / groups;
  TORCH_CHECK(group == 32 || group == 64 || group == 128, op,
              ": group size must be 32, 64 or 128, got ", group, " (in_features ", *k, ", ", groups,
              " groups)");
  return group;
}

int64_t check_int8_packed_common(const char* op, const char* act_name, const at::Tensor& act,
                                 bool reduce_over_n, const at::Tensor& qweight,
                                 const at::Tensor& scales) {
  TORCH_CHECK(is_supported_float(act.scalar_type()), op, ": ", act_name,
              " must be float64, float32, float16 or bfloat16, got ", act.scalar_type());
  TORCH_CHECK(act.dim() >= 1, op, ": ", act_name, " must have at least one dimension");
  TORCH_CHECK(qweight.device() == act.device(), op, ": qweight must be on ", act_name,
              "'s device (", act.device(), "), got ", qweight.device());
  int64_t n = 0, k = 0;
  const int64_t group = check_int8_packed_pair(op, qweight, scales, &n, &k);
  TORCH_CHECK(scales.scalar_type() == act.scalar_type(), op, ": scales must have ", act_name,
              "'s dtype (", act.scalar_type(), "), got ", scales.scalar_type());
  const int64_t features = reduce_over_n ? n : k;
  TORCH_CHECK(act.size(-1) == features, op, ": ", act_name, "'s last dimension must be ", features,
              " to match the packed qweight (out ", n, ", in ", k, "), got ", act.sizes());
  return group;
}

}  // namespace

int64_t check_int8_packed_linear_args(const at::Tensor& x, const at::Tensor& qweight,
                                      const at::Tensor& scales,
                                      const std::optional<at::Tensor>& bias) {
  const int64_t group =
      check_int8_packed_common("int8_linear_packed", "x", x, false, qweight, scales);
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    TORCH_CHECK(b.scalar_type() == x.scalar_type(),
                "int8_linear_packed: bias must have x's dtype (", x.scalar_type(), "), got ",
                b.scalar_type());
    TORCH_CHECK(b.device() == x.device(), "int8_linear_packed: bias must be on x's device (",
                x.device(), "), got ", b.device());
    TORCH_CHECK(b.dim() == 1 && b.size(0) == scales.size(0),
                "int8_linear_packed: bias must have shape (", scales.size(0), ",), got ",
                b.sizes());
  }
  return group;
}

int64_t check_int8_packed_grad_input_args(const at::Tensor& dy, const at::Tensor& qweight,
                                          const at::Tensor& scales) {
  return check_int8_packed_common("int8_linear_packed_grad_input", "dy", dy, true, qweight, scales);
}

int64_t check_int8_dequantize_packed_args(const at::Tensor& qweight, const at::Tensor& scales) {
  TORCH_CHECK(scales.scalar_type() == at::kFloat || scales.scalar_type() == at::kHalf ||
                  scales.scalar_type() == at::kBFloat16,
              "int8_dequantize_packed: scales must be float32, float16 or bfloat16, got ",
              scales.scalar_type());
  int64_t n = 0, k = 0;
  return check_int8_packed_pair("int8_dequantize_packed", qweight, scales, &n, &k);
}

namespace {

constexpr const char* kAttn = "block_sparse_attention: ";

// ceil(a / b) for a >= 0, b >= 1, without overflow.
int64_t attn_ceil_div(int64_t a, int64_t b) { return a == 0 ? 0 : (a - 1) / b + 1; }

// One CSR-like list: counts int32 (Bl, Hl, n_rows) and indices int32 (Bl, Hl, n_rows, MAX) on
// `device`, with Bl in {1, B} and Hl in {1, Hq}. `rows` names n_rows ("ceil(Sq / block_q)").
void check_attn_block_list(const char* counts_name, const at::Tensor& counts,
                           const char* indices_name, const at::Tensor& indices, int64_t B,
                           int64_t Hq, int64_t n_rows, const char* rows, const at::Device& device) {
  TORCH_CHECK(counts.scalar_type() == at::kInt, kAttn, counts_name, " must be int32, got ",
              counts.scalar_type());
  TORCH_CHECK(indices.scalar_type() == at::kInt, kAttn, indices_name, " must be int32, got ",
              indices.scalar_type());
  TORCH_CHECK(counts.device() == device, kAttn, counts_name, " must be on q's device (", device,
              "), got ", counts.device());
  TORCH_CHECK(indices.device() == device, kAttn, indices_name, " must be on q's device (", device,
              "), got ", indices.device());
  TORCH_CHECK(counts.dim() == 3 && (counts.size(0) == 1 || counts.size(0) == B) &&
                  (counts.size(1) == 1 || counts.size(1) == Hq) && counts.size(2) == n_rows,
              kAttn, counts_name, " must have shape (Bl, Hl, ", n_rows, ") with Bl in {1, ", B,
              "}, Hl in {1, ", Hq, "} and ", n_rows, " = ", rows, ", got ", counts.sizes());
  TORCH_CHECK(indices.dim() == 4 && indices.size(0) == counts.size(0) &&
                  indices.size(1) == counts.size(1) && indices.size(2) == n_rows,
              kAttn, indices_name, " must have shape (", counts.size(0), ", ", counts.size(1), ", ",
              n_rows, ", MAX) to match ", counts_name, ", got ", indices.sizes());
}

// A list with its optional full counterpart: both full tensors or neither, with the partial
// list's (Bl, Hl).
void check_attn_block_lists(const char* counts_name, const at::Tensor& counts,
                            const char* indices_name, const at::Tensor& indices,
                            const char* full_counts_name,
                            const std::optional<at::Tensor>& full_counts,
                            const char* full_indices_name,
                            const std::optional<at::Tensor>& full_indices, int64_t B, int64_t Hq,
                            int64_t n_rows, const char* rows, const at::Device& device) {
  check_attn_block_list(counts_name, counts, indices_name, indices, B, Hq, n_rows, rows, device);
  TORCH_CHECK(full_counts.has_value() == full_indices.has_value(), kAttn, full_counts_name, " and ",
              full_indices_name, " must be given together (both or neither), got ",
              full_counts.has_value() ? full_counts_name : full_indices_name, " alone");
  if (!full_counts.has_value()) {
    return;
  }
  check_attn_block_list(full_counts_name, *full_counts, full_indices_name, *full_indices, B, Hq,
                        n_rows, rows, device);
  TORCH_CHECK(full_counts->size(0) == counts.size(0) && full_counts->size(1) == counts.size(1),
              kAttn, full_counts_name, " must have ", counts_name, "'s broadcast shape (",
              counts.size(0), ", ", counts.size(1), ", ", n_rows, "), got ", full_counts->sizes());
}

}  // namespace

void check_block_sparse_attention_args(const at::Tensor& q, const at::Tensor& k,
                                       const at::Tensor& v, const at::Tensor& kv_num_blocks,
                                       const at::Tensor& kv_indices,
                                       const std::optional<at::Tensor>& full_kv_num_blocks,
                                       const std::optional<at::Tensor>& full_kv_indices,
                                       int64_t block_q, int64_t block_k, int64_t window_left,
                                       int64_t window_right) {
  TORCH_CHECK(q.dim() == 4, kAttn, "q must be 4-D (B, Hq, Sq, D), got shape ", q.sizes());
  TORCH_CHECK(k.dim() == 4, kAttn, "k must be 4-D (B, Hkv, Sk, D), got shape ", k.sizes());
  TORCH_CHECK(v.dim() == 4, kAttn, "v must be 4-D (B, Hkv, Sk, D), got shape ", v.sizes());
  TORCH_CHECK(is_supported_float(q.scalar_type()), kAttn,
              "q must be float64, float32, float16 or bfloat16, got ", q.scalar_type());
  TORCH_CHECK(k.scalar_type() == q.scalar_type(), kAttn, "k must have q's dtype (", q.scalar_type(),
              "), got ", k.scalar_type());
  TORCH_CHECK(v.scalar_type() == q.scalar_type(), kAttn, "v must have q's dtype (", q.scalar_type(),
              "), got ", v.scalar_type());
  TORCH_CHECK(k.device() == q.device(), kAttn, "k must be on q's device (", q.device(), "), got ",
              k.device());
  TORCH_CHECK(v.device() == q.device(), kAttn, "v must be on q's device (", q.device(), "), got ",
              v.device());
  TORCH_CHECK(v.sizes() == k.sizes(), kAttn, "v must have k's shape ", k.sizes(), ", got ",
              v.sizes());
  TORCH_CHECK(k.size(0) == q.size(0), kAttn, "k and v must have q's batch size B = ", q.size(0),
              ", got k of shape ", k.sizes());
  TORCH_CHECK(k.size(3) == q.size(3), kAttn, "k and v must have q's head dim D = ", q.size(3),
              ", got k of shape ", k.sizes());
  TORCH_CHECK(q.size(3) >= 1, kAttn, "head dim D must be >= 1, got q of shape ", q.sizes());
  TORCH_CHECK(k.size(1) >= 1, kAttn, "k and v must have at least one head (Hkv >= 1), got k of ",
              "shape ", k.sizes());
  TORCH_CHECK(q.size(1) % k.size(1) == 0, kAttn, "the query heads Hq = ", q.size(1),
              " must be a multiple of the kv heads Hkv = ", k.size(1));
  TORCH_CHECK(block_q >= 1, kAttn, "block_q must be >= 1, got ", block_q);
  TORCH_CHECK(block_k >= 1, kAttn, "block_k must be >= 1, got ", block_k);
  TORCH_CHECK(window_left >= -1, kAttn, "window_left must be >= -1 (-1: unbounded), got ",
              window_left);
  TORCH_CHECK(window_right >= -1, kAttn, "window_right must be >= -1 (-1: unbounded), got ",
              window_right);
  check_attn_block_lists("kv_num_blocks", kv_num_blocks, "kv_indices", kv_indices,
                         "full_kv_num_blocks", full_kv_num_blocks, "full_kv_indices",
                         full_kv_indices, q.size(0), q.size(1), attn_ceil_div(q.size(2), block_q),
                         "ceil(Sq / block_q)", q.device());
}

void check_block_sparse_attention_bwd_args(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& kv_num_blocks,
    const at::Tensor& kv_indices, const std::optional<at::Tensor>& full_kv_num_blocks,
    const std::optional<at::Tensor>& full_kv_indices, const at::Tensor& q_num_blocks,
    const at::Tensor& q_indices, const std::optional<at::Tensor>& full_q_num_blocks,
    const std::optional<at::Tensor>& full_q_indices, int64_t block_q, int64_t block_k,
    int64_t window_left, int64_t window_right) {
  check_block_sparse_attention_args(q, k, v, kv_num_blocks, kv_indices, full_kv_num_blocks,
                                    full_kv_indices, block_q, block_k, window_left, window_right);
  const std::pair<const char*, const at::Tensor*> like_q[] = {{"dout", &dout}, {"out", &out}};
  for (const auto& [name, t] : like_q) {
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), kAttn, name, " must have q's dtype (",
                q.scalar_type(), "), got ", t->scalar_type());
    TORCH_CHECK(t->device() == q.device(), kAttn, name, " must be on q's device (", q.device(),
                "), got ", t->device());
    TORCH_CHECK(t->sizes() == q.sizes(), kAttn, name, " must have q's shape ", q.sizes(), ", got ",
                t->sizes());
  }
  TORCH_CHECK(lse.scalar_type() == at::kFloat, kAttn, "lse must be float32, got ",
              lse.scalar_type());
  TORCH_CHECK(lse.device() == q.device(), kAttn, "lse must be on q's device (", q.device(),
              "), got ", lse.device());
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == q.size(0) && lse.size(1) == q.size(1) &&
                  lse.size(2) == q.size(2),
              kAttn, "lse must have shape (B, Hq, Sq) = (", q.size(0), ", ", q.size(1), ", ",
              q.size(2), "), got ", lse.sizes());
  check_attn_block_lists("q_num_blocks", q_num_blocks, "q_indices", q_indices, "full_q_num_blocks",
                         full_q_num_blocks, "full_q_indices", full_q_indices, q.size(0), q.size(1),
                         attn_ceil_div(k.size(2), block_k), "ceil(Sk / block_k)", q.device());
  TORCH_CHECK(full_q_num_blocks.has_value() == full_kv_num_blocks.has_value(), kAttn,
              "full_q_num_blocks/full_q_indices must be given exactly when full_kv_num_blocks/"
              "full_kv_indices are, got ",
              full_kv_num_blocks.has_value() ? "the forward full lists without their transpose"
                                             : "transposed full lists without forward ones");
}

namespace {

// The LoRA base: dense (out, in) in act's dtype, or int8 with scales. `act_features` is the
// activation's expected last dimension (in for x, out for dy). Returns -1 (dense) or the group.
int64_t check_lora_base(const char* op, const char* act_name, const at::Tensor& act,
                        bool transposed, const at::Tensor& weight,
                        const std::optional<at::Tensor>& weight_scales) {
  TORCH_CHECK(is_supported_float(act.scalar_type()), op, ": ", act_name,
              " must be float64, float32, float16 or bfloat16, got ", act.scalar_type());
  TORCH_CHECK(act.dim() >= 1, op, ": ", act_name, " must have shape (..., features), got a 0-d ",
              "tensor");
  if (weight_scales.has_value()) {
    if (weight.dim() == 3) {  // packed (layout 2)
      return check_int8_packed_common(op, act_name, act, transposed, weight, *weight_scales);
    }
    const int64_t features = weight.dim() == 2 ? weight.size(transposed ? 0 : 1) : -1;
    return check_int8_common(op, act_name, act, features, weight, *weight_scales);
  }
  TORCH_CHECK(weight.scalar_type() == act.scalar_type(), op, ": weight must have ", act_name,
              "'s dtype (", act.scalar_type(), ") for a dense base (or be int8 with weight_scales)",
              ", got ", weight.scalar_type());
  TORCH_CHECK(weight.device() == act.device(), op, ": weight must be on ", act_name, "'s device (",
              act.device(), "), got ", weight.device());
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be 2-D (out_features, in_features), got shape ",
              weight.sizes());
  TORCH_CHECK(weight.size(0) >= 1 && weight.size(1) >= 1, op,
              ": weight must have out_features >= 1 and in_features >= 1, got shape ",
              weight.sizes());
  const int64_t features = weight.size(transposed ? 0 : 1);
  TORCH_CHECK(act.size(-1) == features, op, ": ", act_name, "'s last dimension must be ", features,
              " to match weight of shape ", weight.sizes(), ", got ", act.sizes());
  return -1;
}

void check_lora_same(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x,
                     const char* x_name) {
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, " must have ", x_name,
              "'s dtype (", x.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " must be on ", x_name, "'s device (",
              x.device(), "), got ", t.device());
}

void check_lora_dropout(const char* op, const at::Tensor& x, int64_t threshold,
                        const std::optional<at::Tensor>& seed) {
  TORCH_CHECK(threshold >= 0 && threshold <= 65535, op,
              ": dropout_threshold must be in [0, 65535] (round(p * 65536)), got ", threshold);
  if (threshold == 0) return;
  TORCH_CHECK(seed.has_value(), op, ": dropout_threshold > 0 needs a seed tensor");
  TORCH_CHECK(seed->scalar_type() == at::kLong && seed->numel() == 1, op,
              ": seed must be a one-element int64 tensor, got ", seed->scalar_type(), " of shape ",
              seed->sizes());
  TORCH_CHECK(seed->device() == x.device(), op, ": seed must be on x's device (", x.device(),
              "), got ", seed->device());
}

}  // namespace

void check_lora_int8_path(const char* op, int64_t int8_path) {
  TORCH_CHECK(int8_path >= 0 && int8_path <= 2, op,
              ": int8_path must be 0 (the default rule), 1 (kernel) or 2 (dequantize + cuBLAS), ",
              "got ", int8_path);
}

std::pair<int64_t, int64_t> lora_base_shape(const at::Tensor& weight,
                                            const std::optional<at::Tensor>& weight_scales) {
  if (weight_scales.has_value() && weight.dim() == 3) {
    return {weight_scales->size(0), 16 * weight.size(1)};
  }
  return {weight.size(0), weight.size(1)};
}

int64_t check_lora_linear_args(const at::Tensor& x, const at::Tensor& weight,
                               const std::optional<at::Tensor>& weight_scales, const at::Tensor& A,
                               const at::Tensor& B, const std::optional<at::Tensor>& bias,
                               int64_t dropout_threshold, const std::optional<at::Tensor>& seed) {
  constexpr const char* op = "lora_linear";
  const int64_t group = check_lora_base(op, "x", x, false, weight, weight_scales);
  const auto [out, in] = lora_base_shape(weight, weight_scales);
  check_lora_same(op, "A", A, x, "x");
  check_lora_same(op, "B", B, x, "x");
  TORCH_CHECK(A.dim() == 2 && A.size(0) >= 1 && A.size(1) == in, op, ": A must have shape (r, ", in,
              ") with r >= 1, got ", A.sizes());
  TORCH_CHECK(B.dim() == 2 && B.size(0) == out && B.size(1) == A.size(0), op,
              ": B must have shape (", out, ", ", A.size(0), ") to match weight and A's rank, got ",
              B.sizes());
  if (bias.has_value()) {
    check_lora_same(op, "bias", *bias, x, "x");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out, op, ": bias must have shape (", out,
                ",), got ", bias->sizes());
  }
  check_lora_dropout(op, x, dropout_threshold, seed);
  return group;
}

int64_t check_lora_grad_input_args(const at::Tensor& dy, const at::Tensor& weight,
                                   const std::optional<at::Tensor>& weight_scales,
                                   const at::Tensor& dt, const at::Tensor& A,
                                   int64_t dropout_threshold,
                                   const std::optional<at::Tensor>& seed) {
  constexpr const char* op = "lora_linear_grad_input";
  const int64_t group = check_lora_base(op, "dy", dy, true, weight, weight_scales);
  const int64_t in = lora_base_shape(weight, weight_scales).second;
  check_lora_same(op, "dt", dt, dy, "dy");
  check_lora_same(op, "A", A, dy, "dy");
  TORCH_CHECK(A.dim() == 2 && A.size(0) >= 1 && A.size(1) == in, op, ": A must have shape (r, ", in,
              ") with r >= 1, got ", A.sizes());
  const int64_t rows = dy.numel() / dy.size(-1);
  TORCH_CHECK(dt.dim() == 2 && dt.size(0) == rows && dt.size(1) == A.size(0), op,
              ": dt must have shape (", rows, ", ", A.size(0), "), got ", dt.sizes());
  check_lora_dropout(op, dy, dropout_threshold, seed);
  return group;
}

void check_lora_grad_A_args(const at::Tensor& dt, const at::Tensor& x, int64_t dropout_threshold,
                            const at::Tensor& seed) {
  constexpr const char* op = "lora_linear_grad_A";
  TORCH_CHECK(is_supported_float(x.scalar_type()), op,
              ": x must be float64, float32, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) >= 1, op, ": x must have shape (..., in) with in >= 1, ",
              "got ", x.sizes());
  check_lora_same(op, "dt", dt, x, "x");
  const int64_t rows = x.numel() / x.size(-1);
  TORCH_CHECK(dt.dim() == 2 && dt.size(0) == rows && dt.size(1) >= 1, op, ": dt must have shape (",
              rows, ", r) with r >= 1, got ", dt.sizes());
  check_lora_dropout(op, x, dropout_threshold, seed);
}

int64_t check_lora_multi_args(const at::Tensor& x, const at::Tensor& weight,
                              const std::optional<at::Tensor>& weight_scales, const at::Tensor& A,
                              const at::Tensor& B, const at::Tensor& adapter_index,
                              const at::Tensor& ranks, const at::Tensor& adapter_scales,
                              const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "lora_linear_multi";
  const int64_t group = check_lora_base(op, "x", x, false, weight, weight_scales);
  const auto [out, in] = lora_base_shape(weight, weight_scales);
  check_lora_same(op, "A", A, x, "x");
  check_lora_same(op, "B", B, x, "x");
  TORCH_CHECK(A.dim() == 3 && A.size(0) >= 1 && A.size(1) >= 1 && A.size(2) == in, op,
              ": A must have shape (n_adapters, r_max, ", in, ") with n_adapters, r_max >= 1, got ",
              A.sizes());
  const int64_t n = A.size(0);
  const int64_t r_max = A.size(1);
  TORCH_CHECK(B.dim() == 3 && B.size(0) == n && B.size(1) == out && B.size(2) == r_max, op,
              ": B must have shape (", n, ", ", out, ", ", r_max, ") to match weight and A, got ",
              B.sizes());
  TORCH_CHECK(adapter_index.scalar_type() == at::kInt, op, ": adapter_index must be int32, got ",
              adapter_index.scalar_type());
  TORCH_CHECK(adapter_index.device() == x.device(), op, ": adapter_index must be on x's device (",
              x.device(), "), got ", adapter_index.device());
  const auto lead = x.sizes().slice(0, x.dim() - 1);
  TORCH_CHECK(adapter_index.sizes() == lead, op, ": adapter_index must have x's leading shape ",
              lead, ", got ", adapter_index.sizes());
  TORCH_CHECK(ranks.scalar_type() == at::kInt, op, ": ranks must be int32, got ",
              ranks.scalar_type());
  TORCH_CHECK(ranks.device() == x.device(), op, ": ranks must be on x's device (", x.device(),
              "), got ", ranks.device());
  TORCH_CHECK(ranks.dim() == 1 && ranks.size(0) == n, op, ": ranks must have shape (", n,
              ",), got ", ranks.sizes());
  TORCH_CHECK(adapter_scales.scalar_type() == at::kFloat, op,
              ": adapter_scales must be float32, got ", adapter_scales.scalar_type());
  TORCH_CHECK(adapter_scales.device() == x.device(), op, ": adapter_scales must be on x's device (",
              x.device(), "), got ", adapter_scales.device());
  TORCH_CHECK(adapter_scales.dim() == 1 && adapter_scales.size(0) == n, op,
              ": adapter_scales must have shape (", n, ",), got ", adapter_scales.sizes());
  if (bias.has_value()) {
    check_lora_same(op, "bias", *bias, x, "x");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out, op, ": bias must have shape (", out,
                ",), got ", bias->sizes());
  }
  return group;
}

}  // namespace lrkernels
