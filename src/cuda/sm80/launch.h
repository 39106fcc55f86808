// The sm80 forward instantiations, one per (head dim, dtype), defined in src/cuda/inst/.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "core/params.h"

namespace flashattn::cuda::sm80 {

// Runs the forward on `device` (already current) for head dims up to kHeadDim (q/k and v
// columns beyond the real head dims are zero-filled on load and never stored).
template <int kHeadDim, typename T>
void run_fwd(const AttnParams& p, int device, cudaStream_t stream);

}  // namespace flashattn::cuda::sm80
