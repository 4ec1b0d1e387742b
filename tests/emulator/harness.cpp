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

const char* emulated_attention_forward(int dtype, const int* shape, int sm_count, const void* q, const long long* q_stride,
                                       const void* k, const long long* k_stride, const void* v,
                                       const long long* v_stride, float scale, void* out, float* lse, int* splits) {
  emu::sm_count = sm_count;
  AttentionForward a{};
  a.dtype = DType(dtype);
  a.shape = shape_of(shape);
  a.q = q, a.k = k, a.v = v;
  a.q_stride = strides(q_stride), a.k_stride = strides(k_stride), a.v_stride = strides(v_stride);
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
  return launch_attention_forward(a, nullptr);
}

const char* emulated_attention_backward(int dtype, const int* shape, const void* q, const long long* q_stride,
                                        const void* k, const long long* k_stride, const void* v,
                                        const long long* v_stride, const void* dout, const long long* dout_stride,
                                        const void* out, const float* lse, const float* dlse, float scale, void* dq,
                                        void* dk, void* dv) {
  AttentionBackward a{};
  a.dtype = DType(dtype);
  a.shape = shape_of(shape);
  a.q = q, a.k = k, a.v = v, a.dout = dout;
  a.q_stride = strides(q_stride), a.k_stride = strides(k_stride), a.v_stride = strides(v_stride);
  a.dout_stride = strides(dout_stride);
  a.out = out;
  a.lse = lse;
  a.dlse = dlse;
  a.scale = scale;
  std::vector<float> delta((size_t)a.shape.batch * a.shape.heads * a.shape.t_q);
  a.delta = delta.data();
  a.dq = dq, a.dk = dk, a.dv = dv;
  return launch_attention_backward(a, nullptr);
}
}
