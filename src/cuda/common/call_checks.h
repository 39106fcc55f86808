// What every CUDA kernel family requires of a call beyond core/validate.cpp's checks, in one
// place for the forward, the backward and decoding.
#pragma once

#include "core/params.h"

namespace flashattn::cuda {

// fp16 / bf16, head dims that are multiples of 8, and 16-byte aligned rows of q, k, v, out:
// the kernels move rows as 16-byte vectors. Throws flashattn::Error naming the argument.
void check_forward_call(const AttnParams& p);
// The same for a backward call, over its gradients too.
void check_backward_call(const BwdParams& p);

}  // namespace flashattn::cuda
