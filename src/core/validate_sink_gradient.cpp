// Validation of sink_gradient(): out/dout in the forward's layout, its LSE, the sinks and dsinks.
#include "core/checks.h"
#include "core/validate.h"

namespace flashattn::core {

SinkGradParams check_sink_gradient(const Tensor& dout, const Tensor& out, const Tensor& lse, const Tensor& sinks,
                                   const Tensor& dsinks, const VarlenLayout* layout, const Options& options) {
  const bool varlen = layout != nullptr;
  SinkGradParams p;
  check_defined(out, "out");
  check_defined(dout, "dout");
  p.device = out.device;
  p.dtype = out.dtype;
  check_compute_dtype(out, p.device);
  check_rank(out, "out", varlen ? 3 : 4, varlen ? "(total_q, heads, head_dim_v)" : "(batch, seqlen_q, heads, head_dim_v)");
  const int o = varlen ? -1 : 0;
  p.heads = int_size(out.shape[o + 2], "out", "a head count");
  p.head_dim_v = int_size(out.shape[o + 3], "out", "a head_dim_v");
  if (varlen) {
    check_defined(layout->cu_seqlens_q, "cu_seqlens_q");
    check_rank(layout->cu_seqlens_q, "cu_seqlens_q", 1, "(batch + 1)");
    if (layout->cu_seqlens_q.shape[0] < 1)
      throw Error("cu_seqlens_q", "length batch + 1 >= 1", layout->cu_seqlens_q.shape_string());
    p.batch = int_size(layout->cu_seqlens_q.shape[0] - 1, "cu_seqlens_q", "a batch size");
    p.total_q = out.shape[0];
    p.seqlen_q = layout->max_seqlen_q;
    check_dtype(layout->cu_seqlens_q, "cu_seqlens_q", DType::i32, "(cumulative sequence lengths)");
    check_device(layout->cu_seqlens_q, "cu_seqlens_q", p.device);
    p.cu_seqlens_q = static_cast<const int32_t*>(layout->cu_seqlens_q.data);
    if (p.device.kind == DeviceKind::cpu && p.cu_seqlens_q[p.batch] > p.total_q)
      throw Error("cu_seqlens_q", "last value <= the number of packed rows (" + str(p.total_q) + ")",
                  str(p.cu_seqlens_q[p.batch]));
  } else {
    p.batch = int_size(out.shape[0], "out", "a batch size");
    p.seqlen_q = out.shape[1];
    p.total_q = int64_t(p.batch) * p.seqlen_q;
  }
  check_dtype(dout, "dout", p.dtype, "(the dtype of out)");
  check_device(dout, "dout", p.device);
  check_rank(dout, "dout", out.rank, "(the shape of out)");
  for (int i = 0; i < out.rank; ++i)
    if (dout.shape[i] != out.shape[i]) throw Error("dout", "the shape of out " + out.shape_string(), dout.shape_string());
  check_last_contiguous(out, "out");
  check_last_contiguous(dout, "dout");
  p.out = const_cast<void*>(out.data);
  p.dout = dout.data;
  p.out_stride = strides_of(out, varlen);
  p.dout_stride = strides_of(dout, varlen);
  if (lse_omitted(lse)) throw Error("lse", "the forward's log-sum-exp (with the sinks)", "an empty Tensor");
  check_lse(lse, p, varlen);
  Options sink_only;
  sink_only.sinks = sinks;
  check_defined(sinks, "sinks");
  check_options(sink_only, p);
  check_defined(dsinks, "dsinks");
  check_dtype(dsinks, "dsinks", DType::f32, "(the gradient of the fp32 sinks)");
  check_device(dsinks, "dsinks", p.device);
  check_shape(dsinks, "dsinks", {p.heads}, "(heads)");
  if (dsinks.shape[0] > 1 && dsinks.stride[0] != 1)
    throw Error("dsinks", "a contiguous tensor", "stride " + str(dsinks.stride[0]));
  check_no_overlap({{&dsinks, "dsinks"}}, {{&out, "out"}, {&dout, "dout"}, {&lse, "lse"}, {&sinks, "sinks"}});
  p.dsinks = static_cast<float*>(dsinks.data);
  p.num_threads = options.num_threads;
  p.stream = options.stream;
  return p;
}

}  // namespace flashattn::core
