#include "core/knobs.h"

#include <cstdlib>
#include <cstring>
#include <string>

#include "flashattn/error.h"

namespace flashattn {
namespace {

const char* env(const char* name) {
  const char* v = std::getenv(name);
  return v && *v ? v : nullptr;
}

[[noreturn]] void bad(const char* name, const char* value, const char* expected) {
  throw Unsupported(std::string("flashattn: ") + name + "=" + value + ": expected " + expected);
}

KernelChoice kernel_choice(const char* name) {
  const char* v = env(name);
  if (!v || std::strcmp(v, "auto") == 0) return KernelChoice::kAuto;
  if (std::strcmp(v, "sm80") == 0) return KernelChoice::kSm80;
  if (std::strcmp(v, "sm90") == 0) return KernelChoice::kSm90;
  bad(name, v, "auto, sm80 or sm90");
}

Override override_of(const char* name) {
  const char* v = env(name);
  if (!v || std::strcmp(v, "auto") == 0) return Override::kAuto;
  if (std::strcmp(v, "0") == 0) return Override::kOff;
  if (std::strcmp(v, "1") == 0) return Override::kOn;
  bad(name, v, "auto, 0 or 1");
}

bool flag(const char* name, bool fallback) {
  const Override o = override_of(name);
  return o == Override::kAuto ? fallback : o == Override::kOn;
}

}  // namespace

Knobs knobs_from_environment() {
  Knobs k;
  k.cuda_forward = kernel_choice("FLASHATTN_CUDA_FORWARD");
  k.cuda_backward = kernel_choice("FLASHATTN_CUDA_BACKWARD");
  k.cuda_decode = flag("FLASHATTN_CUDA_DECODE", true);
  k.cuda_small_tiles = flag("FLASHATTN_CUDA_SMALL_TILES", false);
  k.check_lengths = flag("FLASHATTN_CHECK_LENGTHS", false);
  k.sm90_narrow = override_of("FLASHATTN_SM90_NARROW");
  k.sm90_persistent = override_of("FLASHATTN_SM90_PERSISTENT");
  if (const char* v = env("FLASHATTN_SM90_MAX_CTAS")) {
    char* end = nullptr;
    const long n = std::strtol(v, &end, 10);
    if (*end || n < 0 || n > (1 << 20)) bad("FLASHATTN_SM90_MAX_CTAS", v, "a count >= 0");
    k.sm90_max_ctas = int(n);
  }
  if (const char* v = env("FLASHATTN_SM90_SCHEDULE")) {
    if (std::strcmp(v, "pingpong") == 0) k.sm90_pingpong = true;
    else if (std::strcmp(v, "overlap") != 0) bad("FLASHATTN_SM90_SCHEDULE", v, "overlap or pingpong");
  }
  if (const char* v = env("FLASHATTN_CPU_ISA")) {
    if (std::strcmp(v, "generic") && std::strcmp(v, "avx2") && std::strcmp(v, "avx512"))
      bad("FLASHATTN_CPU_ISA", v, "generic, avx2 or avx512");
    k.cpu_isa = v;
  }
  return k;
}

Knobs& knobs_for_testing() {
  // A throwing first read leaves the static uninitialised: the next call reads (and throws) again.
  static Knobs k = knobs_from_environment();
  return k;
}

const Knobs& knobs() { return knobs_for_testing(); }

}  // namespace flashattn
