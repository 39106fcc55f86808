// The CUDA backend's entry points. Declared always, defined only in builds with CUDA.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/kvcache_params.h"
#include "core/params.h"

namespace flashattn::cuda {

void forward(const AttnParams& params);
// Throws what forward(params) would throw before launching (dtype, 16-byte rows, an instantiated
// head dim): forward_kvcache calls it before its append, so a call the kernels refuse writes nothing.
void check_forward_supported(const AttnParams& params);
// The name of the kernel forward(params) runs ("flash_fwd_sm90<...>" or "flash_fwd_sm80<...>"),
// after the FLASHATTN_CUDA_FORWARD override (cuda/sm90/dispatch.h).
std::string forward_kernel(const AttnParams& params);
void backward(const BwdParams& params);
// The name of the main kernel backward(params) runs, after the FLASHATTN_CUDA_BACKWARD override
// (cuda/sm90/bwd_dispatch.h).
std::string backward_kernel(const BwdParams& params);
void merge(const MergeParams& params);
// Appends the new tokens into the cache (rotary on the keys, kvcache_append.cu), then the forward
// over the cache with q rotated: all on the stream, nothing read back on the host.
void forward_kvcache(const KVCacheParams& params);
void sink_gradient(const SinkGradParams& params);
// FLASHATTN_CHECK_LENGTHS: copies the int32 arrays sources[i] (counts[i] elements each, device
// memory) into `host`, back to back, with one device-to-host copy on `stream` and one synchronisation.
void gather_to_host(const std::vector<const int32_t*>& sources, const std::vector<int64_t>& counts, int32_t* host,
                    int device, void* stream);
// forward() for a call with attention sinks: the forward without them, then the fold (sinks.cu).
void forward_with_sinks(const AttnParams& params);
bool available();  // a usable sm80+ GPU and driver

}  // namespace flashattn::cuda
