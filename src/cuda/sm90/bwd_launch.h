// The sm90 backward instantiations, one per (head dim, dtype), defined in src/cuda/inst/.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <string>

#include "core/params.h"

namespace flashattn::cuda::sm90 {

// Runs the backward (preprocess, main kernel, postprocess) on `device` (already current, sm90) for
// head dims up to kHeadDim, with a stream-ordered fp32 workspace; no host synchronisation.
template <int kHeadDim, typename T>
void run_bwd(const BwdParams& p, int device, cudaStream_t stream);

// The name of the main kernel run_bwd<kHeadDim, T> launches.
template <int kHeadDim, typename T>
std::string bwd_kernel_name();

}  // namespace flashattn::cuda::sm90
