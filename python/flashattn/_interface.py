"""flash_attn's v2 functions (same names, argument names, defaults and layouts) over numpy arrays (forward,
CPU) and torch tensors (CPU or CUDA, through the torch.ops.flashattn operators: autograd, torch.compile,
CUDA graphs)."""

from __future__ import annotations

from . import _numpy
from ._checks import NO_WINDOW, check_dropout, check_rank, error, scale_or_none, unsupported, window_pair

try:
    import torch
except ImportError:  # numpy-only installs
    torch = None

if torch is not None:
    from . import _torch_ops as _ops

    _Tensor = torch.Tensor
else:
    _ops = None

    class _Tensor:  # nothing is an instance: every array takes the numpy path
        pass


_BATCHED = "(batch, seqlen, heads, head_dim)"
_PACKED = "(total_tokens, heads, head_dim)"


def _numpy_attention(q, k, v, softmax_scale, causal, window_size, softcap, alibi_slopes):
    left, right = window_pair(window_size)
    check_rank(q, "q", 4, _BATCHED)
    check_rank(k, "k", 4, _BATCHED)
    check_rank(v, "v", 4, _BATCHED)
    return _numpy.forward(q, k, v, scale_or_none(softmax_scale), bool(causal), left, right, float(softcap),
                          alibi_slopes)


def _varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale,
                      causal, window_size, softcap, alibi_slopes, deterministic, block_table, want_lse):
    check_dropout(dropout_p)
    if block_table is not None:
        raise unsupported("block_table", "a paged KV cache")
    left, right = window_pair(window_size)
    check_rank(q, "q", 3, _PACKED)
    check_rank(k, "k", 3, _PACKED)
    check_rank(v, "v", 3, _PACKED)
    scale = scale_or_none(softmax_scale)
    if isinstance(q, _Tensor):
        return _ops.varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k),
                                   scale, bool(causal), left, right, float(softcap), alibi_slopes, bool(deterministic),
                                   want_lse)
    return _numpy.varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                                 bool(causal), left, right, float(softcap), alibi_slopes)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=NO_WINDOW, softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """q (batch, seqlen_q, heads, d), k (batch, seqlen_k, heads_k, d), v (batch, seqlen_k, heads_k, d_v)
    -> out (batch, seqlen_q, heads, d_v); with return_attn_probs, (out, softmax_lse (batch, heads, seqlen_q), None).
    Causal and window masks are aligned bottom-right (query i sees key j iff j <= i + seqlen_k - seqlen_q)."""
    if dropout_p:
        check_dropout(dropout_p)
    if isinstance(q, _Tensor):  # a decode step's call: straight to the torch route, the C++ library checks
        left, right = NO_WINDOW if window_size is NO_WINDOW else window_pair(window_size)
        out, lse = _ops.forward(q, k, v, None if softmax_scale is None else float(softmax_scale), bool(causal), left,
                                right, float(softcap), alibi_slopes, bool(deterministic), return_attn_probs)
    else:
        out, lse = _numpy_attention(q, k, v, softmax_scale, causal, window_size, softcap, alibi_slopes)
    return (out, lse, None) if return_attn_probs else out


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=NO_WINDOW,
                              softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """qkv (batch, seqlen, 3, heads, d): views, no copies."""
    check_rank(qkv, "qkv", 5, "(batch, seqlen, 3, heads, head_dim)")
    if qkv.shape[2] != 3:
        raise error("qkv", "size 3 in dim 2 (q, k, v)", str(list(qkv.shape)))
    return flash_attn_func(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], dropout_p, softmax_scale, causal, window_size,
                           softcap, alibi_slopes, deterministic, return_attn_probs)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=NO_WINDOW,
                             softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """q (batch, seqlen_q, heads, d), kv (batch, seqlen_k, 2, heads_k, d)."""
    check_rank(kv, "kv", 5, "(batch, seqlen_k, 2, heads_k, head_dim)")
    if kv.shape[2] != 2:
        raise error("kv", "size 2 in dim 2 (k, v)", str(list(kv.shape)))
    return flash_attn_func(q, kv[:, :, 0], kv[:, :, 1], dropout_p, softmax_scale, causal, window_size, softcap,
                           alibi_slopes, deterministic, return_attn_probs)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=NO_WINDOW, softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    """Packed sequences: q (total_q, heads, d), k/v (total_k, heads_k, d), cu_seqlens_* int32 (batch + 1)
    -> out (total_q, heads, d_v); softmax_lse is (heads, total_q). On CUDA the cu_seqlens values are
    trusted (reading them would synchronise): max_seqlen_* must bound every sequence."""
    out, lse = _varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                                 softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                 block_table, return_attn_probs)
    return (out, lse, None) if return_attn_probs else out


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                                     window_size=NO_WINDOW, softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False):
    """qkv (total, 3, heads, d)."""
    check_rank(qkv, "qkv", 4, "(total_tokens, 3, heads, head_dim)")
    if qkv.shape[1] != 3:
        raise error("qkv", "size 3 in dim 1 (q, k, v)", str(list(qkv.shape)))
    return flash_attn_varlen_func(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                  dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                                  deterministic, return_attn_probs)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                    softmax_scale=None, causal=False, window_size=NO_WINDOW, softcap=0.0,
                                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """q (total_q, heads, d), kv (total_k, 2, heads_k, d)."""
    check_rank(kv, "kv", 4, "(total_tokens, 2, heads_k, head_dim)")
    if kv.shape[1] != 2:
        raise error("kv", "size 2 in dim 1 (k, v)", str(list(kv.shape)))
    return flash_attn_varlen_func(q, kv[:, 0], kv[:, 1], cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                  dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                                  deterministic, return_attn_probs)
