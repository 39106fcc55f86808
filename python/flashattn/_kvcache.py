"""flash_attn_with_kvcache: attention of new queries over a KV cache, optionally appending the new tokens'
k/v into the cache in place first (with rotary embedding), as flash_attn v2 defines it.

The whole call is one C++ entry (flashattn::forward_kvcache): it validates every argument (on the CPU the
lengths, page ids, cache rows and left padding too) before it writes the first byte, so a rejected call
leaves q, the caches and the outputs untouched. Nothing here writes into the caches.

- k_cache/v_cache: (batch_cache, capacity, heads_k, d) or, with block_table / page_table (batch,
  pages_per_seq) int32, paged (num_pages, page_size, heads_k, d) with any page_size >= 1.
- cache_seqlens: None (every cache row full), an int (the same for every sequence) or a (batch,) integer
  tensor: the tokens in the cache before this call, counted from slot 0 (left padding included). Not advanced
  by the call. k/v (batch, seqlen_new, heads_k, d) land at slots cache_seqlens[b] + j.
- cache_batch_idx (batch,): the cache row of each sequence; cache_leftpad (batch,): its first valid slot.
- rotary_cos/rotary_sin (seqlen_ro >= capacity, rotary_dim / 2): applied to the new k (at slots
  cache_seqlens + j) and to q (causal or windowed: cache_seqlens + i; otherwise every query at
  cache_seqlens); rotary_interleaved True pairs (2i, 2i + 1), False pairs (i, i + rotary_dim / 2).
- sinks: (heads,) attention-sink logits. Not differentiable (as in flash_attn).

On CUDA the index tensors stay on the device (no synchronisation; the kernels skip what lies outside the
cache) unless flashattn checks them (FLASHATTN_CHECK_LENGTHS=1).
"""

from __future__ import annotations

import numbers

import numpy as np

from . import _numpy
from ._checks import NO_WINDOW, AttentionOptions, check_rank, error, one_of
from ._interface import _Tensor, _ops, _sinks, torch

_BATCHED = "(batch, seqlen, heads, head_dim)"


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                            softmax_scale=None, causal=False, window_size=NO_WINDOW, softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False, *,
                            page_table=None, sinks=None, learnable_sink=None):
    """q (batch, seqlen_q, heads, d) -> out (batch, seqlen_q, heads, d_v); with return_softmax_lse,
    (out, softmax_lse (batch, heads, seqlen_q)). Causal/window masks align bottom-right on each sequence's
    cache length after the append (the new queries are the last tokens)."""
    page_table = one_of(block_table, page_table, "block_table", "page_table")
    opts = AttentionOptions.of(softmax_scale, causal, window_size, softcap, alibi_slopes,
                               _sinks(sinks, learnable_sink), num_splits=num_splits)
    plain = (k is None and v is None and page_table is None and rotary_cos is None and rotary_sin is None
             and cache_batch_idx is None and cache_leftpad is None)
    if (plain and type(q) is _Tensor and (cache_seqlens is None or type(cache_seqlens) is _Tensor)
            and q.dim() == 4 and k_cache.dim() == 4 and v_cache.dim() == 4):
        # A decode step's usual call: nothing to write, the C++ forward checks the rest (the lengths as
        # Options::seqused_k). Inlined: each Python layer here is host time on every decode step.
        try:
            out, lse = _ops.kvcache(q, k_cache, v_cache, cache_seqlens, opts, return_softmax_lse)
        except ValueError as e:
            _raise_renamed(e)
            raise
        return (out, lse) if return_softmax_lse else out
    check_rank(q, "q", 4, _BATCHED)
    if (k is None) != (v is None):
        raise error("v" if v is None else "k", "k and v together (the new tokens to append)", "only one of them")
    cache_seqlens = _lengths(cache_seqlens, q)
    if isinstance(q, _Tensor):
        if plain:
            try:
                out, lse = _ops.kvcache(q, k_cache, v_cache, cache_seqlens, opts, return_softmax_lse)
            except ValueError as e:
                _raise_renamed(e)
                raise
        else:
            out, lse = _ops.kvcache_full(q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, cache_leftpad,
                                         page_table, rotary_cos, rotary_sin, bool(rotary_interleaved), opts,
                                         return_softmax_lse)
    else:
        out, lse = _numpy.kvcache(q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, cache_leftpad,
                                  page_table, rotary_cos, rotary_sin, rotary_interleaved, opts)
    return (out, lse) if return_softmax_lse else out


def _lengths(cache_seqlens, q):
    """cache_seqlens as a (batch,) int32 tensor/array on q's device, or None. An int is expanded to q's batch
    (not the cache's first dimension: that is the page count of a paged cache)."""
    if cache_seqlens is None:
        return None
    if isinstance(cache_seqlens, (bool, np.bool_)) or not (isinstance(cache_seqlens, numbers.Integral)
                                                          or hasattr(cache_seqlens, "shape")):
        raise error("cache_seqlens", "None, an int or a (batch,) integer tensor", type(cache_seqlens).__name__)
    if isinstance(cache_seqlens, numbers.Integral):
        if isinstance(q, _Tensor):
            return torch.full((q.shape[0],), int(cache_seqlens), dtype=torch.int32, device=q.device)
        return np.full((q.shape[0],), int(cache_seqlens), dtype=np.int32)
    return cache_seqlens


# The C++ forward names the arguments of its plain forward: here they are the cache and its lengths.
_RENAMED = (("'k'", "'k_cache'"), ("'v'", "'v_cache'"), ("'seqused_k'", "'cache_seqlens'"))


def _raise_renamed(e):
    """Raises e's message with the C++ library's argument name replaced by this function's, if it names one."""
    message = str(e)
    for name, ours in _RENAMED:
        prefix = f"flashattn: invalid argument {name}"
        if message.startswith(prefix):
            raise ValueError(f"flashattn: invalid argument {ours}" + message[len(prefix):]) from None
