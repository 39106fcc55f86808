"""scaled_dot_product_attention with torch.nn.functional's signature and (batch, heads, seqlen, head_dim)
layout, over flashattn's kernels (torch tensors with autograd, or numpy arrays forward-only).

Causal alignment: SDPA's is_causal is aligned top-left (query i sees key j iff j <= i), flash_attn's
bottom-right (j <= i + seqlen_k - seqlen_q). They agree when seqlen_q == seqlen_k; otherwise this
entry keeps SDPA's meaning exactly:
- seqlen_q < seqlen_k: no query sees a key past seqlen_q - 1, so the keys are cut to the first
  seqlen_q (a view) and the bottom-right mask of that square problem is SDPA's mask;
- seqlen_q > seqlen_k: a window (-1, seqlen_q - seqlen_k) around flash_attn's diagonal is j <= i.
"""

from __future__ import annotations

from ._checks import check_dropout, check_rank, error
from ._interface import flash_attn_func

_LAYOUT = "(batch, heads, seqlen, head_dim)"


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False):
    """query (batch, heads, seqlen_q, d), key (batch, heads_k, seqlen_k, d), value (batch, heads_k, seqlen_k, d_v)
    -> (batch, heads, seqlen_q, d_v), a transposed view of a (batch, seqlen_q, heads, d_v) tensor (as SDPA's
    flash backend returns). heads_k != heads needs enable_gqa=True (query head h reads key head
    h // (heads // heads_k), as SDPA does)."""
    if attn_mask is not None:
        raise NotImplementedError("flashattn: argument 'attn_mask': arbitrary masks are not supported "
                                  "(is_causal, or flash_attn_func's window_size/alibi_slopes, are)")
    check_dropout(dropout_p)
    check_rank(query, "query", 4, _LAYOUT)
    check_rank(key, "key", 4, _LAYOUT)
    check_rank(value, "value", 4, _LAYOUT)
    heads, heads_k = query.shape[1], key.shape[1]
    if heads_k != heads and not enable_gqa:
        raise error("key", f"{heads} heads (those of query), or enable_gqa=True", f"{heads_k} heads")
    if heads_k == 0 or heads % heads_k != 0:
        raise error("key", f"a head count dividing the {heads} query heads (GQA)", f"{heads_k}")
    q, k, v = query.swapaxes(1, 2), key.swapaxes(1, 2), value.swapaxes(1, 2)
    seqlen_q, seqlen_k = q.shape[1], k.shape[1]
    causal, window = False, (-1, -1)
    if is_causal:
        if seqlen_q <= seqlen_k:
            if seqlen_q < seqlen_k:
                k, v = k[:, :seqlen_q], v[:, :seqlen_q]
            causal = True
        else:
            window = (-1, seqlen_q - seqlen_k)
    out = flash_attn_func(q, k, v, softmax_scale=scale, causal=causal, window_size=window)
    return out.swapaxes(1, 2)
