// FLASHATTN_CHECK_LENGTHS: validation of GPU-resident index values with one synchronisation (see
// check_device_values.cpp). No-ops for CPU calls (always checked) and when the mode is off.
#pragma once

#include "core/kvcache_params.h"
#include "core/params.h"

namespace flashattn::core {

void check_device_values(const AttnParams& p);
void check_device_values(const KVCacheParams& p);

}  // namespace flashattn::core
