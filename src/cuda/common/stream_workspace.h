// Device memory in stream order, for the workspaces of multi-kernel launches (the backward's
// preprocess -> main kernel -> postprocess).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

#include "cuda/common/check.h"

namespace flashattn::cuda {

// Device memory in stream order (cudaMallocAsync / cudaFreeAsync): the three kernels queued between
// allocation and release use it, and no host synchronisation is needed. Freed on every exit path,
// a launch that throws included.
class StreamWorkspace {
 public:
  StreamWorkspace(size_t bytes, cudaStream_t stream) : stream_(stream) {
    FA_CUDA_CHECK(cudaMallocAsync(&ptr_, bytes, stream));
  }
  ~StreamWorkspace() {
    if (ptr_) cudaFreeAsync(ptr_, stream_);
  }
  StreamWorkspace(const StreamWorkspace&) = delete;
  StreamWorkspace& operator=(const StreamWorkspace&) = delete;
  char* data() const { return static_cast<char*>(ptr_); }

 private:
  void* ptr_ = nullptr;
  cudaStream_t stream_;
};

}  // namespace flashattn::cuda
