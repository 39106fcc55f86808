// The per-ISA kernel entry points, declared for cpu/dispatch.cpp and defined in the per-ISA
// builds of cpu/kernels/*.cpp (see isa.h).
#pragma once

#include "core/params.h"

#define FLASHATTN_DECLARE_CPU_KERNELS(isa)  \
  namespace flashattn::cpu::isa {           \
  void forward(const AttnParams& params);   \
  void backward(const BwdParams& params);   \
  }

FLASHATTN_DECLARE_CPU_KERNELS(generic)
FLASHATTN_DECLARE_CPU_KERNELS(avx2)
FLASHATTN_DECLARE_CPU_KERNELS(avx512)
