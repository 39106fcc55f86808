// Turns the public tensors into AttnParams, checking every rule on the way. Each failure
// throws flashattn::Error naming the argument, what was expected and what came.
#pragma once

#include "core/kvcache_params.h"
#include "core/params.h"
#include "flashattn/flashattn.h"

namespace flashattn::core {

// Inputs only (q, k, v, options, optional varlen layout): what the oracle needs.
AttnParams check_inputs(const Tensor& q, const Tensor& k, const Tensor& v, const Options& options,
                        const VarlenLayout* layout);

AttnParams check_forward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
                         const Tensor& lse, const Options& options, const VarlenLayout* layout);

BwdParams check_backward(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                         const Tensor& out, const Tensor& lse, const Tensor& dq, const Tensor& dk,
                         const Tensor& dv, const Options& options, const VarlenLayout* layout);

// forward_kvcache: every shape, dtype and device, and on the CPU every length, page id and cache
// row, before anything is written (core/validate_kvcache.cpp).
KVCacheParams check_kvcache(const Tensor& q, const Tensor& k_new, const Tensor& v_new, const KVCache& cache,
                            const Tensor& out, const Tensor& lse, const Options& options);

SinkGradParams check_sink_gradient(const Tensor& dout, const Tensor& out, const Tensor& lse, const Tensor& sinks,
                                   const Tensor& dsinks, const VarlenLayout* layout, const Options& options);

MergeParams check_merge(const Tensor& partial_out, const Tensor& partial_lse, const Tensor& out,
                        const Tensor& lse, const Options& options);

}  // namespace flashattn::core
