"""flash_attn's v2 functions (same names, argument names, defaults and layouts) over numpy arrays (forward,
CPU) and torch tensors (CPU or CUDA, through the torch.ops.flashattn operators: autograd, torch.compile,
CUDA graphs)."""

from __future__ import annotations

from . import _numpy
from ._checks import NO_WINDOW, AttentionOptions, check_dropout, check_rank, error, one_of

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


def _sinks(sinks, learnable_sink):
    """flash-attn-4 calls the attention sinks learnable_sink; transformers passes s_aux (same values)."""
    return one_of(learnable_sink, sinks, "learnable_sink", "sinks")


# CUDA kernels move rows as 16-byte vectors: head dims that are not a multiple of 8 are padded with zeros
# (extra dims add 0 to every score and produce columns that are sliced off), as flash_attn does. Autograd
# flows through the pad and the slice, so gradients come back unpadded.
_CUDA_HEAD_DIM_MULTIPLE = 8


def _pad_head_dims(q, k, v, opts):
    """-> (q, k, v, head_dim_v to slice the output to, or None when nothing was padded)."""
    if not q.is_cuda:
        return q, k, v, None
    d, dv = q.shape[-1], v.shape[-1]
    if d % _CUDA_HEAD_DIM_MULTIPLE == 0 and dv % _CUDA_HEAD_DIM_MULTIPLE == 0:
        return q, k, v, None
    if opts.softmax_scale is None:  # the scale of the real head dim, not the padded one
        opts.softmax_scale = d ** -0.5
    pad = torch.nn.functional.pad

    def up(x):
        extra = -x.shape[-1] % _CUDA_HEAD_DIM_MULTIPLE
        return pad(x, (0, extra)) if extra else x

    return up(q), up(k), up(v), dv


def _mixed(k, v):
    """q is a torch tensor: k and v must be too."""
    name, x = ("k", k) if not isinstance(k, _Tensor) else ("v", v)
    raise error(name, "a torch tensor (q is one: numpy and torch inputs do not mix)", type(x).__name__)


def _numpy_attention(q, k, v, opts):
    check_rank(q, "q", 4, _BATCHED)
    check_rank(k, "k", 4, _BATCHED)
    check_rank(v, "v", 4, _BATCHED)
    return _numpy.forward(q, k, v, opts)


def _varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, opts, page_table,
                      seqused_k, seqused_q, want_lse):
    check_dropout(dropout_p)
    check_rank(q, "q", 3, _PACKED)
    paged_layout = "(num_pages, page_size, heads_k, head_dim) (a paged cache)"
    check_rank(k, "k", 4 if page_table is not None else 3, paged_layout if page_table is not None else _PACKED)
    check_rank(v, "v", 4 if page_table is not None else 3, paged_layout if page_table is not None else _PACKED)
    if isinstance(q, _Tensor):
        if not (isinstance(k, _Tensor) and isinstance(v, _Tensor)):
            _mixed(k, v)
        head_dim_v = None
        if page_table is None:
            q, k, v, head_dim_v = _pad_head_dims(q, k, v, opts)
        out, lse = _ops.varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k),
                                       opts, want_lse, seqused_k, page_table, seqused_q)
        return (out if head_dim_v is None else out[..., :head_dim_v]), lse
    return _numpy.varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, opts, page_table,
                                 seqused_k, seqused_q)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=NO_WINDOW, softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False, *, sinks=None,
                    learnable_sink=None):
    """q (batch, seqlen_q, heads, d), k (batch, seqlen_k, heads_k, d), v (batch, seqlen_k, heads_k, d_v)
    -> out (batch, seqlen_q, heads, d_v); with return_attn_probs, (out, softmax_lse (batch, heads, seqlen_q), None).
    Causal and window masks are aligned bottom-right (query i sees key j iff j <= i + seqlen_k - seqlen_q).
    window_size: any pair (tuple, list, tensor); causal=True sets its right side to 0. sinks (learnable_sink):
    one logit per head (heads,) that joins each row's softmax denominator without a value; differentiable."""
    if dropout_p:
        check_dropout(dropout_p)
    opts = AttentionOptions.of(softmax_scale, causal, window_size, softcap, alibi_slopes,
                               _sinks(sinks, learnable_sink), deterministic)
    if isinstance(q, _Tensor):  # a decode step's call: straight to the torch route, the C++ library checks
        if not (isinstance(k, _Tensor) and isinstance(v, _Tensor)):
            _mixed(k, v)
        head_dim_v = None
        if q.is_cuda and (q.shape[-1] % 8 or v.shape[-1] % 8):
            q, k, v, head_dim_v = _pad_head_dims(q, k, v, opts)
        out, lse = _ops.forward(q, k, v, opts, return_attn_probs)
        if head_dim_v is not None:
            out = out[..., :head_dim_v]
    else:
        out, lse = _numpy_attention(q, k, v, opts)
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
                           deterministic=False, return_attn_probs=False, block_table=None, *, page_table=None,
                           seqused_k=None, seqused_q=None, sinks=None, learnable_sink=None):
    """Packed sequences: q (total_q, heads, d), k/v (total_k, heads_k, d), cu_seqlens_* int32 (batch + 1)
    -> out (total_q, heads, d_v); softmax_lse is (heads, total_q). On CUDA the cu_seqlens values are
    trusted (reading them would synchronise): max_seqlen_* must bound every sequence.
    block_table (v3: page_table) int32 (batch, pages_per_seq): k/v are paged caches (num_pages, page_size,
    heads_k, d), sequence b's keys in its pages from slot 0, cu_seqlens_k giving the lengths (or seqused_k:
    keys used per sequence). seqused_q (v3): only the first seqused_q[b] query rows of each sequence are
    used (the output's other rows are zeros). Paged calls, seqused_k and seqused_q are forward only."""
    opts = AttentionOptions.of(softmax_scale, causal, window_size, softcap, alibi_slopes,
                               _sinks(sinks, learnable_sink), deterministic)
    out, lse = _varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, opts,
                                 one_of(block_table, page_table, "block_table", "page_table"), seqused_k,
                                 seqused_q, return_attn_probs)
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
