"""numpy arrays on the CPU: forward only (numpy has no autograd), straight into the extension."""

from __future__ import annotations

import numpy as np

from . import _C


def last_dim_contiguous(x):
    x = np.asarray(x)
    if x.ndim and x.shape[-1] > 1 and x.strides[-1] != x.itemsize:
        x = np.ascontiguousarray(x)
    return x


def forward(q, k, v, softmax_scale, causal, window_left, window_right, softcap, alibi_slopes, num_splits=0):
    """q (b, sq, h, d), k/v (b, sk, hk, d) -> out (b, sq, h, dv), lse fp32 (b, h, sq)."""
    q, k, v = (last_dim_contiguous(x) for x in (q, k, v))
    out = np.empty(q.shape[:-1] + v.shape[-1:], dtype=q.dtype)
    lse = np.empty((q.shape[0], q.shape[2], q.shape[1]), dtype=np.float32)
    _C.forward(q, k, v, out, lse, softmax_scale=softmax_scale, causal=causal, window_left=window_left,
               window_right=window_right, softcap=softcap,
               alibi_slopes=None if alibi_slopes is None else np.asarray(alibi_slopes), num_splits=num_splits)
    return out, lse


def varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
                   window_left, window_right, softcap, alibi_slopes, num_splits=0):
    """Packed q (total_q, h, d), k/v (total_k, hk, d) -> out (total_q, h, dv), lse fp32 (h, total_q)."""
    q, k, v = (last_dim_contiguous(x) for x in (q, k, v))
    out = np.empty(q.shape[:-1] + v.shape[-1:], dtype=q.dtype)
    lse = np.empty((q.shape[1], q.shape[0]), dtype=np.float32)
    _C.forward_varlen(q, k, v, out, lse, np.asarray(cu_seqlens_q), np.asarray(cu_seqlens_k), int(max_seqlen_q),
                      int(max_seqlen_k), softmax_scale=softmax_scale, causal=causal, window_left=window_left,
                      window_right=window_right, softcap=softcap,
                      alibi_slopes=None if alibi_slopes is None else np.asarray(alibi_slopes),
                      num_splits=num_splits)
    return out, lse
