// Whether a call runs on the sm90a (Hopper) kernels, and running them. Called from cuda/forward.cu
// and cuda/backward.cu before the sm80 kernels; compiled only when the build includes the 90a arch.
//
// Knobs (core/knobs.h): FLASHATTN_CUDA_FORWARD / FLASHATTN_CUDA_BACKWARD = auto picks sm90 wherever
// it covers the call; sm80 keeps every call on the sm80 kernels (to compare the two, and to test
// them on an H100); sm90 makes a call the sm90 kernels do not cover an error that says why (tests
// use it to prove the sm90 path ran). FLASHATTN_SM90_SCHEDULE, _NARROW, _PERSISTENT, _MAX_CTAS
// steer the forward's plan (measurements and tests).
#pragma once

#include <cuda_runtime.h>

#include <string>

#include "core/params.h"
#include "cuda/sm90/launch.h"

namespace flashattn::cuda::sm90 {

struct Selection {
  bool use = false;    // the sm90 kernel takes the call
  int head_dim = 0;    // the instantiation it runs (the padded head dim)
  FwdPlan plan;        // forward only
  std::string why_not;  // when !use: the first reason the sm90 kernels do not cover the call
};
using BwdSelection = Selection;

// Throw flashattn::Unsupported when the knob forces sm90 and the call is not covered.
Selection select(const AttnParams& p, int device);
BwdSelection select_bwd(const BwdParams& p, int device);

void run(const AttnParams& p, const Selection& selection, int device, cudaStream_t stream);
void run(const BwdParams& p, const BwdSelection& selection, int device, cudaStream_t stream);

// The selected kernel's name (built only when asked: tests, benchmarks, error traces).
std::string kernel_name(const AttnParams& p, const Selection& selection);
std::string kernel_name(const BwdParams& p, const BwdSelection& selection);

}  // namespace flashattn::cuda::sm90
