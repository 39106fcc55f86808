// Picks the CPU kernels built for the best instruction set this machine has.
#include <cstring>
#include <string>

#include "core/knobs.h"
#include "cpu/backend.h"
#include "cpu/kernels/entry_points.h"

namespace flashattn::cpu {
namespace {

struct Kernels {
  const char* name;
  void (*forward)(const AttnParams&);
  void (*backward)(const BwdParams&);
};

// FLASHATTN_CPU_ISA=generic|avx2|avx512 in the environment caps the choice (for testing
// every path on one machine); it never raises it above what the CPU supports.
Kernels select() {
  const std::string& cap = knobs().cpu_isa;
  auto allowed = [&](const char* isa) {
    if (cap.empty()) return true;
    static const char* order[] = {"generic", "avx2", "avx512"};
    int want = -1, have = -1;
    for (int i = 0; i < 3; ++i) {
      if (cap == order[i]) want = i;
      if (std::strcmp(isa, order[i]) == 0) have = i;
    }
    return want < 0 || have <= want;
  };
  (void)allowed;
#if FLASHATTN_HAVE_ISA_avx512
  if (allowed("avx512") && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return {"avx512", avx512::forward, avx512::backward};
#endif
#if FLASHATTN_HAVE_ISA_avx2
  if (allowed("avx2") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c") && __builtin_cpu_supports("bmi2"))
    return {"avx2", avx2::forward, avx2::backward};
#endif
  return {"generic", generic::forward, generic::backward};
}

const Kernels& kernels() {
  static const Kernels k = select();
  return k;
}

}  // namespace

void forward(const AttnParams& params) { kernels().forward(params); }
void backward(const BwdParams& params) { kernels().backward(params); }
const char* isa_name() { return kernels().name; }

}  // namespace flashattn::cpu
