"""flashattn: exact attention that never materialises the n x n score matrix.

A drop-in for ``flash_attn``'s v2 interface (same function names, argument names and defaults)::

    from flashattn import flash_attn_func
    out = flash_attn_func(q, k, v, causal=True)   # q (batch, seqlen_q, heads, d), k/v (batch, seqlen_k, heads_k, d)

Arrays may be numpy arrays (forward only; the output is a numpy array) or, when torch is
installed, torch tensors on the CPU or a CUDA device (output allocated like ``q``; autograd runs
flashattn's backward, gradients in the input dtype). torch is imported only when a torch tensor
is passed, so ``import flashattn`` needs numpy alone.

Not supported yet: dropout (``dropout_p`` must be 0), ``block_table`` (paged KV cache).
``return_attn_probs=True`` returns ``(out, softmax_lse, None)``: flash_attn's third value is
the dropout mask, which only exists with dropout.
"""

from __future__ import annotations

import sys

import numpy as np

from . import _C

__version__ = _C.version()

__all__ = [
    "flash_attn_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_kvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_varlen_kvpacked_func",
    "cuda_available",
]


def cuda_available() -> bool:
    """Whether this build has the CUDA backend and a usable GPU."""
    return _C.cuda_available()


# ---- argument checks that must happen before outputs can be allocated ---------------------------

def _error(argument, expected, got):
    # Same wording as flashattn::Error, which the extension turns into ValueError.
    return ValueError(f"flashattn: invalid argument '{argument}': expected {expected}, got {got}")


def _check_rank(x, name, rank, layout):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise _error(name, "a numpy array or a torch tensor", type(x).__name__)
    if len(x.shape) != rank:
        raise _error(name, f"rank {rank} {layout}", f"rank {len(x.shape)} {list(x.shape)}")


def _check_common(dropout_p, window_size, block_table=None):
    if dropout_p != 0.0:
        raise _error("dropout_p", "0.0 (dropout is not supported yet)", repr(dropout_p))
    if block_table is not None:
        raise _error("block_table", "None (a paged KV cache is not supported yet)", type(block_table).__name__)
    try:
        left, right = (int(w) for w in window_size)
    except (TypeError, ValueError):
        raise _error("window_size", "a pair (left, right) of ints, -1 = unbounded", repr(window_size)) from None
    return left, right


def _is_torch(x) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _np_last_contiguous(x):
    x = np.asarray(x)
    if x.ndim and x.shape[-1] > 1 and x.strides[-1] != x.itemsize:
        x = np.ascontiguousarray(x)
    return x


# ---- numpy: forward only ------------------------------------------------------------------------

def _np_forward(q, k, v, opts, varlen):
    q, k, v = (_np_last_contiguous(x) for x in (q, k, v))
    out = np.empty(q.shape[:-1] + v.shape[-1:], dtype=q.dtype)
    alibi = opts.get("alibi_slopes")
    if alibi is not None:
        opts = dict(opts, alibi_slopes=np.asarray(alibi))
    if varlen is None:
        lse = np.empty((q.shape[0], q.shape[2], q.shape[1]), dtype=np.float32)
        _C.forward(q, k, v, out, lse, **opts)
    else:
        cu_q, cu_k, max_q, max_k = varlen
        lse = np.empty((q.shape[1], q.shape[0]), dtype=np.float32)
        _C.forward_varlen(q, k, v, out, lse, np.asarray(cu_q), np.asarray(cu_k), int(max_q), int(max_k), **opts)
    return out, lse


# ---- torch: forward and backward through autograd ----------------------------------------------

_torch_function = None


def _torch_attention_function():
    """Built on first use so that torch is imported only by torch users."""
    global _torch_function
    if _torch_function is not None:
        return _torch_function
    import torch

    def stream_of(t):
        return torch.cuda.current_stream(t.device).cuda_stream if t.is_cuda else 0

    def last_contiguous(t):
        return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()

    class FlashAttnFunc(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, varlen, opts):
            q, k, v = (last_contiguous(x.detach()) for x in (q, k, v))
            out = torch.empty(q.shape[:-1] + v.shape[-1:], dtype=q.dtype, device=q.device)
            alibi = opts.get("alibi_slopes")
            if alibi is not None:
                opts = dict(opts, alibi_slopes=alibi.detach())
            opts = dict(opts, stream=stream_of(q))
            if varlen is None:
                lse = torch.empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32, device=q.device)
                _C.forward(q, k, v, out, lse, **opts)
            else:
                cu_q, cu_k, max_q, max_k = varlen
                lse = torch.empty((q.shape[1], q.shape[0]), dtype=torch.float32, device=q.device)
                _C.forward_varlen(q, k, v, out, lse, cu_q, cu_k, int(max_q), int(max_k), **opts)
                ctx.varlen_tensors = (cu_q, cu_k)
                ctx.varlen_max = (int(max_q), int(max_k))
            ctx.save_for_backward(q, k, v, out, lse)
            ctx.opts = opts
            ctx.is_varlen = varlen is not None
            ctx.mark_non_differentiable(lse)
            return out, lse

        @staticmethod
        def backward(ctx, dout, _dlse):
            q, k, v, out, lse = ctx.saved_tensors
            dout = last_contiguous(dout)
            dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
            opts = dict(ctx.opts, stream=stream_of(q))
            if ctx.is_varlen:
                cu_q, cu_k = ctx.varlen_tensors
                _C.backward_varlen(dout, q, k, v, out, lse, dq, dk, dv, cu_q, cu_k, *ctx.varlen_max, **opts)
            else:
                _C.backward(dout, q, k, v, out, lse, dq, dk, dv, **opts)
            return dq, dk, dv, None, None

    _torch_function = FlashAttnFunc
    return FlashAttnFunc


def _attention(q, k, v, *, varlen, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
               deterministic, return_attn_probs, block_table=None):
    left, right = _check_common(dropout_p, window_size, block_table)
    if varlen is None:
        for x, name in ((q, "q"), (k, "k"), (v, "v")):
            _check_rank(x, name, 4, "(batch, seqlen, heads, head_dim)")
    else:
        for x, name in ((q, "q"), (k, "k"), (v, "v")):
            _check_rank(x, name, 3, "(total_tokens, heads, head_dim)")
    opts = dict(
        softmax_scale=None if softmax_scale is None else float(softmax_scale),
        causal=bool(causal),
        window_left=left,
        window_right=right,
        softcap=float(softcap),
        alibi_slopes=alibi_slopes,
        deterministic=bool(deterministic),
    )
    if _is_torch(q):
        out, lse = _torch_attention_function().apply(q, k, v, varlen, opts)
    else:
        out, lse = _np_forward(q, k, v, opts, varlen)
    return (out, lse, None) if return_attn_probs else out


# ---- flash_attn's v2 interface -------------------------------------------------------------------

def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                    softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """q (batch, seqlen_q, heads, d), k (batch, seqlen_k, heads_k, d), v (batch, seqlen_k, heads_k, d_v)
    -> out (batch, seqlen_q, heads, d_v); with return_attn_probs, (out, softmax_lse (batch, heads, seqlen_q), None).
    Causal and window masks are aligned bottom-right (query i sees key j iff j <= i + seqlen_k - seqlen_q)."""
    return _attention(q, k, v, varlen=None, dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal,
                      window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes,
                      deterministic=deterministic, return_attn_probs=return_attn_probs)


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                              softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """qkv (batch, seqlen, 3, heads, d): views, no copies."""
    _check_rank(qkv, "qkv", 5, "(batch, seqlen, 3, heads, head_dim)")
    if qkv.shape[2] != 3:
        raise _error("qkv", "size 3 in dim 2 (q, k, v)", str(list(qkv.shape)))
    return flash_attn_func(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], dropout_p, softmax_scale, causal,
                           window_size, softcap, alibi_slopes, deterministic, return_attn_probs)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                             softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """q (batch, seqlen_q, heads, d), kv (batch, seqlen_k, 2, heads_k, d)."""
    _check_rank(kv, "kv", 5, "(batch, seqlen_k, 2, heads_k, head_dim)")
    if kv.shape[2] != 2:
        raise _error("kv", "size 2 in dim 2 (k, v)", str(list(kv.shape)))
    return flash_attn_func(q, kv[:, :, 0], kv[:, :, 1], dropout_p, softmax_scale, causal, window_size,
                           softcap, alibi_slopes, deterministic, return_attn_probs)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                           alibi_slopes=None, deterministic=False, return_attn_probs=False, block_table=None):
    """Packed sequences: q (total_q, heads, d), k/v (total_k, heads_k, d), cu_seqlens_* int32 (batch + 1)
    -> out (total_q, heads, d_v); softmax_lse is (heads, total_q)."""
    varlen = (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    return _attention(q, k, v, varlen=varlen, dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal,
                      window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes,
                      deterministic=deterministic, return_attn_probs=return_attn_probs, block_table=block_table)


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None,
                                     causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                                     deterministic=False, return_attn_probs=False):
    """qkv (total, 3, heads, d)."""
    _check_rank(qkv, "qkv", 4, "(total_tokens, 3, heads, head_dim)")
    if qkv.shape[1] != 3:
        raise _error("qkv", "size 3 in dim 1 (q, k, v)", str(list(qkv.shape)))
    return flash_attn_varlen_func(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu_seqlens, cu_seqlens, max_seqlen,
                                  max_seqlen, dropout_p, softmax_scale, causal, window_size, softcap,
                                  alibi_slopes, deterministic, return_attn_probs)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                    dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                                    softcap=0.0, alibi_slopes=None, deterministic=False,
                                    return_attn_probs=False):
    """q (total_q, heads, d), kv (total_k, 2, heads_k, d)."""
    _check_rank(kv, "kv", 4, "(total_tokens, 2, heads_k, head_dim)")
    if kv.shape[1] != 2:
        raise _error("kv", "size 2 in dim 1 (k, v)", str(list(kv.shape)))
    return flash_attn_varlen_func(q, kv[:, 0], kv[:, 1], cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                  dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                                  deterministic, return_attn_probs)
