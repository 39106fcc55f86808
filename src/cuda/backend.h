// The CUDA backend's entry points. Declared always, defined only in builds with CUDA.
#pragma once

#include "core/params.h"

namespace flashattn::cuda {

void forward(const AttnParams& params);
void backward(const BwdParams& params);
void merge(const MergeParams& params);
bool available();  // a usable sm80+ GPU and driver

}  // namespace flashattn::cuda
