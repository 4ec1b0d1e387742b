// C entry points to the emulated attention kernels for tests/test_attention_emulated.py: the
// same launchers as csrc/kernels/ops.cpp calls, with the buffers passed in from Python.
#include <vector>

#include "emulator.h"
#include "kernels.h"

using namespace scratchformer;

namespace {
Strides strides(const long long* s) { return {s[0], s[1], s[2]}; }
AttentionShape shape_of(const int* s) { return {s[0], s[1], s[2], s[3], s[4], s[5]}; }
}  // namespace

extern "C" {

const char* emulated_attention_forward(int dtype, const int* shape, int sm_count, int arch, const void* q, const long long* q_stride,
                                       const void* k, const long long* k_stride, const void* v,
                                       const long long* v_stride, const int* first_key, const float* sinks,
                                       float softcap, float scale, void* out, float* lse, int* splits) {
  emu::sm_count = sm_count;
  emu::compute_capability = arch;
  AttentionForward a{};
  a.dtype = DType(dtype);
  a.shape = shape_of(shape);
  a.q = q, a.k = k, a.v = v;
  a.q_stride = strides(q_stride), a.k_stride = strides(k_stride), a.v_stride = strides(v_stride);
  a.first_key = first_key;
  a.sinks = sinks;
  a.softcap = softcap;
  a.scale = scale;
  a.out = out;
  a.lse = lse;
  a.splits = attention_forward_splits(a.shape, a.dtype);
  *splits = a.splits;
  const long long rows = (long long)a.shape.batch * a.shape.heads * a.shape.t_q;
  std::vector<float> partial(a.splits > 1 ? a.splits * rows * (a.shape.head_dim + 1) : 0);
  if (a.splits > 1) {
    a.partial_out = partial.data();
    a.partial_lse = partial.data() + a.splits * rows * a.shape.head_dim;
  }
  const char* err = launch_attention_forward(a, nullptr);
  emu::compute_capability = 80;
  return err;
}

const char* emulated_attention_backward(int dtype, const int* shape, const void* q, const long long* q_stride,
                                        const void* k, const long long* k_stride, const void* v,
                                        const long long* v_stride, const void* dout, const long long* dout_stride,
                                        const void* out, const float* lse, const float* dlse, const int* first_key,
                                        float softcap, float scale, void* dq,
                                        void* dk, void* dv, int sm_count, int arch, int* dkv_splits) {
  emu::sm_count = sm_count;
  emu::compute_capability = arch;
  AttentionBackward a{};
  a.dtype = DType(dtype);
  a.shape = shape_of(shape);
  a.q = q, a.k = k, a.v = v, a.dout = dout;
  a.q_stride = strides(q_stride), a.k_stride = strides(k_stride), a.v_stride = strides(v_stride);
  a.dout_stride = strides(dout_stride);
  a.out = out;
  a.lse = lse;
  a.dlse = dlse;
  a.first_key = first_key;
  a.softcap = softcap;
  a.scale = scale;
  std::vector<float> delta((size_t)a.shape.batch * a.shape.heads * a.shape.t_q);
  a.delta = delta.data();
  a.dq = dq, a.dk = dk, a.dv = dv;
  a.dkv_splits = *dkv_splits = attention_backward_dkv_splits(a.shape, a.dtype, nullptr);
  const size_t dk_size = size_t(a.shape.batch) * a.shape.kv_heads * a.shape.t_k * a.shape.head_dim;
  std::vector<float> partial(a.dkv_splits > 1 ? 2 * a.dkv_splits * dk_size : 0);
  a.dkv_partial = partial.data();
  const char* err = launch_attention_backward(a, nullptr);
  emu::compute_capability = 80;
  return err;
}
}

extern "C" {

const char* emulated_layer_norm_forward(int dtype, int weight_dtype, const void* x, long long x_stride,
                                        const void* residual, long long r_stride, const void* weight,
                                        const void* bias, void* y, void* h, float* mean, float* rstd,
                                        long long rows, int C, float eps) {
  LayerNormForward a{};
  a.dtype = DType(dtype);
  a.weight_dtype = DType(weight_dtype);
  a.x = x, a.x_stride = x_stride;
  a.residual = residual, a.r_stride = r_stride;
  a.weight = weight, a.bias = bias;
  a.y = y, a.h = h, a.mean = mean, a.rstd = rstd;
  a.rows = rows, a.C = C, a.eps = eps;
  return launch_layer_norm_forward(a, nullptr);
}

const char* emulated_cross_entropy(int dtype, void* logits, long long stride, const int64_t* targets,
                                   const float* row_scale, float scale, long long ignore_index, float label_smoothing,
                                   float softcap, float* loss, long long rows, int V, bool grad) {
  CrossEntropyChunk a{};
  a.dtype = DType(dtype);
  a.logits = logits, a.stride = stride, a.targets = targets, a.row_scale = row_scale;
  a.scale = scale, a.ignore_index = ignore_index, a.label_smoothing = label_smoothing, a.softcap = softcap;
  a.loss = loss, a.rows = rows, a.V = V, a.grad = grad;
  return launch_cross_entropy(a, nullptr);
}

const char* emulated_layer_norm_backward(int dtype, int weight_dtype, const void* dy, const void* x,
                                         long long x_stride, const void* weight, const float* mean,
                                         const float* rstd, const void* grad_h, void* dx, void* dweight,
                                         void* dbias, long long rows, int C) {
  LayerNormBackward a{};
  a.dtype = DType(dtype);
  a.weight_dtype = DType(weight_dtype);
  a.dy = dy, a.x = x, a.x_stride = x_stride, a.weight = weight;
  a.mean = mean, a.rstd = rstd, a.grad_h = grad_h;
  a.dx = dx, a.dweight = dweight, a.dbias = dbias;
  std::vector<float> partial(2 * size_t(layer_norm_backward_chunks(rows, C)) * C);
  a.partial = partial.data();
  a.rows = rows, a.C = C;
  return launch_layer_norm_backward(a, nullptr);
}
}
