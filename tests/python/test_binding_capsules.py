"""flashattn._C.forward_capsules, the eager torch path's forward entry (DLPack capsules read in place,
positional arguments): same results as _C.forward over nanobind arrays, and every bad argument is
refused with an error naming it."""

import pytest

torch = pytest.importorskip("torch")

from flashattn import _C  # noqa: E402

cap = torch._C._to_dlpack


def problem(dv=32, dtype=torch.float32):
    torch.manual_seed(0)
    q = torch.randn(2, 3, 4, 32, dtype=dtype)
    k = torch.randn(2, 7, 2, 32, dtype=dtype)
    v = torch.randn(2, 7, 2, dv, dtype=dtype)
    return q, k, v


def call(q, k, v, out, lse=None, seqused_k=None, alibi=None, scale=None, causal=False, left=-1, right=-1,
         softcap=0.0, deterministic=False, num_splits=0, stream=0, wrap=cap):
    """forward_capsules with each tensor through `wrap` (None stays None)."""
    w = [None if t is None else wrap(t) for t in (q, k, v, out, lse, seqused_k, alibi)]
    _C.forward_capsules(*w, scale, causal, left, right, softcap, deterministic, num_splits, stream)


@pytest.mark.parametrize("options", [
    {},
    {"scale": 0.3, "causal": True},
    {"left": 2, "right": 0, "softcap": 5.0},
    {"seqused_k": "lengths", "causal": True},
    {"alibi": "slopes"},
])
def test_matches_the_nanobind_entry(options):
    q, k, v = problem(dv=16)
    options = dict(options)
    if options.get("seqused_k") == "lengths":
        options["seqused_k"] = torch.tensor([7, 4], dtype=torch.int32)
    if options.get("alibi") == "slopes":
        options["alibi"] = torch.rand(4)
    out, lse = torch.empty(2, 3, 4, 16), torch.empty(2, 4, 3)
    call(q, k, v, out, lse, **options)
    ref_out, ref_lse = torch.empty_like(out), torch.empty_like(lse)
    _C.forward(q.numpy(), k.numpy(), v.numpy(), ref_out.numpy(), ref_lse.numpy(),
               softmax_scale=options.get("scale"), causal=options.get("causal", False),
               window_left=options.get("left", -1), window_right=options.get("right", -1),
               softcap=options.get("softcap", 0.0),
               alibi_slopes=None if options.get("alibi") is None else options["alibi"].numpy(),
               seqused_k=None if options.get("seqused_k") is None else options["seqused_k"].numpy())
    assert torch.equal(out, ref_out)
    assert torch.equal(lse, ref_lse)
    out_only = torch.empty_like(out)
    call(q, k, v, out_only, None, **options)  # no lse wanted: same output
    assert torch.equal(out_only, ref_out)


def test_strided_views_and_versioned_capsules():
    q, k, v = problem()
    big = torch.randn(2, 7, 2, 64)
    k_view = big[..., :32]  # strided in every dim but the last
    out, ref = torch.empty(2, 3, 4, 32), torch.empty(2, 3, 4, 32)
    call(q, k_view, v, out, wrap=lambda t: t.__dlpack__(max_version=(1, 0)))  # DLManagedTensorVersioned
    call(q, k_view.contiguous(), v, ref)
    assert torch.equal(out, ref)


def test_errors_name_the_argument():
    q, k, v = problem()
    out = torch.empty_like(q)
    with pytest.raises(ValueError, match="'q'.*DLPack capsule"):
        call(q, k, v, out, wrap=lambda t: t)  # a tensor, not a capsule
    used = cap(k)
    torch.from_dlpack(used)  # consumes it: renamed "used_dltensor"
    with pytest.raises(ValueError, match="'k'.*unused DLPack capsule"):
        _C.forward_capsules(cap(q), used, cap(v), cap(out), None, None, None, None, False, -1, -1, 0.0, False, 0, 0)
    with pytest.raises(ValueError, match="'v'"):
        call(q, k, v.double(), out)
    with pytest.raises(ValueError, match="'out'.*contiguous last dimension"):
        call(q, k, v, torch.empty(2, 3, 4, 64)[..., ::2])
    with pytest.raises(ValueError, match="'lse'"):
        call(q, k, v, out, torch.empty(2, 3, 4))
    with pytest.raises(ValueError, match="'seqused_k'"):
        call(q, k, v, out, seqused_k=torch.tensor([7, 4], dtype=torch.int64))
    with pytest.raises(ValueError, match="'seqused_k'"):
        call(q, k, v, out, seqused_k=torch.tensor([7, 9], dtype=torch.int32))  # beyond seqlen_k (CPU checks)
    with pytest.raises(ValueError, match="'alibi_slopes'"):
        call(q, k, v, out, alibi=torch.rand(5))
    with pytest.raises(ValueError, match="'window_left'"):
        call(q, k, v, out, left=1 << 40)
    with pytest.raises(TypeError):
        call(q, k, v, out, left="2")
    with pytest.raises(TypeError):
        call(q, k, v, out, scale="0.5")
    with pytest.raises(TypeError, match="15 positional arguments"):
        _C.forward_capsules(cap(q), cap(k), cap(v), cap(out))
