"""flashattn._C.forward_eager, the eager torch path's forward entry (positional arguments; tensors
through DLPack's C exchange API or DLPack capsules, read in place): same results as _C.forward over
nanobind arrays, and every bad argument is refused with an error naming it."""

import pytest

torch = pytest.importorskip("torch")

from flashattn import _C  # noqa: E402

cap = torch._C._to_dlpack
exchange_api = pytest.mark.skipif(not _C.has_exchange_api(torch.Tensor),
                                  reason="this torch has no DLPack C exchange API (__dlpack_c_exchange_api__)")


def same(t):
    return t


def problem(dv=32, dtype=torch.float32):
    torch.manual_seed(0)
    q = torch.randn(2, 3, 4, 32, dtype=dtype)
    k = torch.randn(2, 7, 2, 32, dtype=dtype)
    v = torch.randn(2, 7, 2, dv, dtype=dtype)
    return q, k, v


def call(q, k, v, out, lse=None, seqused_k=None, alibi=None, scale=None, causal=False, left=-1, right=-1,
         softcap=0.0, deterministic=False, num_splits=0, stream=0, wrap=cap):
    """forward_eager with each tensor through `wrap` (None stays None)."""
    w = [None if t is None else wrap(t) for t in (q, k, v, out, lse, seqused_k, alibi)]
    _C.forward_eager(*w, scale, causal, left, right, softcap, deterministic, num_splits, stream)


WRAPS = [pytest.param(cap, id="capsules"), pytest.param(same, id="tensors", marks=exchange_api)]


@pytest.mark.parametrize("wrap", WRAPS)
@pytest.mark.parametrize("options", [
    {},
    {"scale": 0.3, "causal": True},
    {"left": 2, "right": 0, "softcap": 5.0},
    {"seqused_k": "lengths", "causal": True},
    {"alibi": "slopes"},
])
def test_matches_the_nanobind_entry(options, wrap):
    q, k, v = problem(dv=16)
    options = dict(options)
    if options.get("seqused_k") == "lengths":
        options["seqused_k"] = torch.tensor([7, 4], dtype=torch.int32)
    if options.get("alibi") == "slopes":
        options["alibi"] = torch.rand(4)
    out, lse = torch.empty(2, 3, 4, 16), torch.empty(2, 4, 3)
    call(q, k, v, out, lse, **options, wrap=wrap)
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
    call(q, k, v, out_only, None, **options, wrap=wrap)  # no lse wanted: same output
    assert torch.equal(out_only, ref_out)


@pytest.mark.parametrize("wrap", [pytest.param(lambda t: t.__dlpack__(max_version=(1, 0)), id="versioned"),
                                  pytest.param(same, id="tensors", marks=exchange_api)])
def test_strided_views(wrap):
    q, k, v = problem()
    big = torch.randn(2, 7, 2, 64)
    k_view = big[..., :32]  # strided in every dim but the last
    v_view = torch.randn(2, 2, 7, 32).transpose(1, 2)
    out, ref = torch.empty(2, 3, 4, 32), torch.empty(2, 3, 4, 32)
    call(q, k_view, v_view, out, wrap=wrap)
    call(q, k_view.contiguous(), v_view.contiguous(), ref)
    assert torch.equal(out, ref)


def test_stream_from_torch_needs_the_exchange_api():
    q, k, v = problem()
    call(q, k, v, torch.empty_like(q), stream=None)  # CPU: no stream to ask for, capsules or not
    if not (torch.cuda.is_available() and _C.cuda_available()):
        return
    qc, kc, vc = (torch.randn(2, 3, 4, 64, device="cuda", dtype=torch.bfloat16),
                  torch.randn(2, 7, 2, 64, device="cuda", dtype=torch.bfloat16),
                  torch.randn(2, 7, 2, 64, device="cuda", dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="'stream'"):
        call(qc, kc, vc, torch.empty_like(qc), stream=None)  # capsules: the caller passes the stream
    if not _C.has_exchange_api(torch.Tensor):
        return
    ref = torch.empty_like(qc)
    call(qc, kc, vc, ref, stream=torch.cuda.current_stream().cuda_stream, wrap=same)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # runs on torch's current stream, asked of torch in C
        out = torch.empty_like(qc)
        call(qc, kc, vc, out, stream=None, wrap=same)
    side.synchronize()
    torch.cuda.synchronize()
    assert torch.equal(out, ref)


@pytest.mark.parametrize("wrap", WRAPS)
def test_errors_name_the_argument(wrap):
    q, k, v = problem()
    out = torch.empty_like(q)
    with pytest.raises(ValueError, match="'q'.*DLPack capsule"):
        call(q, k, v, out, wrap=lambda t: t.numpy())  # neither a capsule nor a type with the exchange API
    used = cap(k)
    torch.from_dlpack(used)  # consumes it: renamed "used_dltensor"
    with pytest.raises(ValueError, match="'k'.*unused DLPack capsule"):
        _C.forward_eager(cap(q), used, cap(v), cap(out), None, None, None, None, False, -1, -1, 0.0, False, 0, 0)
    with pytest.raises(ValueError, match="'v'"):
        call(q, k, v.double(), out, wrap=wrap)
    with pytest.raises(ValueError, match="'out'.*contiguous last dimension"):
        call(q, k, v, torch.empty(2, 3, 4, 64)[..., ::2], wrap=wrap)
    with pytest.raises(ValueError, match="'lse'"):
        call(q, k, v, out, torch.empty(2, 3, 4), wrap=wrap)
    with pytest.raises(ValueError, match="'seqused_k'"):
        call(q, k, v, out, seqused_k=torch.tensor([7, 4], dtype=torch.int64), wrap=wrap)
    with pytest.raises(ValueError, match="'seqused_k'"):
        call(q, k, v, out, seqused_k=torch.tensor([7, 9], dtype=torch.int32), wrap=wrap)  # beyond seqlen_k (CPU checks)
    with pytest.raises(ValueError, match="'alibi_slopes'"):
        call(q, k, v, out, alibi=torch.rand(5), wrap=wrap)
    with pytest.raises(ValueError, match="'window_left'"):
        call(q, k, v, out, left=1 << 40, wrap=wrap)
    with pytest.raises(TypeError):
        call(q, k, v, out, left="2", wrap=wrap)
    with pytest.raises(TypeError):
        call(q, k, v, out, scale="0.5", wrap=wrap)
    with pytest.raises(TypeError, match="15 positional arguments"):
        _C.forward_eager(wrap(q), wrap(k), wrap(v), wrap(out))


def eager_out(q, k, v, seqused_k=None, alibi=None, scale=None, causal=False, left=-1, right=-1, softcap=0.0,
              deterministic=False, num_splits=0, empty_like=torch.empty_like):
    return _C.forward_eager_out(empty_like, q, k, v, seqused_k, alibi, scale, causal, left, right, softcap,
                                deterministic, num_splits)


@exchange_api
@pytest.mark.parametrize("options", [{}, {"scale": 0.3, "causal": True}, {"left": 2, "right": 0},
                                     {"seqused_k": "lengths", "causal": True}])
def test_eager_out_allocates_and_matches(options):
    q, k, v = problem()
    options = dict(options)
    if options.get("seqused_k") == "lengths":
        options["seqused_k"] = torch.tensor([7, 4], dtype=torch.int32)
    out = eager_out(q, k, v, **options)
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    ref = torch.empty_like(q)
    call(q, k, v, ref, **options, wrap=same)
    assert torch.equal(out, ref)
    k_strided = torch.randn(2, 2, 7, 32).transpose(1, 2)  # strided, but a dense last dim: still this path
    assert eager_out(q, k_strided, v) is not NotImplemented


@exchange_api
def test_eager_out_leaves_other_layouts_to_python():
    q, k, v = problem()
    assert eager_out(q.transpose(1, 2).contiguous().transpose(1, 2), k, v) is NotImplemented  # q not contiguous
    assert eager_out(q, torch.randn(2, 7, 2, 64)[..., ::2], v) is NotImplemented  # k's last dim strided
    assert eager_out(q, k, torch.randn(2, 7, 2, 64)[..., ::2]) is NotImplemented
    assert eager_out(q, k, torch.randn(2, 7, 2, 16)) is NotImplemented  # d_v != d: an explicit output shape


@exchange_api
def test_eager_out_errors():
    q, k, v = problem()
    with pytest.raises(ValueError, match="'k'"):
        eager_out(q, k.double(), v)
    with pytest.raises(ValueError, match="'seqused_k'"):
        eager_out(q, k, v, seqused_k=torch.tensor([7, 9], dtype=torch.int32))
    with pytest.raises(ValueError, match="'window_right'"):
        eager_out(q, k, v, right=1 << 40)
    with pytest.raises(RuntimeError, match="allocator failed"):
        eager_out(q, k, v, empty_like=lambda t: (_ for _ in ()).throw(RuntimeError("allocator failed")))
    with pytest.raises(ValueError, match="'out'"):
        eager_out(q, k, v, empty_like=lambda t: torch.empty_like(t).double())  # the allocation is checked too
    with pytest.raises(TypeError, match="13 positional arguments"):
        _C.forward_eager_out(torch.empty_like, q, k, v)


@pytest.mark.parametrize("layout", ["q transposed", "k last dim strided", "d_v != d", "contiguous"])
def test_flash_attn_func_layouts(layout):
    """flash_attn_func over the C-allocating path and its Python fallbacks: the same numbers."""
    import flashattn
    q, k, v = problem(dv=16 if layout == "d_v != d" else 32)
    if layout == "q transposed":
        q = q.transpose(1, 2).contiguous().transpose(1, 2)
    if layout == "k last dim strided":
        k = torch.stack([k, k], dim=-1)[..., 0]
    out = flashattn.flash_attn_func(q, k, v, causal=True)
    ref = flashattn.flash_attn_func(q.contiguous().numpy(), k.contiguous().numpy(), v.contiguous().numpy(),
                                    causal=True)
    assert out.shape == q.shape[:-1] + (v.shape[-1],) and out.is_contiguous()
    assert torch.allclose(out, torch.from_numpy(ref), atol=1e-6)
