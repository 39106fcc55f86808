// Whether a forward call runs on the sm90a kernel, and running it. Called from cuda/forward.cu
// before the sm80 kernel; compiled only when the build includes the 90a arch.
//
// FLASHATTN_CUDA_FORWARD (environment): unset or "auto" picks sm90 wherever it covers the call;
// "sm80" keeps every call on the sm80 kernel (to compare the two); "sm90" makes a call the sm90
// kernel does not cover an error that says why (tests use it to prove the sm90 path ran).
// FLASHATTN_SM90_SCHEDULE = serial | overlap | pingpong picks the consumer schedule in builds
// with FLASHATTN_SM90_ALL_SCHEDULES (benchmarks); other builds have only the default.
// FLASHATTN_SM90_PERSISTENT=1 / 0 forces the persistent grid (one CTA per SM) / one CTA per tile
// (measurements; by default masked calls with more than 32 query blocks per head take one per tile);
// FLASHATTN_SM90_MAX_CTAS=n caps the persistent grid (tests give each CTA many tiles).
#pragma once

#include <cuda_runtime.h>

#include <string>

#include "core/params.h"
#include "cuda/sm90/launch.h"

namespace flashattn::cuda::sm90 {

struct Selection {
  bool use = false;     // the sm90 kernel takes the call
  int head_dim = 0;     // the instantiation it runs (the padded head dim)
  FwdPlan plan;
  std::string kernel;   // its name, when use
  std::string why_not;  // when !use
};

// Throws flashattn::Unsupported when FLASHATTN_CUDA_FORWARD=sm90 and the call is not covered, or
// when the variable holds something else than auto, sm80 or sm90.
Selection select(const AttnParams& p, int device);

void run(const AttnParams& p, const Selection& selection, int device, cudaStream_t stream);

}  // namespace flashattn::cuda::sm90
