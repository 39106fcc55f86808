// flashattn._C.forward_eager: the eager torch path's forward (see eager_forward.cpp).
#pragma once

#include <nanobind/nanobind.h>

namespace flashattn_python {

// Adds forward_eager and has_exchange_api to the module.
void add_eager_forward(nanobind::module_& m);

}  // namespace flashattn_python
