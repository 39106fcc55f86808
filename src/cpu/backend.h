// The CPU backend's entry points (tiled, SIMD, OpenMP-threaded).
#pragma once

#include "core/kvcache_params.h"
#include "core/params.h"

namespace flashattn::cpu {

void forward(const AttnParams& params);
void backward(const BwdParams& params);
void merge(const MergeParams& params);
// Appends the new tokens (rotary on the keys), then attends the (rotated) q to the cache.
void forward_kvcache(const KVCacheParams& params);
// dsinks[h] = -sum over rows of exp(sinks[h] - lse) * rowsum(dout * out) (core/sink.h).
void sink_gradient(const SinkGradParams& params);

// The instruction set the kernels were dispatched to on this machine: "avx512", "avx2", "generic".
const char* isa_name();

}  // namespace flashattn::cpu
