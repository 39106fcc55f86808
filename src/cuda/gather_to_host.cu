// FLASHATTN_CHECK_LENGTHS's copy (core/check_device_values.cpp): the index arrays of a call are
// packed into one stream-ordered device buffer (device-to-device copies, asynchronous), then brought
// to the host in a single device-to-host copy: one synchronisation per checked call.
#include "cuda/backend.h"
#include "cuda/common/check.h"
#include "cuda/common/stream_workspace.h"

namespace flashattn::cuda {

void gather_to_host(const std::vector<const int32_t*>& sources, const std::vector<int64_t>& counts, int32_t* host,
                    int device, void* stream_handle) {
  int64_t total = 0;
  for (int64_t c : counts) total += c;
  if (total == 0) return;
  DeviceGuard guard(device);
  auto stream = static_cast<cudaStream_t>(stream_handle);
  StreamWorkspace packed(size_t(total) * sizeof(int32_t), stream);
  int64_t offset = 0;
  for (size_t i = 0; i < sources.size(); ++i) {
    if (counts[i] > 0)
      FA_CUDA_CHECK(cudaMemcpyAsync(packed.data() + offset * sizeof(int32_t), sources[i],
                                    size_t(counts[i]) * sizeof(int32_t), cudaMemcpyDeviceToDevice, stream));
    offset += counts[i];
  }
  FA_CUDA_CHECK(cudaMemcpyAsync(host, packed.data(), size_t(total) * sizeof(int32_t), cudaMemcpyDeviceToHost, stream));
  FA_CUDA_CHECK(cudaStreamSynchronize(stream));
}

}  // namespace flashattn::cuda
