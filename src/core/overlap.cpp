#include "core/overlap.h"

#include <algorithm>
#include <cstdint>
#include <cstdlib>

namespace flashattn::core {
namespace {

bool empty(const Tensor& t) {
  for (int i = 0; i < t.rank; ++i)
    if (t.shape[i] == 0) return true;
  return t.data == nullptr;
}

// [first byte, one past the last byte] a view touches (strides are validated non-negative).
struct ByteRange {
  uintptr_t begin, end;
};

ByteRange byte_range(const Tensor& t) {
  int64_t last = 0;
  for (int i = 0; i < t.rank; ++i) last += (t.shape[i] - 1) * t.stride[i];
  const auto begin = reinterpret_cast<uintptr_t>(t.data);
  const auto size = static_cast<int64_t>(dtype_size(t.dtype));
  return {begin, begin + static_cast<uintptr_t>((last + 1) * size)};
}

// Dimensions of two same-stride views ordered by decreasing stride; lo/hi bound the index
// difference i_a - i_b in each.
struct Dim {
  int64_t stride, lo, hi;
};

// Is delta = sum_k c_k * stride_k for integers c_k in [lo_k, hi_k]? Depth-first from the largest
// stride: at each level only the c_k that leave a remainder the smaller dimensions can still
// reach are tried (for non-self-overlapping layouts that is at most two values per level).
bool representable(const Dim* dims, int n, int64_t delta) {
  if (n == 0) return delta == 0;
  const Dim& d = dims[0];
  int64_t reach_lo = 0, reach_hi = 0;  // what dims[1..n) can add
  for (int k = 1; k < n; ++k) {
    reach_lo += dims[k].lo * dims[k].stride;
    reach_hi += dims[k].hi * dims[k].stride;
  }
  if (d.stride == 0) return representable(dims + 1, n - 1, delta);
  // c * stride must land in [delta - reach_hi, delta - reach_lo].
  auto floor_div = [](int64_t a, int64_t b) { return a / b - ((a % b != 0) && ((a < 0) != (b < 0))); };
  const int64_t c_lo = std::max(d.lo, -floor_div(-(delta - reach_hi), d.stride));
  const int64_t c_hi = std::min(d.hi, floor_div(delta - reach_lo, d.stride));
  if (c_hi - c_lo > 64) return true;  // a self-overlapping layout: do not search, assume the worst
  for (int64_t c = c_lo; c <= c_hi; ++c)
    if (representable(dims + 1, n - 1, delta - c * d.stride)) return true;
  return false;
}

}  // namespace

bool may_overlap(const Tensor& a, const Tensor& b) {
  if (empty(a) || empty(b) || !(a.device == b.device)) return false;
  const ByteRange ra = byte_range(a), rb = byte_range(b);
  if (ra.end <= rb.begin || rb.end <= ra.begin) return false;

  const bool same_layout = a.dtype == b.dtype && a.rank == b.rank &&
                           std::equal(a.stride.begin(), a.stride.begin() + a.rank, b.stride.begin());
  const auto size = static_cast<int64_t>(dtype_size(a.dtype));
  const int64_t byte_delta = static_cast<int64_t>(ra.begin - rb.begin);
  if (!same_layout || byte_delta % size != 0) return true;

  // Dims by decreasing stride; an insertion sort of at most kMaxRank entries (GCC 12's
  // -Warray-bounds misreads std::sort's unrolled small-range path on a fixed-size array).
  const int rank = std::clamp(a.rank, 0, Tensor::kMaxRank);
  Dim dims[Tensor::kMaxRank];
  for (int i = 0; i < rank; ++i) {
    Dim d{a.stride[i], -(b.shape[i] - 1), a.shape[i] - 1};
    int at = i;
    for (; at > 0 && dims[at - 1].stride < d.stride; --at) dims[at] = dims[at - 1];
    dims[at] = d;
  }
  // element a[i] sits at b[j] when base_a - base_b + sum (i - j) * stride = 0
  return representable(dims, rank, -byte_delta / size);
}

}  // namespace flashattn::core
