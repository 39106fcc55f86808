// The CPU decode path (few query rows per kv head, long keys): see decode.cpp.
#pragma once

#include "core/params.h"
#include "cpu/kernels/isa.h"

namespace flashattn::cpu::FLASHATTN_CPU_ISA {

// True when every sequence has at most kDecodeRows (query, head) rows per kv head.
bool decode_applies(const AttnParams& p);
void forward_decode(const AttnParams& p, int threads);

}  // namespace flashattn::cpu::FLASHATTN_CPU_ISA
