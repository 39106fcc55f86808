// Placeholder while the kernel is being written.
#include "cpu/kernels/isa.h"
#include "flashattn/error.h"
namespace flashattn::cpu::FLASHATTN_CPU_ISA {
void forward(const AttnParams&) { throw Unsupported("cpu forward: not written yet"); }
}
