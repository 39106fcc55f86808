// Placeholder while the baseline is being written.
#include "ref/standard.h"
namespace flashattn::standard {
int64_t workspace_bytes(const Tensor&, const Tensor&, const Tensor&, bool) { return 0; }
void forward(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Options&) {
  throw Unsupported("standard forward: not written yet");
}
void backward(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
              const Tensor&, const Tensor&, const Tensor&, const Options&) {
  throw Unsupported("standard backward: not written yet");
}
}  // namespace flashattn::standard
