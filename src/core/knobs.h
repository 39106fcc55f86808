// Every FLASHATTN_* environment switch the library reads, in one struct read once (at the first
// call that needs one). README.md's Development section lists them with their meaning; nothing
// else in the library calls getenv.
//
// They exist to compare kernels and to test paths a machine would not pick by itself; none is
// needed for normal use. A value the library does not know is an error that names the variable.
#pragma once

#include <string>

namespace flashattn {

// Which CUDA kernel family takes a call.
enum class KernelChoice {
  kAuto,  // the fastest family that covers the call on this device
  kSm80,  // the FA2-class kernels even on Hopper (to compare the two)
  kSm90,  // the Hopper kernels; a call they do not cover is an error saying why (tests)
};

// Tri-state override of a heuristic: unset follows the heuristic.
enum class Override { kAuto, kOff, kOn };

struct Knobs {
  KernelChoice cuda_forward = KernelChoice::kAuto;   // FLASHATTN_CUDA_FORWARD = auto | sm80 | sm90
  KernelChoice cuda_backward = KernelChoice::kAuto;  // FLASHATTN_CUDA_BACKWARD = auto | sm80 | sm90
  bool cuda_decode = true;        // FLASHATTN_CUDA_DECODE = 0: decode-shaped calls take the main kernel
  bool cuda_small_tiles = false;  // FLASHATTN_CUDA_SMALL_TILES = 1: the sm80 kernels' small-tile configs
  Override sm90_narrow = Override::kAuto;      // FLASHATTN_SM90_NARROW = auto | 0 | 1: the sm90 narrow tile
  Override sm90_persistent = Override::kAuto;  // FLASHATTN_SM90_PERSISTENT = 0 | 1: persistent grid
  int sm90_max_ctas = 0;                       // FLASHATTN_SM90_MAX_CTAS = n > 0 caps the persistent grid
  bool sm90_pingpong = false;  // FLASHATTN_SM90_SCHEDULE = overlap | pingpong (builds with every schedule)
  std::string cpu_isa;         // FLASHATTN_CPU_ISA = generic | avx2 | avx512 caps the CPU kernels' ISA
  bool check_lengths = false;  // FLASHATTN_CHECK_LENGTHS = 0 | 1: check GPU-resident lengths (set_check_lengths)
};

// The process's knobs, read from the environment once. Throws flashattn::Unsupported naming the
// variable for a value it does not know.
const Knobs& knobs();

// Reads the environment now (what knobs() did on its first call).
Knobs knobs_from_environment();

// Tests change knobs in-process (the environment is read only once): the same struct, writable.
Knobs& knobs_for_testing();

}  // namespace flashattn
