// The sm90 forward instantiations, one per (head dim, dtype), defined in src/cuda/inst/.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <string>

#include "core/params.h"
#include "cuda/sm90/fwd_traits.h"

namespace flashattn::cuda::sm90 {

// Host-side choices for one call, made by dispatch.cpp.
struct FwdPlan {
  Schedule schedule = Schedule::kOverlap;
  bool persistent = true;  // one CTA per SM walking the tiles; false: one CTA per tile
  int max_ctas = 0;        // > 0: at most this many persistent CTAs (tests: many tiles per CTA)
  bool narrow = false;     // fwd_tile(head_dim, true): the tile for masked calls with few query blocks
  bool score_mod = false;  // softcap / ALiBi: the kScoreMod kernel (overlap schedule only)
};

// Runs the forward on `device` (already current, sm90) for head dims up to kHeadDim (columns
// beyond the real head dims are zero-filled by TMA and never stored).
template <int kHeadDim, typename T>
void run_fwd(const AttnParams& p, const FwdPlan& plan, int device, cudaStream_t stream);

// The name of the kernel run_fwd<kHeadDim, T> launches for `plan`.
template <int kHeadDim, typename T>
std::string kernel_name(const FwdPlan& plan);

}  // namespace flashattn::cuda::sm90
