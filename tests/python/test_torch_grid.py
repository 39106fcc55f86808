"""flash_attn_func and flash_attn_varlen_func on torch tensors against torch SDPA in fp32 (fp64 for fp32
inputs) over docs/DESIGN.md §5's awkward shapes: forward and gradients, CPU and (where built) CUDA."""

import pytest

torch = pytest.importorskip("torch")

import flashattn  # noqa: E402
from torch_reference import (  # noqa: E402
    assert_rule, atol_for, devices, dtypes, grads, oracle, standard)

# (batch, seqlen_q, seqlen_k, heads, heads_k, head_dim, causal, window). Causal cases keep
# seqlen_q <= seqlen_k so that every row sees a key (SDPA has no gradient for an empty row).
GRID = [
    (1, 1, 1, 1, 1, 64, False, (-1, -1)),
    (2, 7, 7, 4, 4, 32, True, (-1, -1)),
    (1, 63, 65, 4, 2, 64, True, (-1, -1)),
    (2, 65, 63, 8, 8, 128, False, (-1, -1)),
    (1, 127, 129, 8, 1, 96, True, (-1, -1)),
    (1, 128, 128, 4, 4, 256, True, (-1, -1)),
    (2, 129, 300, 8, 2, 128, False, (-1, -1)),
    (1, 1013, 1013, 2, 2, 64, True, (-1, -1)),
    (1, 64, 200, 4, 4, 192, False, (32, 8)),
    (2, 100, 100, 4, 2, 80, False, (16, 0)),
    (1, 40, 40, 2, 2, 40, True, (-1, -1)),
    (1, 1, 4096, 32, 8, 128, False, (-1, -1)),  # decode
]

CASES = [(c, dev, dt) for dev in devices() for dt in dtypes(dev) for c in GRID]


def ids(case):
    c, dev, dt = case
    return f"{dev}-{str(dt)[6:]}-b{c[0]}-q{c[1]}-k{c[2]}-h{c[3]}/{c[4]}-d{c[5]}{'-causal' if c[6] else ''}" + (
        f"-w{c[7][0]},{c[7][1]}" if c[7] != (-1, -1) else "")


def inputs(case, device, dtype, requires_grad):
    b, sq, sk, h, hk, d, causal, window = case
    torch.manual_seed(sq * 1000 + sk + d)
    make = lambda *shape: torch.randn(*shape, device=device, dtype=dtype, requires_grad=requires_grad)  # noqa: E731
    return make(b, sq, h, d), make(b, sk, hk, d), make(b, sk, hk, d), dict(causal=causal, window=window)


@pytest.mark.parametrize("case,device,dtype", CASES, ids=[ids(c) for c in CASES])
def test_forward_vs_sdpa(case, device, dtype):
    q, k, v, opts = inputs(case, device, dtype, requires_grad=False)
    out, lse, _ = flashattn.flash_attn_func(q, k, v, causal=opts["causal"], window_size=opts["window"],
                                            return_attn_probs=True)
    assert out.shape == q.shape and out.dtype == dtype and lse.shape == (q.shape[0], q.shape[2], q.shape[1])
    assert torch.isfinite(out).all()
    assert_rule(out, oracle(q, k, v, **opts), standard(q, k, v, **opts), atol_for(dtype), "out")


@pytest.mark.parametrize("case,device,dtype", CASES, ids=[ids(c) for c in CASES])
def test_gradients_vs_sdpa(case, device, dtype):
    q, k, v, opts = inputs(case, device, dtype, requires_grad=True)
    out = flashattn.flash_attn_func(q, k, v, causal=opts["causal"], window_size=opts["window"])
    dout = torch.randn_like(out)
    ours = grads(out, (q, k, v), dout)
    ref = oracle(q, k, v, **opts)
    refs = torch.autograd.grad(ref, (q, k, v), dout.to(ref.dtype))
    bases = torch.autograd.grad(standard(q, k, v, **opts), (q, k, v), dout)
    for name, g, r, bs in zip(("dq", "dk", "dv"), ours, refs, bases):
        assert g.dtype == dtype and g.shape == r.shape
        assert_rule(g, r, bs, atol_for(dtype, grad=True), name)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("causal", [False, True])
def test_varlen_vs_per_sequence_sdpa(device, causal):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    lens_q, lens_k = [5, 0, 64, 1, 129], [7, 3, 64, 40, 129]
    cu_q = torch.tensor([0] + lens_q, device=device).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + lens_k, device=device).cumsum(0).to(torch.int32)
    torch.manual_seed(7)
    q = torch.randn(sum(lens_q), 8, 64, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(sum(lens_k), 2, 64, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(sum(lens_k), 2, 64, device=device, dtype=dtype, requires_grad=True)
    out, lse, _ = flashattn.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal,
                                                   return_attn_probs=True)
    assert out.shape == q.shape and lse.shape == (8, sum(lens_q))
    dout = torch.randn_like(out)
    sequences = []
    for i in range(len(lens_q)):
        qs = slice(int(cu_q[i]), int(cu_q[i + 1]))
        ks = slice(int(cu_k[i]), int(cu_k[i + 1]))
        qi, ki, vi = (x.detach()[None, s].requires_grad_() for x, s in ((q, qs), (k, ks), (v, ks)))
        ref, base = oracle(qi, ki, vi, causal=causal), standard(qi, ki, vi, causal=causal)
        assert_rule(out[None, qs], ref, base, atol_for(dtype), f"out of sequence {i}")
        sequences.append((qs, ks, qi, ki, vi, ref, base))
    dq, dk, dv = grads(out, (q, k, v), dout)  # forward checked first: a missing backward skips only this
    for i, (qs, ks, qi, ki, vi, ref, base) in enumerate(sequences):
        if lens_q[i] == 0:  # keys no query reads get zero gradients
            assert not dk[ks].any() and not dv[ks].any()
            continue
        refs = torch.autograd.grad(ref, (qi, ki, vi), dout[None, qs].to(ref.dtype))
        bases = torch.autograd.grad(base, (qi, ki, vi), dout[None, qs])
        for name, g, s, r, bs in zip(("dq", "dk", "dv"), (dq, dk, dv), (qs, ks, ks), refs, bases):
            assert_rule(g[None, s], r, bs, atol_for(dtype, grad=True), f"{name} of sequence {i}")
