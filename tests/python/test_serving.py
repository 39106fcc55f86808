"""The serving API of flash_attn_with_kvcache / flash_attn_varlen_func: paged caches (block_table /
page_table, any page size), rotary embedding fused with the append (both layouts), cache_batch_idx,
cache_leftpad, attention sinks (with their gradient), flash_attn v2's window conventions, and the
guarantee that a rejected call writes nothing. numpy always; torch (CPU, and CUDA when present) where
installed. The reference is reference.py's fp64 attention over caches gathered and rotated here, by the
definitions flash_attn documents."""

import numpy as np
import pytest

import flashattn
from reference import attention

try:
    import torch
except ImportError:
    torch = None

RNG = np.random.default_rng(13)


def randn(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def rotate(x, cos, sin, positions, interleaved):
    """flash_attn's rotary: x (n, heads, d) at table rows `positions` (n,); pairs (2i, 2i+1) when
    interleaved, else (i, i + rotary_dim/2); dims past rotary_dim unchanged."""
    x = np.array(x, dtype=np.float64)
    rd = 2 * cos.shape[1]
    c, s = cos[positions][:, None, :].astype(np.float64), sin[positions][:, None, :].astype(np.float64)
    if interleaved:
        x0, x1 = x[..., 0:rd:2].copy(), x[..., 1:rd:2].copy()
        x[..., 0:rd:2], x[..., 1:rd:2] = x0 * c - x1 * s, x0 * s + x1 * c
    else:
        x0, x1 = x[..., :rd // 2].copy(), x[..., rd // 2:rd].copy()
        x[..., :rd // 2], x[..., rd // 2:rd] = x0 * c - x1 * s, x0 * s + x1 * c
    return x


class Case:
    """A kvcache call with every feature; reference() computes what it must return and leave in the cache."""

    def __init__(self, batch=3, seqlen_q=1, new=2, heads=4, heads_k=2, d=32, capacity=48, page_size=None,
                 leftpad=False, batch_idx=False, rotary_dim=0, interleaved=True, causal=False, sinks=False):
        self.batch, self.seqlen_q, self.new, self.heads, self.heads_k, self.d = batch, seqlen_q, new, heads, heads_k, d
        self.causal, self.interleaved, self.batch_idx = causal, interleaved, batch_idx
        rows = batch + 2 if batch_idx else batch
        self.idx = RNG.permutation(rows)[:batch].astype(np.int32) if batch_idx else np.arange(batch, dtype=np.int32)
        self.page_size = page_size
        if page_size:
            self.pages_per_seq = -(-capacity // page_size)
            self.capacity = self.pages_per_seq * page_size
            num_pages = rows * self.pages_per_seq + 2
            self.table = RNG.permutation(num_pages)[:rows * self.pages_per_seq].reshape(rows, -1).astype(np.int32)
            self.k_cache, self.v_cache = randn(num_pages, page_size, heads_k, d), randn(num_pages, page_size, heads_k, d)
        else:
            self.capacity = capacity
            self.table = None
            self.k_cache, self.v_cache = randn(rows, capacity, heads_k, d), randn(rows, capacity, heads_k, d)
        self.seqlens = np.array([self.capacity - new, 0] + list(RNG.integers(0, self.capacity - new + 1, batch - 2)),
                                dtype=np.int32)
        self.leftpad = np.array([RNG.integers(0, n + 1) for n in self.seqlens], dtype=np.int32) if leftpad else None
        self.q = randn(batch, seqlen_q, heads, d)
        self.k_new, self.v_new = (randn(batch, new, heads_k, d), randn(batch, new, heads_k, d)) if new else (None, None)
        self.cos = self.sin = None
        if rotary_dim:
            angles = np.arange(self.capacity)[:, None] * 10000.0 ** (-np.arange(rotary_dim // 2) * 2 / rotary_dim)
            self.cos, self.sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
        self.sinks = (RNG.standard_normal(heads) * 2).astype(np.float32) if sinks else None

    def kwargs(self, convert=np.asarray):
        opt = lambda x: None if x is None else convert(x)  # noqa: E731
        return dict(cache_seqlens=convert(self.seqlens), cache_batch_idx=opt(self.idx if self.batch_idx else None),
                    cache_leftpad=opt(self.leftpad), block_table=opt(self.table),
                    rotary_cos=opt(self.cos), rotary_sin=opt(self.sin), rotary_interleaved=self.interleaved,
                    causal=self.causal, sinks=opt(self.sinks), return_softmax_lse=True)

    def slot(self, b, s):
        """(cache index tuple) of slot s of sequence b: through the page table when paged."""
        row = self.idx[b]
        if self.table is None:
            return row, s
        return self.table[row, s // self.page_size], s % self.page_size

    def reference(self):
        k_cache, v_cache = self.k_cache.astype(np.float64), self.v_cache.astype(np.float64)
        outs, lses = [], []
        for b in range(self.batch):
            n = int(self.seqlens[b])
            if self.new:
                k = self.k_new[b]
                if self.cos is not None:
                    k = rotate(k, self.cos, self.sin, np.arange(n, n + self.new), self.interleaved)
                for j in range(self.new):
                    k_cache[self.slot(b, n + j)] = np.float32(k[j])
                    v_cache[self.slot(b, n + j)] = self.v_new[b, j]
            start = int(self.leftpad[b]) if self.leftpad is not None else 0
            end = n + self.new
            keys = np.stack([k_cache[self.slot(b, s)] for s in range(start, end)]) if end > start else \
                np.zeros((0, self.heads_k, self.d))
            vals = np.stack([v_cache[self.slot(b, s)] for s in range(start, end)]) if end > start else \
                np.zeros((0, self.heads_k, self.d))
            q = self.q[b]
            if self.cos is not None:
                pos = n + np.arange(self.seqlen_q) if self.causal else np.full(self.seqlen_q, n)
                q = np.float32(rotate(q, self.cos, self.sin, pos, self.interleaved))
            out, lse = attention(q[None], keys[None], vals[None], causal=self.causal, sinks=self.sinks)
            outs.append(out)
            lses.append(lse)
        return np.concatenate(outs), np.concatenate(lses), k_cache, v_cache


CASES = {
    "dense": dict(),
    "paged1": dict(page_size=1),
    "paged16_batch_idx_leftpad": dict(page_size=16, batch_idx=True, leftpad=True, capacity=70),
    "paged256": dict(page_size=256, capacity=300),
    "rotary_interleaved_causal": dict(rotary_dim=32, seqlen_q=2, new=2, causal=True),
    "rotary_neox_partial_paged": dict(rotary_dim=16, interleaved=False, page_size=5),
    "batch_idx_rotary": dict(batch_idx=True, rotary_dim=32),
    "sinks_paged_leftpad": dict(sinks=True, page_size=16, leftpad=True),
    "no_append_paged_sinks": dict(new=0, page_size=8, sinks=True),
}


def close(ours, ref, tol=2e-5):
    ours = np.asarray(ours, np.float64)
    scale = max(1.0, float(np.nanmax(np.abs(ref[np.isfinite(ref)]))) if np.isfinite(ref).any() else 1.0)
    finite = np.isfinite(ref)
    assert np.array_equal(np.isfinite(ours), finite), "non-finite entries differ"
    assert np.max(np.abs(ours[finite] - ref[finite]), initial=0.0) <= tol * scale


@pytest.mark.parametrize("name", CASES)
def test_numpy_matches_reference(name):
    c = Case(**CASES[name])
    out, lse, k_ref, v_ref = c.reference()
    got, got_lse = flashattn.flash_attn_with_kvcache(c.q, c.k_cache, c.v_cache, c.k_new, c.v_new, **c.kwargs())
    close(got, out)
    close(got_lse, lse)
    close(c.k_cache, k_ref, 1e-6)
    np.testing.assert_array_equal(c.v_cache, v_ref.astype(np.float32))


def torch_devices():
    if torch is None:
        return []
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() and flashattn.cuda_available() else [])


@pytest.mark.parametrize("device", torch_devices())
@pytest.mark.parametrize("name", CASES)
def test_torch_matches_reference(device, name):
    c = Case(**CASES[name])
    out, lse, k_ref, v_ref = c.reference()
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    tol = 2e-5 if device == "cpu" else 3e-2
    to = lambda x: torch.from_numpy(np.ascontiguousarray(x)).to(device)  # noqa: E731
    to_f = lambda x: to(x).to(dtype)  # noqa: E731
    k_cache, v_cache = to_f(c.k_cache), to_f(c.v_cache)
    kw = c.kwargs(to)
    for key in ("rotary_cos", "rotary_sin"):
        kw[key] = None if kw[key] is None else kw[key].to(dtype)
    got, got_lse = flashattn.flash_attn_with_kvcache(to_f(c.q), k_cache, v_cache,
                                                     None if c.k_new is None else to_f(c.k_new),
                                                     None if c.v_new is None else to_f(c.v_new), **kw)
    close(got.float().cpu().numpy(), out, tol)
    close(got_lse.cpu().numpy(), lse, tol)
    close(k_cache.float().cpu().numpy(), k_ref, 1e-6 if device == "cpu" else 1e-2)


# ---- a rejected call writes nothing -----------------------------------------------------------------

BAD = {
    "length_past_cache": ("cache_seqlens", lambda c, kw: kw["cache_seqlens"].__setitem__(2, c.capacity - 1)),
    "page_id_out_of_range": ("page_table", lambda c, kw: kw["block_table"].__setitem__(
        (c.idx[0], (int(c.seqlens[0]) + c.new - 1) // c.page_size), 10 ** 6)),
    "leftpad_past_length": ("cache_leftpad", lambda c, kw: kw["cache_leftpad"].__setitem__(2, c.seqlens[2] + 1)),
    "batch_idx_out_of_range": ("cache_batch_idx", lambda c, kw: kw["cache_batch_idx"].__setitem__(1, 99)),
    "batch_idx_repeated": ("cache_batch_idx", lambda c, kw: kw["cache_batch_idx"].__setitem__(2, kw["cache_batch_idx"][0])),
    "rotary_table_short": ("rotary_cos", lambda c, kw: kw.update(rotary_cos=kw["rotary_cos"][:-1], rotary_sin=kw["rotary_sin"][:-1])),
    "sinks_shape": ("sinks", lambda c, kw: kw.update(sinks=kw["sinks"][:2])),
    "both_table_names": ("page_table", lambda c, kw: kw.update(page_table=kw["block_table"])),
}


def _bad_case():
    return Case(batch=4, page_size=4, leftpad=True, batch_idx=True, rotary_dim=16, sinks=True, causal=True)


def _check_untouched(before, after):
    for name, (x, y) in zip(("q", "k_cache", "v_cache", "k", "v"), zip(before, after)):
        assert np.array_equal(x, y), f"{name} was modified by a rejected call"


@pytest.mark.parametrize("bad", BAD)
def test_numpy_rejected_call_writes_nothing(bad):
    c = _bad_case()
    kw = c.kwargs(lambda x: np.array(x))
    argument, spoil = BAD[bad]
    spoil(c, kw)
    before = [x.copy() for x in (c.q, c.k_cache, c.v_cache, c.k_new, c.v_new)]
    with pytest.raises(ValueError, match=f"'{argument}'"):
        flashattn.flash_attn_with_kvcache(c.q, c.k_cache, c.v_cache, c.k_new, c.v_new, **kw)
    _check_untouched(before, (c.q, c.k_cache, c.v_cache, c.k_new, c.v_new))


@pytest.mark.skipif(torch is None, reason="torch not installed")
@pytest.mark.parametrize("bad", BAD)
def test_torch_rejected_call_writes_nothing(bad):
    c = _bad_case()
    kw = c.kwargs(lambda x: torch.from_numpy(np.array(x)))
    argument, spoil = BAD[bad]
    spoil(c, kw)
    tensors = [torch.from_numpy(x) for x in (c.q, c.k_cache, c.v_cache, c.k_new, c.v_new)]
    before = [t.clone().numpy() for t in tensors]
    with pytest.raises(ValueError, match=f"'{argument}'"):
        flashattn.flash_attn_with_kvcache(*tensors, **kw)
    _check_untouched(before, [t.numpy() for t in tensors])


# ---- paged varlen ------------------------------------------------------------------------------------

@pytest.mark.parametrize("page_size", [1, 16, 256])
@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_varlen_block_table(page_size, lib):
    if lib == "torch" and torch is None:
        pytest.skip("torch not installed")
    lens_q, lens_k, heads, heads_k, d = [2, 1, 4], [40, 300, 4], 4, 2, 32
    pages_per_seq = -(-300 // page_size)
    num_pages = 3 * pages_per_seq + 1
    table = RNG.permutation(num_pages)[:3 * pages_per_seq].reshape(3, -1).astype(np.int32)
    k_cache, v_cache = randn(num_pages, page_size, heads_k, d), randn(num_pages, page_size, heads_k, d)
    q = randn(sum(lens_q), heads, d)
    cu_q = np.cumsum([0] + lens_q).astype(np.int32)
    cu_k = np.cumsum([0] + lens_k).astype(np.int32)
    args = (q, k_cache, v_cache, cu_q, cu_k, max(lens_q), max(lens_k))
    if lib == "torch":
        args = tuple(torch.from_numpy(x) if isinstance(x, np.ndarray) else x for x in args)
        table = torch.from_numpy(table)
    out = np.asarray(flashattn.flash_attn_varlen_func(*args, causal=True, block_table=table))
    table = np.asarray(table)
    for b in range(3):
        slots = [(table[b, s // page_size], s % page_size) for s in range(lens_k[b])]
        keys = np.stack([k_cache[t] for t in slots])[None]
        vals = np.stack([v_cache[t] for t in slots])[None]
        ref, _ = attention(q[cu_q[b]:cu_q[b + 1]][None], keys, vals, causal=True)
        close(out[cu_q[b]:cu_q[b + 1]], ref[0])


# ---- sinks: forward and gradient --------------------------------------------------------------------

@pytest.mark.skipif(torch is None, reason="torch not installed")
@pytest.mark.parametrize("varlen", [False, True])
def test_sinks_forward_and_gradient(varlen):
    torch.manual_seed(5)
    q = torch.randn(2, 9, 4, 16, dtype=torch.float64).float().requires_grad_()
    k = torch.randn(2, 6, 2, 16).requires_grad_()
    v = torch.randn(2, 6, 2, 16).requires_grad_()
    sinks = (torch.randn(4) * 2).requires_grad_()
    g = torch.randn(2, 9, 4, 16)

    def ref(q, k, v, sinks):  # fp64: softmax over the scores and one value-less sink column
        q, k, v, sinks = q.double(), k.double(), v.double(), sinks.double()
        kk, vv = k.repeat_interleave(2, 2), v.repeat_interleave(2, 2)
        s = torch.einsum("bihd,bjhd->bhij", q, kk) / 4.0
        mask = torch.ones(9, 6, dtype=torch.bool).tril(6 - 9)
        s = s.masked_fill(~mask, float("-inf"))
        s = torch.cat([s, sinks[None, :, None, None].expand(2, 4, 9, 1)], -1)
        p = torch.softmax(s, -1)[..., :-1]
        return torch.einsum("bhij,bjhd->bihd", p, vv)

    if varlen:
        cu = torch.tensor([0, 9, 18], dtype=torch.int32)
        cu_k = torch.tensor([0, 6, 12], dtype=torch.int32)
        out = flashattn.flash_attn_varlen_func(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu, cu_k, 9, 6,
                                               causal=True, sinks=sinks).unflatten(0, (2, 9))
    else:
        out = flashattn.flash_attn_func(q, k, v, causal=True, sinks=sinks)
    expect = ref(q, k, v, sinks)
    assert (out.double() - expect).abs().max() < 1e-5
    grads = torch.autograd.grad((out * g).sum(), (q, k, v, sinks))
    expect_grads = torch.autograd.grad((expect * g.double()).sum(), (q, k, v, sinks))
    for name, a, b in zip(("dq", "dk", "dv", "dsinks"), grads, expect_grads):
        assert (a.double() - b).abs().max() < 1e-4 * max(1.0, b.abs().max().item()), name


def test_learnable_sink_alias_and_numpy_sinks():
    q, k, v = randn(1, 5, 2, 8), randn(1, 7, 2, 8), randn(1, 7, 2, 8)
    sinks = np.array([0.5, -1.0], np.float32)
    out = flashattn.flash_attn_func(q, k, v, learnable_sink=sinks)
    close(out, attention(q, k, v, sinks=sinks)[0])
    with pytest.raises(ValueError, match="'sinks'"):
        flashattn.flash_attn_func(q, k, v, sinks=sinks, learnable_sink=sinks)


# ---- flash_attn v2's window conventions -------------------------------------------------------------

@pytest.mark.parametrize("kind", ["tuple", "list", "array", "tensor"])
def test_window_size_any_pair_and_causal_sets_right_to_zero(kind):
    q, k, v = randn(1, 12, 2, 16), randn(1, 12, 2, 16), randn(1, 12, 2, 16)
    window = {"tuple": (3, 2), "list": [3, 2], "array": np.array([3, 2])}.get(kind)
    if kind == "tensor":
        if torch is None:
            pytest.skip("torch not installed")
        window = torch.tensor([3, 2])
    close(flashattn.flash_attn_func(q, k, v, window_size=window), attention(q, k, v, window=(3, 2))[0])
    # causal=True with a window: flash_attn takes the right window as 0
    close(flashattn.flash_attn_func(q, k, v, causal=True, window_size=window), attention(q, k, v, window=(3, 0))[0])


# ---- seqused_q (flash_attn v3) ----------------------------------------------------------------------

@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_varlen_seqused_q_uses_only_the_first_rows(lib):
    """Sequence b uses its first seqused_q[b] query rows (causal aligned on that length); the other rows
    are zeros (not written)."""
    if lib == "torch" and torch is None:
        pytest.skip("torch not installed")
    lens_q, lens_k, used_q = [5, 3, 4], [7, 2, 9], [2, 3, 0]
    q, k, v = randn(sum(lens_q), 4, 16), randn(sum(lens_k), 2, 16), randn(sum(lens_k), 2, 16)
    cu_q = np.cumsum([0] + lens_q).astype(np.int32)
    cu_k = np.cumsum([0] + lens_k).astype(np.int32)
    args = [q, k, v, cu_q, cu_k, 5, 9]
    used = np.array(used_q, np.int32)
    if lib == "torch":
        args = [torch.from_numpy(x) if isinstance(x, np.ndarray) else x for x in args]
        used = torch.from_numpy(used)
    out = np.asarray(flashattn.flash_attn_varlen_func(*args, causal=True, seqused_q=used))
    for b in range(3):
        rows = out[cu_q[b]:cu_q[b + 1]]
        ref, _ = attention(q[cu_q[b]:cu_q[b] + used_q[b]][None], k[cu_k[b]:cu_k[b + 1]][None],
                           v[cu_k[b]:cu_k[b + 1]][None], causal=True)
        close(rows[:used_q[b]], ref[0])
        assert np.all(rows[used_q[b]:] == 0)
    with pytest.raises(ValueError, match="'seqused_q'"):
        bad = np.array([6, 0, 0], np.int32) if lib == "numpy" else torch.tensor([6, 0, 0], dtype=torch.int32)
        flashattn.flash_attn_varlen_func(*args, seqused_q=bad)  # past sequence 0's 5 rows


# ---- clear errors for what does not fit (issue 10 item 7) --------------------------------------------

@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_dtype_messages_say_the_same_thing(lib):
    if lib == "torch" and torch is None:
        pytest.skip("torch not installed")
    conv = (lambda x: x) if lib == "numpy" else torch.from_numpy
    q64 = conv(np.random.default_rng(0).standard_normal((1, 4, 2, 8)))
    with pytest.raises(ValueError, match="'q': expected float32, float16 or bfloat16, got float64"):
        flashattn.flash_attn_func(q64, q64, q64)
    q = conv(randn(4, 2, 8))
    cu = conv(np.array([0, 2, 4], np.int64))
    with pytest.raises(ValueError, match="'cu_seqlens_q': expected int32, got int64"):
        flashattn.flash_attn_varlen_func(q, q, q, cu, cu, 2, 2)


@pytest.mark.skipif(torch is None, reason="torch not installed")
def test_meta_and_mixed_inputs_name_the_argument():
    meta = torch.empty(1, 4, 2, 8, device="meta")
    with pytest.raises(ValueError, match="'q'"):
        flashattn.flash_attn_func(meta, meta, meta)
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="'k'.*numpy and torch"):
        flashattn.flash_attn_func(q, q.numpy(), q)
    with pytest.raises(ValueError, match="'k'.*numpy and torch"):
        flashattn.flash_attn_func(q.numpy(), q, q)


# ---- CUDA: a paged decode step with appends in a CUDA graph ------------------------------------------

@pytest.mark.skipif(torch is None or not torch.cuda.is_available() or not flashattn.cuda_available(),
                    reason="needs a CUDA device and a CUDA build")
def test_cuda_graph_paged_decode_step_with_append():
    """Captured once, replayed: appends (rotary) into a paged cache and attends, with no host
    synchronisation (sync debug mode 'error' during capture and replay); equals the eager step."""
    c = Case(batch=4, seqlen_q=1, new=1, heads=32, heads_k=8, d=128, capacity=2048, page_size=16, rotary_dim=128,
             sinks=True, causal=True)
    dev = lambda x: None if x is None else torch.from_numpy(np.ascontiguousarray(x)).cuda()  # noqa: E731
    bf = lambda x: dev(x).to(torch.bfloat16)  # noqa: E731
    kw = {k: (dev(v) if isinstance(v, np.ndarray) else v) for k, v in c.kwargs(np.asarray).items()}
    kw["rotary_cos"], kw["rotary_sin"] = kw["rotary_cos"].bfloat16(), kw["rotary_sin"].bfloat16()
    kw["return_softmax_lse"] = False
    q, k_new, v_new = bf(c.q), bf(c.k_new), bf(c.v_new)
    k_eager, v_eager = bf(c.k_cache), bf(c.v_cache)
    k_graph, v_graph = k_eager.clone(), v_eager.clone()
    expect = flashattn.flash_attn_with_kvcache(q, k_eager, v_eager, k_new, v_new, **kw)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.cuda.graph(graph):
            out = flashattn.flash_attn_with_kvcache(q, k_graph, v_graph, k_new, v_new, **kw)
        graph.replay()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert torch.equal(out, expect)
    assert torch.equal(k_graph, k_eager) and torch.equal(v_graph, v_eager)
