// The CUDA backend's entry points. Declared always, defined only in builds with CUDA.
#pragma once

#include <string>

#include "core/params.h"

namespace flashattn::cuda {

void forward(const AttnParams& params);
// The name of the kernel forward(params) runs ("flash_fwd_sm90<...>" or "flash_fwd_sm80<...>"),
// after the FLASHATTN_CUDA_FORWARD override (cuda/sm90/dispatch.h).
std::string forward_kernel(const AttnParams& params);
void backward(const BwdParams& params);
// The name of the main kernel backward(params) runs, after the FLASHATTN_CUDA_BACKWARD override
// (cuda/sm90/bwd_dispatch.h).
std::string backward_kernel(const BwdParams& params);
void merge(const MergeParams& params);
bool available();  // a usable sm80+ GPU and driver

}  // namespace flashattn::cuda
