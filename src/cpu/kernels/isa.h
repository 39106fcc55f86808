// Each file under cpu/kernels/ is compiled once per instruction set (see src/CMakeLists.txt)
// with FLASHATTN_CPU_ISA set to avx512, avx2 or generic. Everything such a file defines lives
// in namespace flashattn::cpu::<isa>, so the copies never collide at link time, and
// cpu/dispatch.cpp picks one at run time.
#pragma once

#include "cpu/kernels/entry_points.h"

#ifndef FLASHATTN_CPU_ISA
#error "cpu/kernels/ files are built per ISA: FLASHATTN_CPU_ISA must be defined"
#endif

