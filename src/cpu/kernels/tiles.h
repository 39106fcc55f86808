// Block sizes of the CPU kernels, in one place.
#pragma once

#include "cpu/kernels/simd.h"

namespace flashattn::cpu::FLASHATTN_CPU_ISA {

// Query rows per task: a multiple of the vector width (the transposed score block's rows are
// vectors of queries) and large enough that Q^T packing and the acc rescale are amortised.
inline constexpr int kBlockM = 128;
// Keys per block: S^T (kBlockN x kBlockM fp32 = 64 KiB) and the value block stay in L2.
inline constexpr int kBlockN = 128;

static_assert(kBlockM % 16 == 0, "kBlockM must be a multiple of every ISA's vector width");

}  // namespace flashattn::cpu::FLASHATTN_CPU_ISA
