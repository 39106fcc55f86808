"""Drop-in proof: a small workload written against flash_attn's API (prefill, packed qkv, varlen batch,
token-by-token decoding with a KV cache, LSE) runs unchanged with flashattn under flash_attn's name.

    python tests/python/test_dropin.py      # or through pytest

The workload only ever says `flash_attn.<function>(...)`. It runs on numpy arrays (CPU, every machine)
and on torch tensors (CPU, and CUDA where built); results are checked against the fp64 oracle.
"""

import numpy as np
import pytest

import flashattn as flash_attn  # the one line a flash_attn user changes
from reference import attention

try:
    import torch
except ImportError:
    torch = None


class Numpy:
    """The few array operations the workload needs, for numpy arrays."""
    name = "numpy"

    def __init__(self):
        self.rng = np.random.default_rng(0)

    def randn(self, *shape):
        return self.rng.standard_normal(shape).astype(np.float32)

    def zeros(self, *shape):
        return np.zeros(shape, np.float32)

    def int32(self, values):
        return np.array(values, np.int32)

    def stack(self, xs, axis=0):
        return np.stack(xs, axis)

    def cat(self, xs):
        return np.concatenate(xs)

    def numpy(self, x):
        return np.asarray(x, np.float64)


class Torch:
    def __init__(self, device, dtype):
        self.name, self.device, self.dtype = f"torch-{device}-{str(dtype)[6:]}", device, dtype
        torch.manual_seed(0)

    def randn(self, *shape):
        return torch.randn(*shape, device=self.device, dtype=self.dtype)

    def zeros(self, *shape):
        return torch.zeros(*shape, device=self.device, dtype=self.dtype)

    def int32(self, values):
        return torch.tensor(values, dtype=torch.int32, device=self.device)

    def stack(self, xs, dim=0):
        return torch.stack(xs, dim)

    def cat(self, xs):
        return torch.cat(xs)

    def numpy(self, x):
        return x.double().cpu().numpy()


def workload(xp):
    """flash_attn-style code; returns (name, ours, reference) triples to check."""
    checks = []
    batch, seqlen, heads, heads_k, d = 2, 24, 4, 2, 64
    q, k, v = xp.randn(batch, seqlen, heads, d), xp.randn(batch, seqlen, heads_k, d), xp.randn(batch, seqlen, heads_k, d)
    Q, K, V = xp.numpy(q), xp.numpy(k), xp.numpy(v)

    # prefill, GQA, causal, with the LSE
    out, lse, _ = flash_attn.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    ref, ref_lse = attention(Q, K, V, causal=True)
    checks += [("flash_attn_func", out, ref), ("softmax_lse", lse, ref_lse)]

    # packed qkv (equal head counts)
    qkv = xp.stack([q[:, :, :heads_k], k, v], 2)
    checks.append(("flash_attn_qkvpacked_func", flash_attn.flash_attn_qkvpacked_func(qkv, causal=True),
                   attention(Q[:, :, :heads_k], K, V, causal=True)[0]))
    kv = xp.stack([k, v], 2)
    checks.append(("flash_attn_kvpacked_func", flash_attn.flash_attn_kvpacked_func(q, kv, window_size=(4, 4)),
                   attention(Q, K, V, window=(4, 4))[0]))

    # a varlen batch: the two sequences cut to 10 and 24 tokens, packed
    lens = [10, 24]
    cu = xp.int32([0, 10, 34])
    qp = xp.cat([q[0, :10], q[1]])
    kp, vp = xp.cat([k[0, :10], k[1]]), xp.cat([v[0, :10], v[1]])
    outp = flash_attn.flash_attn_varlen_func(qp, kp, vp, cu, cu, max(lens), max(lens), causal=True)
    checks.append(("flash_attn_varlen_func", outp,
                   np.concatenate([attention(Q[0:1, :10], K[0:1, :10], V[0:1, :10], causal=True)[0][0],
                                   attention(Q[1:2], K[1:2], V[1:2], causal=True)[0][0]])))

    # decoding: prompts of 10 and 16 tokens in a cache, then 8 tokens one at a time (in-place appends)
    prompt = [10, 16]
    k_cache, v_cache = xp.zeros(batch, 32, heads_k, d), xp.zeros(batch, 32, heads_k, d)
    for b, n in enumerate(prompt):
        k_cache[b, :n], v_cache[b, :n] = k[b, :n], v[b, :n]
    cache_seqlens = xp.int32(prompt)
    for t in range(8):
        pos = [n + t for n in prompt]
        qt = xp.stack([q[b, p] for b, p in enumerate(pos)])[:, None]
        kt = xp.stack([k[b, p] for b, p in enumerate(pos)])[:, None]
        vt = xp.stack([v[b, p] for b, p in enumerate(pos)])[:, None]
        out_t = flash_attn.flash_attn_with_kvcache(qt, k_cache, v_cache, kt, vt, cache_seqlens=cache_seqlens,
                                                   causal=True)
        cache_seqlens = cache_seqlens + 1
        for b, p in enumerate(pos):  # the prefill's row p is the same attention
            checks.append((f"flash_attn_with_kvcache step {t} seq {b}", out_t[b, 0], ref[b, p]))
    return checks


def run(xp):
    tol = 2e-5 if getattr(xp, "dtype", None) in (None, getattr(torch, "float32", None)) else 2e-2
    for name, ours, ref in workload(xp):
        ours = xp.numpy(ours)
        finite = np.isfinite(ref)
        assert ours.shape == ref.shape, (name, ours.shape, ref.shape)
        err = np.abs(ours[finite] - ref[finite]).max()
        assert err <= tol * max(1.0, np.abs(ref[finite]).max()), f"{xp.name} {name}: max err {err:.3g}"


def backends():
    out = [Numpy()]
    if torch is not None:
        out.append(Torch("cpu", torch.float32))
        if torch.cuda.is_available() and flash_attn.cuda_available():
            out.append(Torch("cuda", torch.bfloat16))
    return out


@pytest.mark.parametrize("xp", backends(), ids=lambda xp: xp.name)
def test_dropin(xp):
    run(xp)


if __name__ == "__main__":
    for xp in backends():
        run(xp)
        print(f"drop-in workload passed unchanged with `import flashattn as flash_attn` ({xp.name})")
