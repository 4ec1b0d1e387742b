// scratchformer._kernels: registers scratchformer's ops with PyTorch.
//
// The only file that sees torch, and only its stable ABI (torch/csrc/stable), so one build loads
// in every torch from the version it targets on (setup.py sets TORCH_TARGET_VERSION). Each op
// here checks its inputs, allocates outputs and launches a kernel declared in kernels.h. Fake
// (meta) implementations and autograd are registered from Python (scratchformer/ops).
//
// The ops are registered for the CPU key too, with the same checks: a CPU tensor is refused by
// our own first check ("x must be a CUDA tensor"), so every build, GPU or not, runs the path by
// which a failed check reaches Python as a RuntimeError (tests/test_extensions.py).
#include <Python.h>  // limited API (Py_LIMITED_API is set by setup.py)

#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/util/Exception.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "kernels.h"

#ifndef SCRATCHFORMER_CUDA
// Without CUDA kernels only the CPU registration exists, whose inputs every op refuses at its
// first check; these stand in for the kernels past it, so the glue is one code in every build.
namespace scratchformer {
namespace {
constexpr const char* kNoKernels = "scratchformer was built without CUDA kernels";
}
const char* launch_layer_norm_forward(const LayerNormForward&, void*) { return kNoKernels; }
const char* launch_layer_norm_backward(const LayerNormBackward&, void*) { return kNoKernels; }
int layer_norm_backward_chunks(int64_t, int64_t) { return 1; }
const char* launch_cross_entropy(const CrossEntropyChunk&, void*) { return kNoKernels; }
bool attention_head_dim_supported(int) { return false; }
int attention_forward_splits(const AttentionShape&, DType) { return 1; }
int attention_backward_dkv_splits(const AttentionShape&, DType, void*) { return 1; }
const char* launch_attention_forward(const AttentionForward&, void*) { return kNoKernels; }
const char* launch_attention_backward(const AttentionBackward&, void*) { return kNoKernels; }
}  // namespace scratchformer
#endif

namespace {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

scratchformer::DType cuda_dtype(const char* op, ScalarType t) {
  switch (t) {
    case ScalarType::Float: return scratchformer::DType::kFloat32;
    case ScalarType::Half: return scratchformer::DType::kFloat16;
    case ScalarType::BFloat16: return scratchformer::DType::kBFloat16;
    default:
      STD_TORCH_CHECK(false, op, ": supports float32, float16 and bfloat16, got ", t);
  }
  return scratchformer::DType::kFloat32;
}

void* current_stream(const Tensor& t) {
  void* stream = nullptr;
#ifdef SCRATCHFORMER_CUDA  // a CPU-only torch has no CUDA streams (nor this function)
  TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(t.get_device_index(), &stream));
#else
  (void)t;
#endif
  return stream;
}

void check_cuda(const char* op, const char* name, const Tensor& t, const Tensor& like) {
  STD_TORCH_CHECK(t.is_cuda() && t.get_device() == like.get_device(), op, ": ", name,
                  " must be a CUDA tensor on the same device as the other inputs");
}

// x: [rows, C] with unit stride along C; weight, bias: [C] contiguous, of x's dtype or float32.
void check_layer_norm_inputs(const char* op, const Tensor& x, const Tensor& weight) {
  STD_TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor");
  STD_TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D [rows, C], got ", x.dim(), " dimensions");
  STD_TORCH_CHECK(x.size(1) >= 1 && x.size(1) <= INT32_MAX, op, ": C must be in [1, 2^31), got ", x.size(1));
  STD_TORCH_CHECK(x.size(1) == 1 || x.stride(1) == 1, op, ": x must be contiguous along C (call .contiguous())");
  check_cuda(op, "weight", weight, x);
  STD_TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1) && weight.is_contiguous(), op,
                  ": weight must be contiguous with shape [", x.size(1), "]");
  STD_TORCH_CHECK(weight.scalar_type() == x.scalar_type() || weight.scalar_type() == ScalarType::Float, op,
                  ": weight must have x's dtype or float32, got ", weight.scalar_type(), " for x of ",
                  x.scalar_type());
}

Tensor rows_of_floats(const Tensor& like, int64_t rows) {
  return torch::stable::new_empty(like, {rows}, ScalarType::Float);
}

// LayerNorm, or RMSNorm where bias is null (the same kernels).
std::tuple<Tensor, Tensor, Tensor, Tensor> norm_fwd(const char* op, Tensor x, Tensor weight, const Tensor* bias,
                                                    std::optional<Tensor> residual, double eps) {
  check_layer_norm_inputs(op, x, weight);
  if (bias) {
    check_cuda(op, "bias", *bias, x);
    STD_TORCH_CHECK(bias->scalar_type() == weight.scalar_type() && bias->dim() == 1 &&
                        bias->size(0) == x.size(1) && bias->is_contiguous(),
                    op, ": bias must be contiguous, shaped and typed like weight");
  }
  STD_TORCH_CHECK(eps > 0, op, ": eps must be > 0, got ", eps);
  const auto dtype = cuda_dtype(op, x.scalar_type());
  torch::stable::accelerator::DeviceGuard guard(x.get_device_index());
  const int64_t rows = x.size(0), C = x.size(1);
  Tensor y = torch::stable::new_empty(x, {rows, C});
  Tensor h = torch::stable::new_empty(x, {residual ? rows : 0, C});
  Tensor mean = rows_of_floats(x, rows), rstd = rows_of_floats(x, rows);
  scratchformer::LayerNormForward args{};
  args.dtype = dtype;
  args.weight_dtype = cuda_dtype(op, weight.scalar_type());
  args.x = x.data_ptr();
  args.x_stride = x.stride(0);
  if (residual) {
    const Tensor& r = *residual;
    check_cuda(op, "residual", r, x);
    STD_TORCH_CHECK(r.scalar_type() == x.scalar_type() && r.dim() == 2 && r.size(0) == rows && r.size(1) == C &&
                        (C == 1 || r.stride(1) == 1),
                    op, ": residual must have x's dtype and shape and be contiguous along C");
    args.residual = r.data_ptr();
    args.r_stride = r.stride(0);
    args.h = h.data_ptr();
  }
  args.weight = weight.data_ptr();
  args.bias = bias ? bias->data_ptr() : nullptr;
  args.y = y.data_ptr();
  args.mean = static_cast<float*>(mean.data_ptr());
  args.rstd = static_cast<float*>(rstd.data_ptr());
  args.rows = rows;
  args.C = int(C);
  args.eps = float(eps);
  const char* err = scratchformer::launch_layer_norm_forward(args, current_stream(x));
  STD_TORCH_CHECK(err == nullptr, op, ": CUDA launch failed: ", err);
  return {y, h, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> layer_norm_fwd(Tensor x, Tensor weight, Tensor bias,
                                                          std::optional<Tensor> residual, double eps) {
  return norm_fwd("scratchformer::layer_norm_fwd", x, weight, &bias, residual, eps);
}

std::tuple<Tensor, Tensor, Tensor> rms_norm_fwd(Tensor x, Tensor weight, std::optional<Tensor> residual, double eps) {
  auto [y, h, mean, rstd] = norm_fwd("scratchformer::rms_norm_fwd", x, weight, nullptr, residual, eps);
  return {y, h, rstd};
}

// LayerNorm's backward, or RMSNorm's where mean is null (then no dbias: returned empty).
std::tuple<Tensor, Tensor, Tensor> norm_bwd(const char* op, Tensor dy, Tensor x, Tensor weight, const Tensor* mean,
                                            Tensor rstd, std::optional<Tensor> grad_h) {
  check_layer_norm_inputs(op, x, weight);
  const int64_t rows = x.size(0), C = x.size(1);
  const Tensor gh = grad_h.value_or(dy);
  for (const Tensor* t : {static_cast<const Tensor*>(&dy), &gh}) {
    check_cuda(op, "dy and grad_h", *t, x);
    STD_TORCH_CHECK(t->scalar_type() == x.scalar_type() && t->dim() == 2 && t->size(0) == rows &&
                        t->size(1) == C && t->is_contiguous(),
                    op, ": dy and grad_h must be contiguous with x's dtype and shape");
  }
  for (const Tensor* t : {mean ? mean : &rstd, static_cast<const Tensor*>(&rstd)}) {
    check_cuda(op, "mean and rstd", *t, x);
    STD_TORCH_CHECK(t->scalar_type() == ScalarType::Float && t->dim() == 1 && t->size(0) == rows &&
                        t->is_contiguous(),
                    op, ": mean and rstd must be contiguous float32 of shape [rows]");
  }
  torch::stable::accelerator::DeviceGuard guard(x.get_device_index());
  Tensor dx = torch::stable::new_empty(x, {rows, C});
  Tensor dweight = torch::stable::new_empty(weight, {C});
  Tensor dbias = torch::stable::new_empty(weight, {mean ? C : 0});
  const int chunks = scratchformer::layer_norm_backward_chunks(rows, C);
  Tensor partial = torch::stable::new_empty(x, {2 * int64_t(chunks) * C}, ScalarType::Float);
  scratchformer::LayerNormBackward args{};
  args.dtype = cuda_dtype(op, x.scalar_type());
  args.weight_dtype = cuda_dtype(op, weight.scalar_type());
  args.dy = dy.data_ptr();
  args.x = x.data_ptr();
  args.x_stride = x.stride(0);
  args.weight = weight.data_ptr();
  args.mean = mean ? static_cast<const float*>(mean->data_ptr()) : nullptr;
  args.rstd = static_cast<const float*>(rstd.data_ptr());
  args.grad_h = grad_h ? grad_h->data_ptr() : nullptr;
  args.dx = dx.data_ptr();
  args.dweight = dweight.data_ptr();
  args.dbias = mean ? dbias.data_ptr() : nullptr;
  args.partial = static_cast<float*>(partial.data_ptr());
  args.rows = rows;
  args.C = int(C);
  const char* err = scratchformer::launch_layer_norm_backward(args, current_stream(x));
  STD_TORCH_CHECK(err == nullptr, op, ": CUDA launch failed: ", err);
  return {dx, dweight, dbias};
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_bwd(Tensor dy, Tensor x, Tensor weight, Tensor mean, Tensor rstd,
                                                  std::optional<Tensor> grad_h) {
  return norm_bwd("scratchformer::layer_norm_bwd", dy, x, weight, &mean, rstd, grad_h);
}

std::tuple<Tensor, Tensor> rms_norm_bwd(Tensor dy, Tensor x, Tensor weight, Tensor rstd, std::optional<Tensor> grad_h) {
  auto [dx, dweight, dbias] = norm_bwd("scratchformer::rms_norm_bwd", dy, x, weight, nullptr, rstd, grad_h);
  return {dx, dweight};
}

// ---- one chunk of linear_cross_entropy -------------------------------------------------------

// The loss of each row of logits [rows, V]; with `grad`, its gradient (times row_scale * scale)
// written over the logits.
Tensor cross_entropy_chunk(Tensor logits, Tensor targets, std::optional<Tensor> row_scale, double scale,
                           int64_t ignore_index, double label_smoothing, double softcap, bool grad) {
  const char* op = "scratchformer::cross_entropy_chunk";
  STD_TORCH_CHECK(logits.is_cuda(), op, ": logits must be a CUDA tensor");
  STD_TORCH_CHECK(logits.dim() == 2 && logits.size(1) >= 1 && logits.size(1) <= INT32_MAX, op,
                  ": logits must be 2-D [rows, V] with 1 <= V < 2^31");
  STD_TORCH_CHECK(logits.size(1) == 1 || logits.stride(1) == 1, op, ": logits must be contiguous along V");
  const int64_t rows = logits.size(0);
  check_cuda(op, "targets", targets, logits);
  STD_TORCH_CHECK(targets.scalar_type() == ScalarType::Long && targets.dim() == 1 && targets.size(0) == rows &&
                      targets.is_contiguous(),
                  op, ": targets must be contiguous int64 of shape [rows]");
  if (row_scale) {
    check_cuda(op, "row_scale", *row_scale, logits);
    STD_TORCH_CHECK(row_scale->scalar_type() == ScalarType::Float && row_scale->dim() == 1 &&
                        row_scale->size(0) == rows && row_scale->is_contiguous(),
                    op, ": row_scale must be contiguous float32 of shape [rows]");
  }
  STD_TORCH_CHECK(label_smoothing >= 0 && label_smoothing <= 1, op, ": label_smoothing must be in [0, 1]");
  STD_TORCH_CHECK(softcap >= 0, op, ": softcap must be >= 0 (0: none)");
  torch::stable::accelerator::DeviceGuard guard(logits.get_device_index());
  Tensor loss = rows_of_floats(logits, rows);
  scratchformer::CrossEntropyChunk args{};
  args.dtype = cuda_dtype(op, logits.scalar_type());
  args.logits = logits.data_ptr();
  args.stride = logits.stride(0);
  args.targets = static_cast<const int64_t*>(targets.data_ptr());
  args.row_scale = row_scale ? static_cast<const float*>(row_scale->data_ptr()) : nullptr;
  args.scale = float(scale);
  args.ignore_index = ignore_index;
  args.label_smoothing = float(label_smoothing);
  args.softcap = float(softcap);
  args.loss = static_cast<float*>(loss.data_ptr());
  args.rows = rows;
  args.V = int(logits.size(1));
  args.grad = grad;
  const char* err = scratchformer::launch_cross_entropy(args, current_stream(logits));
  STD_TORCH_CHECK(err == nullptr, op, ": CUDA launch failed: ", err);
  return loss;
}

// ---- causal attention ------------------------------------------------------------------------

scratchformer::Strides strides_of(const Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

// A [B, H, T, D] input on q's device with q's dtype.
void check_attention_input(const char* op, const char* name, const Tensor& t, const Tensor& q) {
  check_cuda(op, name, t, q);
  STD_TORCH_CHECK(t.dim() == 4, op, ": ", name, " must be 4-D [batch, heads, time, head_dim], got ", t.dim(),
                  " dimensions");
  STD_TORCH_CHECK(t.scalar_type() == q.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
                  ", q has ", q.scalar_type(), "; they must match");
}

// t as the kernels read it: unit stride along head_dim, a 16-byte aligned address and strides
// (the kernels read 16-byte vectors). Copied only when it is not already.
Tensor kernel_layout(Tensor t) {
  auto ok = [](const Tensor& x) {
    if (x.stride(3) != 1 || reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 != 0) return false;
    const int64_t bytes = int64_t(x.element_size());
    for (int d = 0; d < 3; ++d)  // the stride of a dimension of size 1 is never used
      if (x.size(d) > 1 && x.stride(d) * bytes % 16 != 0) return false;
    return true;
  };
  if (!ok(t)) t = torch::stable::contiguous(t);
  if (!ok(t)) t = torch::stable::clone(t);  // contiguous but misaligned (a view at an odd offset)
  return t;
}

scratchformer::AttentionShape attention_shape(const char* op, const Tensor& q, const Tensor& k, const Tensor& v) {
  STD_TORCH_CHECK(q.is_cuda(), op, ": q must be a CUDA tensor");
  check_attention_input(op, "q", q, q);
  check_attention_input(op, "k", k, q);
  check_attention_input(op, "v", v, q);
  cuda_dtype(op, q.scalar_type());
  for (int d = 0; d < 4; ++d)
    STD_TORCH_CHECK(k.size(d) == v.size(d), op, ": k and v must have the same shape");
  STD_TORCH_CHECK(k.size(0) == q.size(0) && k.size(3) == q.size(3), op,
                  ": q and k/v must agree on batch and head_dim");
  const int64_t heads = q.size(1), kv_heads = k.size(1), t_q = q.size(2), t_k = k.size(2), dim = q.size(3);
  STD_TORCH_CHECK(kv_heads >= 1 && heads % kv_heads == 0, op, ": the ", heads,
                  " query heads must be a multiple of the ", kv_heads, " key/value heads");
  STD_TORCH_CHECK(1 <= t_q && t_q <= t_k && t_k <= INT32_MAX, op, ": need 1 <= query length <= key length < 2^31, got ",
                  t_q, " queries and ", t_k, " keys");
  STD_TORCH_CHECK(scratchformer::attention_head_dim_supported(int(dim)), op, ": head_dim ", dim,
                  " is not supported (32, 64, 96 or 128)");
  STD_TORCH_CHECK(q.size(0) >= 1 && q.size(0) * heads <= 65535, op, ": batch * heads must be in [1, 65535], got ",
                  q.size(0) * heads);
  return {int(q.size(0)), int(heads), int(kv_heads), int(t_q), int(t_k), int(dim)};
}

// first_key as the kernels read it (kernels.h), or nullptr. Its values are the Python side's
// to get right (nondecreasing, at most each query's position): checking them would cost a sync.
const int* first_key_of(const char* op, const std::optional<Tensor>& first_key, const Tensor& q) {
  if (!first_key) return nullptr;
  check_cuda(op, "first_key", *first_key, q);
  STD_TORCH_CHECK(first_key->scalar_type() == ScalarType::Int && first_key->dim() == 2 &&
                      first_key->size(0) == q.size(0) && first_key->size(1) == q.size(2) && first_key->is_contiguous(),
                  op, ": first_key must be contiguous int32 [batch, queries]");
  return static_cast<const int*>(first_key->data_ptr());
}

std::tuple<Tensor, Tensor> attention_fwd(Tensor q, Tensor k, Tensor v, std::optional<Tensor> first_key,
                                         std::optional<Tensor> sinks, double softcap, double scale) {
  const char* op = "scratchformer::attention_fwd";
  // The forward takes each row's max of the raw scores and scales after it: right for scale > 0.
  STD_TORCH_CHECK(scale > 0, op, ": scale must be positive, got ", scale, "; use backend=\"reference\" for others");
  const auto shape = attention_shape(op, q, k, v);
  q = kernel_layout(q);
  k = kernel_layout(k);
  v = kernel_layout(v);
  torch::stable::accelerator::DeviceGuard guard(q.get_device_index());
  const int64_t rows = int64_t(shape.batch) * shape.heads * shape.t_q;
  Tensor out = torch::stable::new_empty(q, {shape.batch, shape.heads, shape.t_q, shape.head_dim});
  Tensor lse = torch::stable::new_empty(q, {shape.batch, shape.heads, shape.t_q}, ScalarType::Float);
  scratchformer::AttentionForward args{};
  args.dtype = cuda_dtype(op, q.scalar_type());
  args.shape = shape;
  args.q = q.data_ptr();
  args.k = k.data_ptr();
  args.v = v.data_ptr();
  args.q_stride = strides_of(q);
  args.k_stride = strides_of(k);
  args.v_stride = strides_of(v);
  args.first_key = first_key_of(op, first_key, q);
  STD_TORCH_CHECK(softcap >= 0, op, ": softcap must be positive, or 0 for none; got ", softcap);
  args.softcap = float(softcap);
  if (sinks) {
    check_cuda(op, "sinks", *sinks, q);
    STD_TORCH_CHECK(sinks->scalar_type() == ScalarType::Float && sinks->dim() == 1 && sinks->size(0) == shape.heads &&
                        sinks->is_contiguous(),
                    op, ": sinks must be contiguous float32 [query heads]");
    args.sinks = static_cast<const float*>(sinks->data_ptr());
  }
  args.scale = float(scale);
  args.out = out.data_ptr();
  args.lse = static_cast<float*>(lse.data_ptr());
  args.splits = scratchformer::attention_forward_splits(shape, args.dtype);
  Tensor partial = torch::stable::new_empty(q, {args.splits > 1 ? args.splits * rows * (shape.head_dim + 1) : 0},
                                            ScalarType::Float);
  if (args.splits > 1) {
    args.partial_out = static_cast<float*>(partial.data_ptr());
    args.partial_lse = args.partial_out + args.splits * rows * shape.head_dim;
  }
  const char* err = scratchformer::launch_attention_forward(args, current_stream(q));
  STD_TORCH_CHECK(err == nullptr, op, ": CUDA launch failed: ", err);
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor> attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse,
                                                 std::optional<Tensor> dlse, std::optional<Tensor> first_key,
                                                 double softcap, double scale) {
  const char* op = "scratchformer::attention_bwd";
  const auto shape = attention_shape(op, q, k, v);
  check_attention_input(op, "dout", dout, q);
  check_attention_input(op, "out", out, q);
  for (int d = 0; d < 4; ++d)
    STD_TORCH_CHECK(dout.size(d) == q.size(d) && out.size(d) == q.size(d), op, ": dout and out must have q's shape");
  STD_TORCH_CHECK(out.is_contiguous(), op, ": out must be contiguous (the forward's output)");
  q = kernel_layout(q);
  k = kernel_layout(k);
  v = kernel_layout(v);
  dout = kernel_layout(dout);
  check_cuda(op, "lse", lse, q);
  STD_TORCH_CHECK(lse.scalar_type() == ScalarType::Float && lse.dim() == 3 && lse.size(0) == shape.batch &&
                      lse.size(1) == shape.heads && lse.size(2) == shape.t_q && lse.is_contiguous(),
                  op, ": lse must be contiguous float32 [batch, heads, queries] (the forward's)");
  if (dlse) {
    check_cuda(op, "dlse", *dlse, q);
    STD_TORCH_CHECK(dlse->scalar_type() == ScalarType::Float && dlse->dim() == 3 && dlse->size(0) == shape.batch &&
                        dlse->size(1) == shape.heads && dlse->size(2) == shape.t_q && dlse->is_contiguous(),
                    op, ": dlse must be contiguous float32 shaped like lse");
  }
  torch::stable::accelerator::DeviceGuard guard(q.get_device_index());
  Tensor dq = torch::stable::new_empty(q, {shape.batch, shape.heads, shape.t_q, shape.head_dim});
  Tensor dk = torch::stable::new_empty(q, {shape.batch, shape.kv_heads, shape.t_k, shape.head_dim});
  Tensor dv = torch::stable::new_empty(q, {shape.batch, shape.kv_heads, shape.t_k, shape.head_dim});
  Tensor delta = torch::stable::new_empty(q, {int64_t(shape.batch) * shape.heads * shape.t_q}, ScalarType::Float);
  scratchformer::AttentionBackward args{};
  args.dtype = cuda_dtype(op, q.scalar_type());
  args.shape = shape;
  args.q = q.data_ptr();
  args.k = k.data_ptr();
  args.v = v.data_ptr();
  args.dout = dout.data_ptr();
  args.q_stride = strides_of(q);
  args.k_stride = strides_of(k);
  args.v_stride = strides_of(v);
  args.dout_stride = strides_of(dout);
  args.out = out.data_ptr();
  args.lse = static_cast<const float*>(lse.data_ptr());
  args.dlse = dlse ? static_cast<const float*>(dlse->data_ptr()) : nullptr;
  args.first_key = first_key_of(op, first_key, q);
  STD_TORCH_CHECK(softcap >= 0, op, ": softcap must be positive, or 0 for none; got ", softcap);
  args.softcap = float(softcap);
  args.scale = float(scale);
  args.delta = static_cast<float*>(delta.data_ptr());
  args.dq = dq.data_ptr();
  args.dk = dk.data_ptr();
  args.dv = dv.data_ptr();
  args.dkv_splits = scratchformer::attention_backward_dkv_splits(shape, args.dtype, current_stream(q));
  Tensor dkv_partial = torch::stable::new_empty(
      q, {args.dkv_splits > 1 ? 2 * int64_t(args.dkv_splits) * dk.numel() : 0}, ScalarType::Float);
  args.dkv_partial = static_cast<float*>(dkv_partial.data_ptr());
  const char* err = scratchformer::launch_attention_backward(args, current_stream(q));
  STD_TORCH_CHECK(err == nullptr, op, ": CUDA launch failed: ", err);
  return {dq, dk, dv};
}

}  // namespace

// The schemas exist in every build, so fake implementations and autograd register everywhere;
// the kernels exist where CUDA was compiled in.
STABLE_TORCH_LIBRARY(scratchformer, m) {
  m.def("layer_norm_fwd(Tensor x, Tensor weight, Tensor bias, Tensor? residual, float eps) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("layer_norm_bwd(Tensor dy, Tensor x, Tensor weight, Tensor mean, Tensor rstd, Tensor? grad_h) -> (Tensor, Tensor, Tensor)");
  m.def("rms_norm_fwd(Tensor x, Tensor weight, Tensor? residual, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("rms_norm_bwd(Tensor dy, Tensor x, Tensor weight, Tensor rstd, Tensor? grad_h) -> (Tensor, Tensor)");
  m.def("cross_entropy_chunk(Tensor(a!) logits, Tensor targets, Tensor? row_scale, float scale, int ignore_index, "
        "float label_smoothing, float softcap, bool grad) -> Tensor");
  m.def("attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? first_key, Tensor? sinks, float softcap, float scale) -> (Tensor, Tensor)");
  m.def("attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? dlse, Tensor? first_key, float softcap, float scale) -> (Tensor, Tensor, Tensor)");
}

#define SCRATCHFORMER_IMPL_ALL(m)                         \
  m.impl("layer_norm_fwd", TORCH_BOX(&layer_norm_fwd));   \
  m.impl("layer_norm_bwd", TORCH_BOX(&layer_norm_bwd));   \
  m.impl("rms_norm_fwd", TORCH_BOX(&rms_norm_fwd));       \
  m.impl("rms_norm_bwd", TORCH_BOX(&rms_norm_bwd));       \
  m.impl("cross_entropy_chunk", TORCH_BOX(&cross_entropy_chunk)); \
  m.impl("attention_fwd", TORCH_BOX(&attention_fwd));     \
  m.impl("attention_bwd", TORCH_BOX(&attention_bwd))

#ifdef SCRATCHFORMER_CUDA
STABLE_TORCH_LIBRARY_IMPL(scratchformer, CUDA, m) { SCRATCHFORMER_IMPL_ALL(m); }
#endif
// CPU tensors meet the ops' own checks, which refuse them (see the top of this file).
STABLE_TORCH_LIBRARY_IMPL(scratchformer, CPU, m) { SCRATCHFORMER_IMPL_ALL(m); }

// A Python module too, so `import scratchformer._kernels` loads the library (which registers the
// ops above) and tells what was compiled into it.
namespace {

PyObject* cuda_archs(PyObject*, PyObject*) {
#ifdef SCRATCHFORMER_CUDA
  // The cubins' compute capabilities, from setup.py's arch list (nvcc's __CUDA_ARCH_LIST__ names
  // only virtual architectures, which several cubins share).
  static constexpr int archs[] = {SCRATCHFORMER_CUDA_ARCHS};
  constexpr int n = sizeof(archs) / sizeof(archs[0]);
  PyObject* out = PyTuple_New(n);
  for (int i = 0; i < n; ++i) PyTuple_SetItem(out, i, PyLong_FromLong(archs[i]));
  return out;
#else
  return PyTuple_New(0);
#endif
}

PyObject* ptx_arch(PyObject*, PyObject*) {
#ifdef SCRATCHFORMER_CUDA
  return PyLong_FromLong(scratchformer::compiled_ptx_arch());
#else
  return PyLong_FromLong(0);
#endif
}

PyObject* cuda_version(PyObject*, PyObject*) {
#ifdef SCRATCHFORMER_CUDA
  const int v = scratchformer::compiled_cuda_version();
  return PyUnicode_FromFormat("%d.%d", v / 1000, (v % 1000) / 10);
#else
  Py_RETURN_NONE;
#endif
}

PyObject* torch_version(PyObject*, PyObject*) {
  return PyUnicode_FromFormat("%d.%d.%d", TORCH_VERSION_MAJOR, TORCH_VERSION_MINOR,
                              TORCH_VERSION_PATCH);
}

PyMethodDef methods[] = {
    {"cuda_archs", cuda_archs, METH_NOARGS,
     "Compute capabilities the CUDA kernels were compiled for (e.g. (80, 90)); () without CUDA."},
    {"ptx_arch", ptx_arch, METH_NOARGS,
     "Compute capability whose PTX is embedded (newer GPUs compile it at load time), or 0."},
    {"cuda_version", cuda_version, METH_NOARGS,
     "CUDA version the kernels were compiled with, or None without CUDA."},
    {"torch_version", torch_version, METH_NOARGS, "torch version whose headers built this."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_kernels", "scratchformer's registered ops",
                          -1, methods};

}  // namespace

extern "C" PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&module_def); }
