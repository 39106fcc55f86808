"""The fp64 oracle for the Python tests: softmax(scale * Q K^T (+ softcap, alibi) + mask) V, written
out plainly in numpy, with docs/DESIGN.md §2's bottom-right aligned causal/window rule."""

import numpy as np


def visible(seqlen_q, seqlen_k, causal=False, window=(-1, -1)):
    """(seqlen_q, seqlen_k) bool: query i sees key j."""
    left, right = window
    if causal:
        right = 0
    i = np.arange(seqlen_q)[:, None]
    j = np.arange(seqlen_k)[None, :]
    diag = i + seqlen_k - seqlen_q
    ok = np.ones((seqlen_q, seqlen_k), dtype=bool)
    if left >= 0:
        ok &= j >= diag - left
    if right >= 0:
        ok &= j <= diag + right
    return ok


def attention(q, k, v, softmax_scale=None, causal=False, window=(-1, -1), softcap=0.0, alibi_slopes=None,
              sinks=None):
    """q (b, sq, h, d), k/v (b, sk, hk, d) -> out fp64 (b, sq, h, dv), lse fp64 (b, h, sq).
    sinks (h,): one extra logit per head in every row's softmax denominator, with no value."""
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    b, sq, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    scale = 1.0 / np.sqrt(d) if softmax_scale is None else softmax_scale
    group = h // hk
    k = np.repeat(k, group, axis=2)
    v = np.repeat(v, group, axis=2)
    s = np.einsum("bihd,bjhd->bhij", q, k) * scale
    if softcap > 0:
        s = softcap * np.tanh(s / softcap)
    if alibi_slopes is not None:
        slopes = np.asarray(alibi_slopes, dtype=np.float64)
        slopes = np.broadcast_to(slopes, (b, h))[:, :, None, None]
        i = np.arange(sq)[:, None]
        j = np.arange(sk)[None, :]
        s = s - slopes * np.abs(i + sk - sq - j)
    mask = visible(sq, sk, causal, window)
    s = np.where(mask, s, -np.inf)
    if sinks is not None:  # a value-less column holding the sink logit
        sink_col = np.broadcast_to(np.asarray(sinks, np.float64)[None, :, None, None], s.shape[:-1] + (1,))
        s = np.concatenate([s, sink_col], axis=-1)
        v = np.concatenate([v, np.zeros_like(v[:, :1])], axis=1)
    m = s.max(axis=-1, keepdims=True, initial=-np.inf)
    m_safe = np.where(np.isfinite(m), m, 0.0)
    p = np.exp(s - m_safe)
    l = p.sum(axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(l > 0, np.einsum("bhij,bjhd->bhid", p, v) / np.where(l > 0, l, 1.0), 0.0)
        lse = np.where(l[..., 0] > 0, np.log(np.where(l[..., 0] > 0, l[..., 0], 1.0)) + m_safe[..., 0], -np.inf)
    return out.transpose(0, 2, 1, 3), lse
