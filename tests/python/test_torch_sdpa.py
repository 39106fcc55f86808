"""flashattn.scaled_dot_product_attention against torch's own SDPA (fp32/fp64 oracle, SDPA's top-left
causal meaning), forward and gradients."""

import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

import flashattn  # noqa: E402
from torch_reference import assert_rule, atol_for, devices, grads, oracle_dtype  # noqa: E402


def sdpa_in(dtype, q, k, v, **kwargs):
    return F.scaled_dot_product_attention(q.to(dtype), k.to(dtype), v.to(dtype), **kwargs)


def standard_sdpa(q, k, v, is_causal, scale):
    """Textbook attention in the input dtype, SDPA layout and top-left causal mask (the baseline)."""
    h, hk = q.shape[1], k.shape[1]
    k, v = k.repeat_interleave(h // hk, dim=1), v.repeat_interleave(h // hk, dim=1)
    s = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if is_causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return torch.softmax(s.float(), dim=-1).to(q.dtype) @ v


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("sq,sk", [(33, 33), (17, 80), (80, 17), (1, 64)])
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("heads_k", [4, 1])
def test_sdpa_matches_torch(device, sq, sk, is_causal, heads_k):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    torch.manual_seed(sq + sk)
    q = torch.randn(2, 4, sq, 64, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(2, heads_k, sk, 64, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(2, heads_k, sk, 64, device=device, dtype=dtype, requires_grad=True)
    scale = 0.1 if heads_k == 1 else None
    out = flashattn.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale, enable_gqa=heads_k != 4)
    assert out.shape == (2, 4, sq, 64) and out.dtype == dtype
    kr, vr = k.repeat_interleave(4 // heads_k, dim=1), v.repeat_interleave(4 // heads_k, dim=1)
    ref = sdpa_in(oracle_dtype(dtype), q, kr, vr, is_causal=is_causal, scale=scale)
    base = standard_sdpa(q, k, v, is_causal, scale)
    assert_rule(out, ref, base, atol_for(dtype), "out")
    dout = torch.randn_like(out)
    ours = grads(out, (q, k, v), dout)
    refs = torch.autograd.grad(ref, (q, k, v), dout.to(ref.dtype))
    bases = torch.autograd.grad(base, (q, k, v), dout)
    for name, g, r, bs in zip(("dq", "dk", "dv"), ours, refs, bases):
        assert_rule(g, r, bs, atol_for(dtype, grad=True), name)


def test_sdpa_errors_name_the_argument():
    q, k = torch.randn(1, 4, 8, 32), torch.randn(1, 2, 8, 32)
    f = flashattn.scaled_dot_product_attention
    with pytest.raises(NotImplementedError, match="'attn_mask'"):
        f(q, q, q, attn_mask=torch.ones(8, 8, dtype=torch.bool))
    with pytest.raises(NotImplementedError, match="'dropout_p'"):
        f(q, q, q, dropout_p=0.1)
    with pytest.raises(ValueError, match="'key'"):
        f(q, k, k)  # heads differ without enable_gqa
    with pytest.raises(ValueError, match="'key'"):
        f(q, torch.randn(1, 3, 8, 32), torch.randn(1, 3, 8, 32), enable_gqa=True)
    with pytest.raises(ValueError, match="'query'"):
        f(q[0], q, q)
