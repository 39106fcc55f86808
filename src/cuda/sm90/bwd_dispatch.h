// Whether a backward call runs on the sm90a kernel, and running it. Called from cuda/backward.cu
// before the sm80 kernel; compiled only when the build includes the 90a arch.
//
// FLASHATTN_CUDA_BACKWARD (environment): unset or "auto" picks sm90 wherever it covers the call;
// "sm80" keeps every call on the sm80 kernel (to compare the two, and to test it on an H100);
// "sm90" makes a call the sm90 kernel does not cover an error that says why.
#pragma once

#include <cuda_runtime.h>

#include <string>

#include "core/params.h"

namespace flashattn::cuda::sm90 {

struct BwdSelection {
  bool use = false;     // the sm90 kernel takes the call
  int head_dim = 0;     // the instantiation it runs (the padded head dim)
  std::string kernel;   // its name, when use
  std::string why_not;  // when !use
};

// Throws flashattn::Unsupported when FLASHATTN_CUDA_BACKWARD=sm90 and the call is not covered, or
// when the variable holds something else than auto, sm80 or sm90.
BwdSelection select_bwd(const BwdParams& p, int device);

void run(const BwdParams& p, const BwdSelection& selection, int device, cudaStream_t stream);

}  // namespace flashattn::cuda::sm90
