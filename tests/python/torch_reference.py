"""torch-side oracles for the Python tests (docs/DESIGN.md §5):

- oracle(): torch SDPA in fp32 (fp64 when the inputs are fp32, i.e. on the CPU) with an explicit
  boolean mask built from flash_attn's bottom-right rule, on flash_attn's (batch, seqlen, heads, d) layout;
- standard(): the textbook attention in the input dtype (S and P materialised, softmax in fp32): the
  same-precision baseline whose error sets the tolerance;
- assert_rule(): max|ours - ref| <= 2 * max|base - ref| + atol.
"""

import torch
import torch.nn.functional as F


def devices():
    import flashattn

    out = ["cpu"]
    if torch.cuda.is_available() and flashattn.cuda_available():
        out.append("cuda")
    return out


def dtypes(device):
    return [torch.bfloat16, torch.float16] if device == "cuda" else [torch.float32, torch.bfloat16]


def oracle_dtype(dtype):
    return torch.float64 if dtype == torch.float32 else torch.float32


def visible(seqlen_q, seqlen_k, causal=False, window=(-1, -1), device=None):
    """(seqlen_q, seqlen_k) bool: query i sees key j (bottom-right aligned, docs/DESIGN.md §2)."""
    left, right = window
    if causal:
        right = 0
    i = torch.arange(seqlen_q, device=device)[:, None]
    j = torch.arange(seqlen_k, device=device)[None, :]
    diag = i + seqlen_k - seqlen_q
    ok = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if left >= 0:
        ok &= j >= diag - left
    if right >= 0:
        ok &= j <= diag + right
    return ok


def oracle(q, k, v, softmax_scale=None, causal=False, window=(-1, -1)):
    """SDPA in the oracle dtype; rows that see no key give 0 (SDPA gives NaN there)."""
    dt = oracle_dtype(q.dtype)
    h, hk = q.shape[2], k.shape[2]
    qt, kt, vt = (x.to(dt).transpose(1, 2) for x in (q, k, v))
    kt, vt = kt.repeat_interleave(h // hk, dim=1), vt.repeat_interleave(h // hk, dim=1)
    mask = visible(q.shape[1], k.shape[1], causal, window, q.device)
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=softmax_scale)
    return out.transpose(1, 2).nan_to_num(0.0)


def standard(q, k, v, softmax_scale=None, causal=False, window=(-1, -1)):
    """The textbook attention in the input dtype (the baseline of docs/DESIGN.md §5)."""
    h, hk, d = q.shape[2], k.shape[2], q.shape[3]
    scale = d ** -0.5 if softmax_scale is None else softmax_scale
    k, v = k.repeat_interleave(h // hk, dim=2), v.repeat_interleave(h // hk, dim=2)
    s = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    s = s.masked_fill(~visible(q.shape[1], k.shape[1], causal, window, q.device), float("-inf"))
    p = torch.softmax(s.float(), dim=-1).nan_to_num(0.0).to(q.dtype)
    return torch.einsum("bhij,bjhd->bihd", p, v)


def max_err(x, ref):
    if x.numel() == 0:
        return 0.0
    return (x.double() - ref.double()).abs().max().item()


def atol_for(dtype, grad=False):
    if dtype == torch.float32:
        return 1e-5
    return 5e-3 if grad else 1e-3


def assert_rule(ours, ref, base, atol, what=""):
    err, base_err = max_err(ours, ref), max_err(base, ref)
    scale = max(1.0, ref.abs().max().item()) if ref.numel() else 1.0
    assert err <= 2 * base_err + atol * scale, f"{what}: max err {err:.3g} vs standard {base_err:.3g} (atol {atol})"


def grads(outputs, inputs, grad_outputs):
    """Autograd through flashattn's backward (every backend has one: a NotImplementedError fails)."""
    return torch.autograd.grad(outputs, inputs, grad_outputs)
