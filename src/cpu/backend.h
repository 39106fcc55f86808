// The CPU backend's entry points (tiled, SIMD, OpenMP-threaded).
#pragma once

#include "core/params.h"

namespace flashattn::cpu {

void forward(const AttnParams& params);
void backward(const BwdParams& params);
void merge(const MergeParams& params);

// The instruction set the kernels were dispatched to on this machine: "avx512", "avx2", "generic".
const char* isa_name();

}  // namespace flashattn::cpu
