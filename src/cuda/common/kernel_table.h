// Looking up a kernel in the generated dispatch table (cuda/inst/kernel_table.h): every family's
// table is an array of KernelEntry built from its X-macro, and every dispatcher finds its
// instantiation here, the same way: the smallest instantiated head dim that holds the call's
// (q/k and v columns beyond the real head dims are zero-filled and never stored).
#pragma once

#include <string>

#include "flashattn/tensor.h"

namespace flashattn::cuda {

template <typename Launch>
struct KernelEntry {
  int head_dim = 0;  // 0: the sentinel that ends every table (a build may instantiate none)
  DType dtype = DType::f32;
  Launch launch{};
};

// Builds one entry of a table from the X-macro's (head dim, dtype tag, C++ type); the caller
// defines LAUNCH(hdim, T), the launcher instantiation to point at.
#define FLASHATTN_KERNEL_ENTRY(hdim, tag, T) {hdim, ::flashattn::DType::tag, LAUNCH(hdim, T)},

// The entry of `table` for `dtype` with the smallest head dim >= need; null when none.
template <typename Launch, int N>
const KernelEntry<Launch>* find_kernel(const KernelEntry<Launch> (&table)[N], int need, DType dtype) {
  for (const KernelEntry<Launch>& e : table)
    if (e.head_dim >= need && e.dtype == dtype) return &e;
  return nullptr;
}

// "64, 128" (the head dims a table holds, for error messages); "none" when empty.
template <typename Launch, int N>
std::string head_dims_of(const KernelEntry<Launch> (&table)[N]) {
  std::string s;
  int last = 0;
  for (const KernelEntry<Launch>& e : table)
    if (e.head_dim && e.head_dim != last) {
      s += (s.empty() ? "" : ", ") + std::to_string(e.head_dim);
      last = e.head_dim;
    }
  return s.empty() ? "none" : s;
}

}  // namespace flashattn::cuda
