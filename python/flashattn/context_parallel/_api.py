"""The public ring-attention functions: argument checks, then the autograd Function of _algorithm.py.

The checks are made before any block is sent and come out the same on every rank for the same shapes.
What only the C++ library checks (e.g. a head dim it has no kernel for) raises inside the first ring
step, on every rank alike; the transfers already started are waited for first, so the group stays
usable. Shapes that differ between ranks cannot be detected without a collective and make the
transfers fail or hang: every rank must pass the same shapes."""

from __future__ import annotations

import torch
import torch.distributed as dist

from .._checks import error, unsupported, window_pair
from ._algorithm import Options, RingAttention
from ._ring import Ring
from ._schedule import LAYOUTS
from ._tokens import DenseTokens, VarlenTokens

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_tensor(x, name, rank, layout):
    if not isinstance(x, torch.Tensor):
        raise error(name, "a torch tensor", type(x).__name__)
    if x.dim() != rank:
        raise error(name, f"rank {rank} {layout}", f"rank {x.dim()} {list(x.shape)}")


def _check_common(q, k, v, alibi_slopes, layout, softcap, group):
    if not dist.is_available() or not dist.is_initialized():
        raise error("group", "an initialized torch.distributed process group (dist.init_process_group)",
                    "no default process group")
    if group is dist.GroupMember.NON_GROUP_MEMBER:  # what dist.new_group gives the ranks it leaves out
        raise error("group", "a process group this rank belongs to", "dist.GroupMember.NON_GROUP_MEMBER")
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise error("group", "a torch.distributed ProcessGroup or None (the default group)", type(group).__name__)
    if alibi_slopes is not None:
        raise unsupported("alibi_slopes", "ALiBi over a sharded sequence (its bias follows global positions the "
                          "local kernels do not know)")
    if layout not in LAYOUTS:
        raise error("layout", " or ".join(repr(x) for x in LAYOUTS), repr(layout))
    if softcap < 0:
        raise error("softcap", ">= 0 (0 = off)", repr(softcap))
    if q.dtype not in _FLOAT_DTYPES:
        raise error("q", "fp32, fp16 or bf16", str(q.dtype))
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise error(name, f"q's dtype {q.dtype}", str(x.dtype))
        if x.device != q.device:
            raise error(name, f"q's device {q.device}", str(x.device))
    # the block that travels must have the same shape on every rank; heads_k must divide heads
    if k.shape[:-1] != v.shape[:-1]:
        raise error("v", f"k's shape but the head dim, {list(k.shape[:-1])} + [d_v]", str(list(v.shape)))
    if q.shape[-1] != k.shape[-1]:
        raise error("k", f"q's head dim {q.shape[-1]}", str(k.shape[-1]))
    heads, heads_k = q.shape[-2], k.shape[-2]
    if heads_k == 0 or heads % heads_k:
        raise error("k", f"a head count dividing the {heads} query heads (GQA/MQA)", str(heads_k))


_rings = {}


def _ring_for(group, device):
    """The Ring of (group, device), made once: its queries of the process group cost ~20 us a call. A
    destroyed and re-created default group is a new object, hence a new entry."""
    group = dist.group.WORLD if group is None else group
    key = (group, device)
    ring = _rings.get(key)
    if ring is None:
        ring = _rings[key] = Ring(group, device)
    return ring


def _options(softmax_scale, causal, layout, softcap, deterministic, window=(-1, -1)):
    return Options(None if softmax_scale is None else float(softmax_scale), bool(causal), layout, float(softcap),
                   bool(deterministic), window)


def ring_flash_attn_func(q, k, v, group=None, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                         alibi_slopes=None, deterministic=False, return_attn_probs=False, layout="zigzag"):
    """Attention over a sequence sharded along dim 1 across the ranks of `group` (None: the default group).

    q (batch, seqlen, heads, d), k (batch, seqlen_k, heads_k, d), v (batch, seqlen_k, heads_k, d_v): this
    rank's tokens; every rank passes the same shapes. Returns out (batch, seqlen, heads, d_v), this rank's
    tokens, the attention of its queries over the keys of *all* ranks; with return_attn_probs,
    (out, softmax_lse (batch, heads, seqlen), None). Differentiable in q, k and v (the gradients of
    each rank's own tokens).

    causal=True: q and k are the same tokens (seqlen_k == seqlen), sharded by `layout`:
      "zigzag" (default, load balanced): the sequence is cut into 2W chunks and rank r holds chunks r
        and 2W-1-r, in that order (zigzag_shard); seqlen must be even;
      "contiguous": rank r holds the r-th of W equal chunks (simple, unbalanced: rank W-1 computes
        W times rank 0's share).
    Without causal the layout does not matter: every query sees every key.
    GQA/MQA as flashattn (heads_k divides heads; only heads_k heads travel), softcap and deterministic
    as flash_attn_func. window_size (left, right) follows global positions (q and k the same tokens;
    with causal, right = 0), planned chunk pair by chunk pair: up to 4 local calls per ring step, the
    pairs outside the window skipped. alibi_slopes raises NotImplementedError: its bias follows global
    positions that the local calls cannot be given.
    """
    _check_tensor(q, "q", 4, "(batch, seqlen, heads, head_dim)")
    _check_tensor(k, "k", 4, "(batch, seqlen_k, heads_k, head_dim)")
    _check_tensor(v, "v", 4, "(batch, seqlen_k, heads_k, head_dim_v)")
    _check_common(q, k, v, alibi_slopes, layout, softcap, group)
    window = window_pair(window_size)
    if min(window) < -1:
        raise error("window_size", "(left, right) with each >= 0, or -1 for unbounded", repr(window_size))
    if k.shape[0] != q.shape[0]:
        raise error("k", f"q's batch size {q.shape[0]}", str(k.shape[0]))
    if causal or window != (-1, -1):
        why = "causal" if causal else "a window"
        if k.shape[1] != q.shape[1]:
            raise error("k", f"q's local seqlen {q.shape[1]} ({why}: q and k are the same tokens)", str(k.shape[1]))
        if layout == "zigzag" and q.shape[1] % 2:
            raise error("q", f"an even local seqlen (zig-zag: two equal chunks per rank; {why})", str(q.shape[1]))
    out, lse = RingAttention.apply(q, k, v, _ring_for(group, q.device), DenseTokens(),
                                   _options(softmax_scale, causal, layout, softcap, deterministic, window))
    return (out, lse, None) if return_attn_probs else out


def ring_flash_attn_varlen_func(q, k, v, cu_seqlens, max_seqlen, group=None, softmax_scale=None, causal=False,
                                window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                                return_attn_probs=False, layout="zigzag"):
    """Packed documents, each sharded along the sequence across the ranks of `group`.

    q (total, heads, d), k (total, heads_k, d), v (total, heads_k, d_v): this rank's tokens of every
    document, packed; cu_seqlens int32 (documents + 1) and max_seqlen describe this rank's packing and are
    the same on every rank: every rank holds the same number of tokens of each document
    (local_cu_seqlens(global cu_seqlens, W) computes them). Returns out (total, heads, d_v); with
    return_attn_probs, (out, softmax_lse (heads, total), None).

    causal=True: per document, the layouts of ring_flash_attn_func ("zigzag": document d of length L is
    cut into 2W chunks of L / 2W tokens and rank r holds chunks r and 2W-1-r; zigzag_shard_varlen does
    it). With zig-zag, every local document length must be even (the host reads cu_seqlens once per call
    to check it and to index the halves); otherwise cu_seqlens is not read on the host and, as in
    flash_attn_varlen_func, is trusted on CUDA.
    """
    _check_tensor(q, "q", 3, "(total_tokens, heads, head_dim)")
    _check_tensor(k, "k", 3, "(total_tokens, heads_k, head_dim)")
    _check_tensor(v, "v", 3, "(total_tokens, heads_k, head_dim_v)")
    _check_common(q, k, v, alibi_slopes, layout, softcap, group)
    if window_pair(window_size) != (-1, -1):
        raise unsupported("window_size", f"a sliding window over sharded packed documents (window_size="
                          f"{window_size!r}; the per-call window would depend on each document's chunk size)")
    if k.shape[0] != q.shape[0]:
        raise error("k", f"q's {q.shape[0]} tokens (one cu_seqlens describes both)", str(k.shape[0]))
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 1:
        raise error("cu_seqlens", "a rank-1 int32 tensor (documents + 1)",
                    f"{type(cu_seqlens).__name__} {list(getattr(cu_seqlens, 'shape', []))}")
    if cu_seqlens.dtype != torch.int32:
        raise error("cu_seqlens", "int32", str(cu_seqlens.dtype))
    if cu_seqlens.device != q.device:
        raise error("cu_seqlens", f"q's device {q.device}", str(cu_seqlens.device))
    max_seqlen = int(max_seqlen)
    if max_seqlen < 0:
        raise error("max_seqlen", ">= 0", str(max_seqlen))
    halves = bool(causal) and layout == "zigzag"
    if halves or not cu_seqlens.is_cuda:  # on the host anyway: check what the kernels would trust
        bounds = cu_seqlens.tolist()
        lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
        if bounds[0] != 0 or bounds[-1] != q.shape[0] or min(lengths, default=0) < 0:
            raise error("cu_seqlens", f"non-decreasing offsets from 0 to q's {q.shape[0]} tokens", str(bounds))
        if max(lengths, default=0) > max_seqlen:
            raise error("max_seqlen", f">= the longest local document ({max(lengths)} tokens)", str(max_seqlen))
        odd = [i for i, n in enumerate(lengths) if n % 2]
        if halves and odd:
            raise error("cu_seqlens", "an even local length for every document (zig-zag: two equal chunks per rank)",
                        f"odd lengths for documents {odd[:8]}")
    tokens = VarlenTokens(cu_seqlens, max_seqlen, halves)
    out, lse = RingAttention.apply(q, k, v, _ring_for(group, q.device), tokens,
                                   _options(softmax_scale, causal, layout, softcap, deterministic))
    return (out, lse, None) if return_attn_probs else out
