// The attention options of every Python entry point, built in one place. The nanobind entries
// (binding.cpp) receive them typed by nanobind; the METH_FASTCALL eager entries (eager_forward.cpp)
// read them from raw Python objects (one parser there, eager_options); both hand the values here.
#pragma once

#include <cstdint>
#include <optional>

#include "flashattn/options.h"

namespace flashattn_python {

inline flashattn::Options make_options(std::optional<float> softmax_scale, bool causal, int window_left,
                                       int window_right, float softcap, std::optional<flashattn::Tensor> alibi_slopes,
                                       bool deterministic, int num_threads, int num_splits, void* stream) {
  flashattn::Options o;
  o.softmax_scale = softmax_scale;
  o.causal = causal;
  o.window_left = window_left;
  o.window_right = window_right;
  o.softcap = softcap;
  o.alibi_slopes = alibi_slopes;
  o.deterministic = deterministic;
  o.num_threads = num_threads;
  o.num_splits = num_splits;
  o.stream = stream;
  return o;
}

}  // namespace flashattn_python
