// Whether two strided views can share a byte of memory: the validation uses it to refuse
// outputs that alias inputs or each other (a kernel would read what it already overwrote).
#pragma once

#include "flashattn/tensor.h"

namespace flashattn::core {

// True when some element of `a` and some element of `b` share a byte. Exact for two views with
// the same dtype and strides (the slices of one packed qkv or dqkv buffer, which interleave
// without sharing an element); otherwise it compares the address ranges the views span, which
// may flag views that interleave without sharing (none of the layouts flash_attn users pass).
bool may_overlap(const Tensor& a, const Tensor& b);

}  // namespace flashattn::core
