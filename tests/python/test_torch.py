"""flashattn's flash_attn interface on torch tensors: forward and autograd backward against a plain
fp64 torch attention (no SDPA), on the CPU and, where this build and machine have it, CUDA."""

import pytest

torch = pytest.importorskip("torch")

import flashattn  # noqa: E402


def reference(q, k, v, softmax_scale=None, causal=False, window=(-1, -1), softcap=0.0, upcast=True):
    """softmax(scale * Q K^T + mask) V in fp64 (upcast) or in the input dtype (the 'standard' baseline)."""
    dtype = q.dtype
    if upcast:
        q, k, v = q.double(), k.double(), v.double()
    b, sq, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    scale = d ** -0.5 if softmax_scale is None else softmax_scale
    k = k.repeat_interleave(h // hk, dim=2)
    v = v.repeat_interleave(h // hk, dim=2)
    s = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    left, right = window
    if causal:
        right = 0
    i = torch.arange(sq, device=q.device)[:, None]
    j = torch.arange(sk, device=q.device)[None, :]
    diag = i + sk - sq
    ok = torch.ones(sq, sk, dtype=torch.bool, device=q.device)
    if left >= 0:
        ok &= j >= diag - left
    if right >= 0:
        ok &= j <= diag + right
    s = s.masked_fill(~ok, float("-inf"))
    p = torch.softmax(s.float() if not upcast else s, dim=-1).nan_to_num(0.0).to(s.dtype)
    out = torch.einsum("bhij,bjhd->bihd", p, v)
    return out if upcast else out.to(dtype)


def devices():
    out = ["cpu"]
    if torch.cuda.is_available() and flashattn.cuda_available():
        out.append("cuda")
    return out


def dtypes(device):
    return [torch.float16, torch.bfloat16] if device == "cuda" else [torch.float32, torch.float16, torch.bfloat16]


CASES = [(p, dev, dt) for dev in devices() for dt in dtypes(dev) for p in [
    dict(b=2, sq=65, sk=65, h=4, hk=4, d=64, causal=False),
    dict(b=1, sq=33, sk=129, h=8, hk=2, d=128, causal=True),
    dict(b=2, sq=80, sk=17, h=4, hk=1, d=64, causal=True),
    dict(b=1, sq=40, sk=40, h=2, hk=2, d=64, causal=False, window=(8, 3), softcap=10.0),
]]


def grad(outputs, inputs, grad_outputs):
    """Autograd through flashattn's backward (every backend has one: a NotImplementedError fails)."""
    return torch.autograd.grad(outputs, inputs, grad_outputs)


def max_err(x, ref):
    if x.numel() == 0:
        return 0.0
    return (x.double() - ref.double()).abs().max().item()


def assert_close(ours, ref, base, atol):
    # docs/DESIGN.md §5: within twice the error of the standard attention in the same dtype, plus atol.
    assert max_err(ours, ref) <= 2 * max_err(base, ref) + atol, (max_err(ours, ref), max_err(base, ref))


@pytest.mark.parametrize("case,device,dtype", CASES)
def test_forward_backward(case, device, dtype):
    torch.manual_seed(0)
    case = dict(case)
    b, sq, sk, h, hk, d = (case.pop(n) for n in ("b", "sq", "sk", "h", "hk", "d"))
    window = case.pop("window", (-1, -1))
    q = torch.randn(b, sq, h, d, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(b, sk, hk, d, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(b, sk, hk, d, device=device, dtype=dtype, requires_grad=True)
    dout = torch.randn(b, sq, h, d, device=device, dtype=dtype)

    out = flashattn.flash_attn_func(q, k, v, window_size=window, **case)
    assert out.dtype == dtype and out.device == q.device and out.shape == (b, sq, h, d)
    ref = reference(q, k, v, window=window, **case)
    base = reference(q, k, v, window=window, upcast=False, **case)
    atol = 1e-5 if dtype == torch.float32 else 1e-3
    assert_close(out, ref, base, atol)

    dq, dk, dv = grad(out, (q, k, v), dout)
    assert dq.dtype == dtype and dk.shape == k.shape and dv.shape == v.shape
    rdq, rdk, rdv = torch.autograd.grad(ref, (q, k, v), dout.double())
    bdq, bdk, bdv = torch.autograd.grad(base, (q, k, v), dout)
    for ours, r, bs in ((dq, rdq, bdq), (dk, rdk, bdk), (dv, rdv, bdv)):
        assert_close(ours, r, bs, atol if dtype == torch.float32 else 5e-3)


@pytest.mark.parametrize("device", devices())
def test_lse_and_deterministic(device):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    q = torch.randn(2, 50, 4, 64, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(2, 70, 2, 64, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(2, 70, 2, 64, device=device, dtype=dtype, requires_grad=True)
    out, lse, probs = flashattn.flash_attn_func(q, k, v, causal=True, deterministic=True, return_attn_probs=True)
    assert probs is None and lse.shape == (2, 4, 50) and lse.dtype == torch.float32
    s = torch.einsum("bihd,bjhd->bhij", q.double(), k.double().repeat_interleave(2, dim=2)) * 64 ** -0.5
    s = s.masked_fill(torch.ones(50, 70, dtype=torch.bool, device=device).triu(70 - 50 + 1), float("-inf"))
    assert (lse - torch.logsumexp(s, dim=-1)).abs().max().item() < 1e-3
    g1 = grad(out.sum(), (q, k, v), None)
    out2 = flashattn.flash_attn_func(q, k, v, causal=True, deterministic=True)
    g2 = grad(out2.sum(), (q, k, v), None)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", devices())
def test_packed_backward(device):
    dtype = torch.float32 if device == "cpu" else torch.float16
    qkv = torch.randn(2, 33, 3, 4, 64, device=device, dtype=dtype, requires_grad=True)
    out = flashattn.flash_attn_qkvpacked_func(qkv, causal=True)
    ref = reference(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], causal=True)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert max_err(out, ref) < tol
    (g,) = grad(out.sum(), (qkv,), None)
    (rg,) = torch.autograd.grad(ref.sum(), qkv)
    assert max_err(g, rg) < tol * 5


@pytest.mark.parametrize("device", devices())
def test_varlen_backward_matches_per_sequence(device):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    lens_q, lens_k = [5, 0, 64, 33], [9, 4, 64, 20]
    cu_q = torch.tensor([0] + lens_q, device=device).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + lens_k, device=device).cumsum(0).to(torch.int32)
    q = torch.randn(int(cu_q[-1]), 4, 64, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(int(cu_k[-1]), 2, 64, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(int(cu_k[-1]), 2, 64, device=device, dtype=dtype, requires_grad=True)
    out = flashattn.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=True)
    dout = torch.randn_like(out)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    refs = []
    for i in range(len(lens_q)):
        qs, ks = slice(int(cu_q[i]), int(cu_q[i + 1])), slice(int(cu_k[i]), int(cu_k[i + 1]))
        qi, ki, vi = (x.detach()[None, s].requires_grad_() for x, s in ((q, qs), (k, ks), (v, ks)))
        ref = reference(qi, ki, vi, causal=True)
        assert max_err(out[qs], ref[0]) < tol
        refs.append((qs, ks, qi, ki, vi, ref))
    dq, dk, dv = grad(out, (q, k, v), dout)
    for qs, ks, qi, ki, vi, ref in refs:
        rq, rk, rv = torch.autograd.grad(ref, (qi, ki, vi), dout[None, qs].double())
        assert max_err(dq[qs], rq[0]) < tol * 5
        assert max_err(dk[ks], rk[0]) < tol * 5
        assert max_err(dv[ks], rv[0]) < tol * 5


def test_errors_name_the_argument():
    q = torch.randn(1, 8, 4, 32)
    k = torch.randn(1, 8, 2, 32)
    with pytest.raises(ValueError, match="'k'"):
        flashattn.flash_attn_func(q, k.half(), k)
    with pytest.raises(NotImplementedError, match="'dropout_p'"):
        flashattn.flash_attn_func(q, k, k, dropout_p=0.1)
    with pytest.raises(ValueError, match="'q'"):
        flashattn.flash_attn_func(q[0], k, k)
