"""numpy arrays on the CPU: forward only (numpy has no autograd), straight into the extension."""

from __future__ import annotations

import numpy as np

from . import _C
from ._checks import error


def last_dim_contiguous(x):
    x = np.asarray(x)
    if x.ndim and x.shape[-1] > 1 and x.strides[-1] != x.itemsize:
        x = np.ascontiguousarray(x)
    return x


def _array(x, name):
    """None, or x as a numpy array (a torch tensor here means the arguments mix numpy and torch)."""
    if x is None:
        return None
    if type(x).__module__.startswith("torch"):
        raise error(name, "a numpy array (q is one: numpy and torch inputs do not mix)", type(x).__name__)
    return np.asarray(x)


def _index(x, name):
    """An index array as int32 (other integer dtypes converted)."""
    x = _array(x, name)
    if x is None:
        return None
    if not np.issubdtype(x.dtype, np.integer):
        raise error(name, "an integer array (int32)", str(x.dtype))
    return np.ascontiguousarray(x, dtype=np.int32)


def _sinks(x):
    x = _array(x, "sinks")
    return None if x is None else np.ascontiguousarray(x, dtype=np.float32)


def _option_kwargs(opts):
    return dict(softmax_scale=opts.softmax_scale, causal=opts.causal, window_left=opts.window_left,
                window_right=opts.window_right, softcap=opts.softcap,
                alibi_slopes=_array(opts.alibi_slopes, "alibi_slopes"), num_splits=opts.num_splits)


def forward(q, k, v, opts):
    """q (b, sq, h, d), k/v (b, sk, hk, d) -> out (b, sq, h, dv), lse fp32 (b, h, sq)."""
    q, k, v = (last_dim_contiguous(_array(x, n)) for x, n in ((q, "q"), (k, "k"), (v, "v")))
    out = np.empty(q.shape[:-1] + v.shape[-1:], dtype=q.dtype)
    lse = np.empty((q.shape[0], q.shape[2], q.shape[1]), dtype=np.float32)
    _C.forward(q, k, v, out, lse, **_option_kwargs(opts), sinks=_sinks(opts.sinks))
    return out, lse


def varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, opts, page_table=None,
                   seqused_k=None, seqused_q=None):
    """Packed q (total_q, h, d), k/v (total_k, hk, d) or paged caches -> out (total_q, h, dv), lse fp32 (h, total_q)."""
    q, k, v = (last_dim_contiguous(_array(x, n)) for x, n in ((q, "q"), (k, "k"), (v, "v")))
    # Rows past seqused_q are not written: zeros, as the torch route gives.
    out = (np.zeros if seqused_q is not None else np.empty)(q.shape[:-1] + v.shape[-1:], dtype=q.dtype)
    lse = np.full((q.shape[1], q.shape[0]), -np.inf, dtype=np.float32)
    _C.forward_varlen(q, k, v, out, lse, _array(cu_seqlens_q, "cu_seqlens_q"), _array(cu_seqlens_k, "cu_seqlens_k"),
                      int(max_seqlen_q), int(max_seqlen_k), **_option_kwargs(opts),
                      seqused_k=_index(seqused_k, "seqused_k"), sinks=_sinks(opts.sinks),
                      page_table=_index(page_table, "page_table"), seqused_q=_index(seqused_q, "seqused_q"))
    return out, lse


def kvcache(q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, cache_leftpad, page_table, rotary_cos,
            rotary_sin, rotary_interleaved, opts):
    """flash_attn_with_kvcache on numpy arrays: the C++ forward_kvcache validates everything, then appends
    k/v into the caches in place and attends."""
    q = last_dim_contiguous(_array(q, "q"))
    k_cache, v_cache = _array(k_cache, "k_cache"), _array(v_cache, "v_cache")
    for cache, name in ((k_cache, "k_cache"), (v_cache, "v_cache")):
        if k is not None and not cache.flags.writeable:
            raise error(name, "a writable array (k/v are appended into it)", "a read-only array")
    out = np.empty(q.shape[:-1] + v_cache.shape[-1:], dtype=q.dtype)
    lse = np.empty((q.shape[0], q.shape[2], q.shape[1]), dtype=np.float32)
    _C.forward_kvcache(q, _array(k, "k"), _array(v, "v"), k_cache, v_cache, out, lse,
                       _index(cache_seqlens, "cache_seqlens"), _index(cache_batch_idx, "cache_batch_idx"),
                       _index(cache_leftpad, "cache_leftpad"), _index(page_table, "page_table"),
                       _array(rotary_cos, "rotary_cos"), _array(rotary_sin, "rotary_sin"), bool(rotary_interleaved),
                       **_option_kwargs(opts), sinks=_sinks(opts.sinks))
    return out, lse
