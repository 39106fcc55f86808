"""flash_attn_with_kvcache: attention of new queries over a (batch, seqlen_cache, heads_k, d) KV cache,
optionally appending the new tokens' k/v into the cache in place first.

What the kernels cannot do yet raises NotImplementedError naming the argument: a paged cache
(block_table), rotary embedding (rotary_cos/rotary_sin), cache_batch_idx, cache_leftpad.

cache_seqlens:
- None: the whole cache is valid;
- an int: every sequence has that many valid tokens (a view of the cache, no copy);
- a tensor (batch,) of ints (int32 as in flash_attn; other integer dtypes are converted): per-sequence
  lengths, the C++ API's Options::seqused_k: the kernels read them on the device over the cache as it
  is (no copy, no host read, so a CUDA decode step stays graph-capturable; CUDA's decode kernel with
  split-KV runs on it), causal/window/ALiBi aligned on each sequence's own length. On CUDA the lengths
  are trusted (<= seqlen_cache), as in flash_attn; on the CPU the C++ library checks them.

Appending: k/v (batch, seqlen_new, heads_k, d) are written at positions cache_seqlens[b] ..
cache_seqlens[b] + seqlen_new - 1 of k_cache/v_cache (plain torch/numpy indexing, in place), and attention
then runs over cache_seqlens + seqlen_new keys, as in flash_attn. Not differentiable (as in flash_attn).
"""

from __future__ import annotations

import numbers

import numpy as np

from . import _numpy
from ._checks import NO_WINDOW, check_rank, error, scale_or_none, unsupported, window_pair
from ._interface import _Tensor, _ops, torch

_BATCHED = "(batch, seqlen, heads, head_dim)"


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                            softmax_scale=None, causal=False, window_size=NO_WINDOW, softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False):
    """q (batch, seqlen_q, heads, d), k_cache/v_cache (batch, seqlen_cache, heads_k, d / d_v)
    -> out (batch, seqlen_q, heads, d_v); with return_softmax_lse, (out, softmax_lse (batch, heads, seqlen_q)).
    Causal/window masks align bottom-right on each sequence's cache length (the new queries are the
    last tokens)."""
    if not (block_table is None and rotary_cos is None and rotary_sin is None and cache_batch_idx is None
            and cache_leftpad is None):
        for name, value, what in (("block_table", block_table, "a paged KV cache"),
                                  ("rotary_cos", rotary_cos, "rotary embedding"),
                                  ("rotary_sin", rotary_sin, "rotary embedding"),
                                  ("cache_batch_idx", cache_batch_idx, "indexing the cache's batch"),
                                  ("cache_leftpad", cache_leftpad, "left-padded caches")):
            if value is not None:
                raise unsupported(name, what)
    left, right = NO_WINDOW if window_size is NO_WINDOW else window_pair(window_size)
    if (type(q) is _Tensor and k is None and v is None and (cache_seqlens is None or type(cache_seqlens) is _Tensor)
            and q.dim() == 4 and k_cache.dim() == 4 and v_cache.dim() == 4):
        # A decode step's usual call: nothing to append, the rest checked by the C++ library. (Inlined
        # _torch_attend: each Python layer and argument tuple here is host time on every decode step.)
        try:
            out, lse = _ops.kvcache(q, k_cache, v_cache, cache_seqlens,
                                    None if softmax_scale is None else float(softmax_scale), bool(causal), left,
                                    right, float(softcap), alibi_slopes, int(num_splits), return_softmax_lse)
        except ValueError as e:
            _raise_renamed(e)
            raise
        return (out, lse) if return_softmax_lse else out
    opts = (scale_or_none(softmax_scale), bool(causal), left, right, float(softcap), alibi_slopes, int(num_splits))
    check_rank(q, "q", 4, _BATCHED)
    check_rank(k_cache, "k_cache", 4, "(batch, seqlen_cache, heads_k, head_dim)")
    check_rank(v_cache, "v_cache", 4, "(batch, seqlen_cache, heads_k, head_dim_v)")
    if (k is None) != (v is None):
        raise error("v" if v is None else "k", "k and v together (the new tokens to append)", "only one of them")
    if k is not None:
        check_rank(k, "k", 4, "(batch, seqlen_new, heads_k, head_dim)")
        check_rank(v, "v", 4, "(batch, seqlen_new, heads_k, head_dim_v)")
        if cache_seqlens is None:
            raise error("cache_seqlens", "the cache lengths where k/v are appended", "None")
    if not (cache_seqlens is None or isinstance(cache_seqlens, (int, numbers.Integral))
            or hasattr(cache_seqlens, "shape")):
        raise error("cache_seqlens", "None, an int or a (batch,) integer tensor", type(cache_seqlens).__name__)
    if isinstance(q, _Tensor):
        out, lse = _torch_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, opts, return_softmax_lse)
    else:
        out, lse = _numpy_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, opts)
    return (out, lse) if return_softmax_lse else out


def _check_append(k, seqlen_cache, length):
    if length < 0 or length + k.shape[1] > seqlen_cache:
        raise error("k", f"at most seqlen_cache - cache_seqlens = {seqlen_cache - length} new tokens "
                    f"(seqlen_cache {seqlen_cache}, cache_seqlens {length})", f"{k.shape[1]}")


def _check_length(length, seqlen_cache):
    if not 0 <= length <= seqlen_cache:
        raise error("cache_seqlens", f"lengths between 0 and seqlen_cache = {seqlen_cache}", str(length))


# The C++ library names the arguments of its forward: here they are the cache and its lengths.
_RENAMED = (("'k'", "'k_cache'"), ("'v'", "'v_cache'"), ("'seqused_k'", "'cache_seqlens'"))


def _torch_attend(q, k_cache, v_cache, lengths, opts, want_lse):
    """Attention over the caches, lengths None or a (batch,) tensor (validated by the C++ library,
    whose errors are renamed to this function's arguments)."""
    try:
        return _ops.kvcache(q, k_cache, v_cache, lengths, *opts, want_lse)
    except ValueError as e:
        _raise_renamed(e)
        raise


def _raise_renamed(e):
    """Raises e's message with the C++ library's argument name replaced by this function's, if it names one."""
    message = str(e)
    for name, ours in _RENAMED:
        prefix = f"flashattn: invalid argument {name}"
        if message.startswith(prefix):
            raise ValueError(f"flashattn: invalid argument {ours}" + message[len(prefix):]) from None


def _torch_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, opts, want_lse):
    seqlen_cache = k_cache.shape[1]
    lengths = None
    if isinstance(cache_seqlens, (int, numbers.Integral)):
        length = int(cache_seqlens)
        if k is not None:
            _check_append(k, seqlen_cache, length)
            k_cache[:, length:length + k.shape[1]] = k
            v_cache[:, length:length + v.shape[1]] = v
            length += k.shape[1]
        _check_length(length, seqlen_cache)
        k_cache, v_cache = k_cache[:, :length], v_cache[:, :length]
    elif cache_seqlens is not None:
        if not isinstance(cache_seqlens, _Tensor) or cache_seqlens.is_floating_point():
            raise error("cache_seqlens", f"an int or an integer tensor of shape [batch] = [{q.shape[0]}]",
                        f"{type(cache_seqlens).__name__} {list(getattr(cache_seqlens, 'shape', []))}")
        lengths = cache_seqlens
        if k is not None:
            if cache_seqlens.dim() != 1 or cache_seqlens.shape[0] != q.shape[0]:
                raise error("cache_seqlens", f"an integer tensor of shape [batch] = [{q.shape[0]}]",
                            str(list(cache_seqlens.shape)))
            rows = torch.arange(q.shape[0], device=q.device)[:, None]
            positions = cache_seqlens.long()[:, None] + torch.arange(k.shape[1], device=q.device)
            k_cache[rows, positions] = k  # index_put_: in place, no host read of the lengths
            v_cache[rows, positions] = v
            lengths = cache_seqlens + k.shape[1]
    return _torch_attend(q, k_cache, v_cache, lengths, opts, want_lse)


def _numpy_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, opts):
    batch, seqlen_cache = k_cache.shape[0], k_cache.shape[1]
    if cache_seqlens is None:
        lengths = [seqlen_cache] * batch
    elif isinstance(cache_seqlens, numbers.Integral):
        lengths = [int(cache_seqlens)] * batch
    else:
        lengths = [int(x) for x in np.asarray(cache_seqlens).reshape(-1)]
        if len(lengths) != batch:
            raise error("cache_seqlens", f"an int or an integer array of shape [batch] = [{batch}]",
                        str(list(np.shape(cache_seqlens))))
    if k is not None:
        for b, length in enumerate(lengths):
            _check_append(k, seqlen_cache, length)
            k_cache[b, length:length + k.shape[1]] = k[b]
            v_cache[b, length:length + v.shape[1]] = v[b]
        lengths = [length + k.shape[1] for length in lengths]
    for length in lengths:
        _check_length(length, seqlen_cache)
    scale, causal, left, right, softcap, alibi_slopes, num_splits = opts
    if len(set(lengths)) <= 1:  # one length: one call over a view of the cache
        length = lengths[0] if lengths else seqlen_cache
        return _numpy.forward(q, k_cache[:, :length], v_cache[:, :length], scale, causal, left, right, softcap,
                              alibi_slopes, num_splits)
    slopes = None if alibi_slopes is None else np.asarray(alibi_slopes)
    outs, lses = [], []
    for b, length in enumerate(lengths):  # host loop: the lengths are host values here
        row_slopes = slopes[b:b + 1] if slopes is not None and slopes.ndim == 2 else slopes
        out, lse = _numpy.forward(q[b:b + 1], k_cache[b:b + 1, :length], v_cache[b:b + 1, :length], scale, causal,
                                  left, right, softcap, row_slopes, num_splits)
        outs.append(out)
        lses.append(lse)
    return np.concatenate(outs), np.concatenate(lses)
