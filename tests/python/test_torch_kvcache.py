"""flash_attn_with_kvcache on torch tensors against SDPA over each sequence's concatenated cache, and the
in-place append of new tokens."""

import pytest

torch = pytest.importorskip("torch")

import flashattn  # noqa: E402
from torch_reference import assert_rule, atol_for, devices, max_err, oracle, standard  # noqa: E402


def dtype_for(device):
    return torch.float32 if device == "cpu" else torch.bfloat16


def reference_per_sequence(q, k_cache, v_cache, lengths, **opts):
    """Per sequence b: attention of q[b] over k_cache[b, :lengths[b]] (oracle and standard baseline)."""
    refs, bases = [], []
    for b, length in enumerate(lengths):
        args = (q[b:b + 1], k_cache[b:b + 1, :length], v_cache[b:b + 1, :length])
        refs.append(oracle(*args, **opts))
        bases.append(standard(*args, **opts))
    return torch.cat(refs), torch.cat(bases)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seqlens_kind,append", [("none", 0), ("int", 0), ("int", 3), ("tensor", 0), ("tensor", 3)])
def test_kvcache_vs_sdpa(device, causal, seqlens_kind, append):
    dtype = dtype_for(device)
    torch.manual_seed(3)
    batch, seqlen_cache, heads, heads_k, d, seqlen_q = 3, 96, 8, 2, 64, 3
    k_cache = torch.randn(batch, seqlen_cache, heads_k, d, device=device, dtype=dtype)
    v_cache = torch.randn(batch, seqlen_cache, heads_k, d, device=device, dtype=dtype)
    q = torch.randn(batch, seqlen_q, heads, d, device=device, dtype=dtype)
    k_new = torch.randn(batch, append, heads_k, d, device=device, dtype=dtype) if append else None
    v_new = torch.randn(batch, append, heads_k, d, device=device, dtype=dtype) if append else None
    if seqlens_kind == "none":  # (appending needs cache_seqlens, as in flash_attn: test_kvcache_errors...)
        cache_seqlens, before = None, [seqlen_cache] * batch
    elif seqlens_kind == "int":
        cache_seqlens, before = 50, [50] * batch
    else:
        before = [5, 93 - append, 40]
        cache_seqlens = torch.tensor(before, dtype=torch.int32, device=device)
    k_before, v_before = k_cache.clone(), v_cache.clone()

    out, lse = flashattn.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=cache_seqlens,
                                                 causal=causal, return_softmax_lse=True)
    lengths = [n + append for n in before]
    for b, n in enumerate(before):  # the new tokens landed at [n, n + append); nothing else changed
        if append:
            assert torch.equal(k_cache[b, n:n + append], k_new[b]) and torch.equal(v_cache[b, n:n + append], v_new[b])
        for cache, old in ((k_cache, k_before), (v_cache, v_before)):
            assert torch.equal(cache[b, :n], old[b, :n]) and torch.equal(cache[b, n + append:], old[b, n + append:])
    ref, base = reference_per_sequence(q, k_cache, v_cache, lengths, causal=causal)
    assert out.shape == q.shape and lse.shape == (batch, heads, seqlen_q)
    assert_rule(out, ref, base, atol_for(dtype), "out")
    for b, length in enumerate(lengths):  # LSE against the logsumexp of the visible scores
        s = torch.einsum("ihd,jhd->hij", q[b].double(), k_cache[b, :length].double().repeat_interleave(4, dim=1))
        s = s * d ** -0.5
        if causal:
            s = s.masked_fill(torch.ones(seqlen_q, length, dtype=torch.bool, device=device).triu(length - seqlen_q + 1),
                              float("-inf"))
        assert max_err(lse[b], torch.logsumexp(s, dim=-1)) < 2e-2


@pytest.mark.parametrize("device", devices())
def test_kvcache_options_and_strided_caches(device):
    """Window, ALiBi (batch, heads) slopes, softcap off, scale; caches that are slices of larger buffers."""
    dtype = dtype_for(device)
    torch.manual_seed(4)
    batch, seqlen_cache, heads, heads_k, d = 4, 64, 4, 4, 64
    big_k = torch.randn(batch * 2, seqlen_cache + 16, heads_k, d, device=device, dtype=dtype)
    big_v = torch.randn(batch * 2, seqlen_cache + 16, heads_k, d, device=device, dtype=dtype)
    k_cache, v_cache = big_k[::2, 8:8 + seqlen_cache], big_v[::2, 8:8 + seqlen_cache]  # period != seqlen_cache
    q = torch.randn(batch, 2, heads, d, device=device, dtype=dtype)
    lengths = [64, 1, 33, 17]
    seqlens = torch.tensor(lengths, dtype=torch.int64, device=device)  # int64 is converted
    window = (7, 0)
    out = flashattn.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens, causal=True,
                                            window_size=window, softmax_scale=0.2)
    ref, base = reference_per_sequence(q, k_cache, v_cache, lengths, causal=True, window=window, softmax_scale=0.2)
    assert_rule(out, ref, base, atol_for(dtype), "windowed out")
    # ALiBi per (batch, head): each sequence's slopes align on its own cache length
    slopes = torch.rand(batch, heads, device=device, dtype=torch.float32) * 0.3
    out = flashattn.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens, alibi_slopes=slopes)
    for b, length in enumerate(lengths):
        single = flashattn.flash_attn_func(q[b:b + 1], k_cache[b:b + 1, :length], v_cache[b:b + 1, :length],
                                           alibi_slopes=slopes[b:b + 1])
        assert max_err(out[b:b + 1], single) <= (1e-6 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("device", devices())
def test_kvcache_decode_loop_matches_full_attention(device):
    """Token-by-token decoding with per-sequence lengths equals causal attention over the whole sequence."""
    dtype = dtype_for(device)
    torch.manual_seed(5)
    batch, heads, heads_k, d, steps, prompt = 2, 4, 2, 64, 6, [5, 9]
    k_all = torch.randn(batch, 16, heads_k, d, device=device, dtype=dtype)
    v_all = torch.randn(batch, 16, heads_k, d, device=device, dtype=dtype)
    q_all = torch.randn(batch, 16, heads, d, device=device, dtype=dtype)
    k_cache = torch.zeros(batch, 32, heads_k, d, device=device, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    for b, n in enumerate(prompt):
        k_cache[b, :n], v_cache[b, :n] = k_all[b, :n], v_all[b, :n]
    seqlens = torch.tensor(prompt, dtype=torch.int32, device=device)
    for t in range(steps):
        pos = [n + t for n in prompt]
        q = torch.stack([q_all[b, p] for b, p in enumerate(pos)])[:, None]
        k_new = torch.stack([k_all[b, p] for b, p in enumerate(pos)])[:, None]
        v_new = torch.stack([v_all[b, p] for b, p in enumerate(pos)])[:, None]
        out = flashattn.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=seqlens, causal=True)
        for b, p in enumerate(pos):
            full = flashattn.flash_attn_func(q_all[b:b + 1, :p + 1], k_all[b:b + 1, :p + 1], v_all[b:b + 1, :p + 1],
                                             causal=True)
            assert max_err(out[b, 0], full[0, p]) <= (1e-6 if dtype == torch.float32 else 1e-2)
        seqlens += 1


def test_kvcache_errors_name_the_argument():
    q = torch.randn(2, 1, 4, 32)
    k_cache = torch.randn(2, 16, 2, 32)
    f = flashattn.flash_attn_with_kvcache
    bad = {"block_table": torch.zeros(2, dtype=torch.int32),      # a table is (batch, pages_per_seq)
           "cache_batch_idx": torch.tensor([0, 2], dtype=torch.int32),  # the cache has rows 0 and 1
           "cache_leftpad": torch.tensor([0, 4], dtype=torch.int32)}    # past cache_seqlens = 3
    for name, value in bad.items():
        with pytest.raises(ValueError, match=f"'{'page_table' if name == 'block_table' else name}'"):
            f(q, k_cache, k_cache, cache_seqlens=3, **{name: value})
    with pytest.raises(ValueError, match="'rotary_sin'"):
        f(q, k_cache, k_cache, cache_seqlens=3, rotary_cos=torch.zeros(16, 8))
    new = torch.randn(2, 2, 2, 32)
    with pytest.raises(ValueError, match="'cache_seqlens'"):
        f(q, k_cache, k_cache, new, new)  # appending needs cache_seqlens
    with pytest.raises(ValueError, match="'v'"):
        f(q, k_cache, k_cache, new, None, cache_seqlens=3)
    with pytest.raises(ValueError, match="'cache_seqlens'"):
        f(q, k_cache, k_cache.clone(), new, new, cache_seqlens=15)  # 15 + 2 > 16
    with pytest.raises(ValueError, match="'cache_seqlens'"):
        f(q, k_cache, k_cache, cache_seqlens=torch.tensor([3, 17], dtype=torch.int32))
    with pytest.raises(ValueError, match="'cache_seqlens'"):
        f(q, k_cache, k_cache, cache_seqlens=torch.tensor([3, 4, 5], dtype=torch.int32))
    with pytest.raises(ValueError, match="'cache_seqlens'"):
        f(q, k_cache, k_cache, cache_seqlens=17)
    with pytest.raises(ValueError, match="'k_cache'"):
        f(q, k_cache[0], k_cache, cache_seqlens=3)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("num_splits", [0, 1, 3])
def test_kvcache_lengths_and_splits(device, num_splits):
    """Per-sequence lengths (Options::seqused_k: the decode kernel over the cache as it is) with the key
    splits forced or not; empty and full caches; the LSE is the same whether asked for or not."""
    dtype = dtype_for(device)
    torch.manual_seed(6)
    batch, seqlen_cache, heads, heads_k, d = 4, 300, 8, 2, 64
    k_cache = torch.randn(batch, seqlen_cache, heads_k, d, device=device, dtype=dtype)
    v_cache = torch.randn(batch, seqlen_cache, heads_k, d, device=device, dtype=dtype)
    q = torch.randn(batch, 1, heads, d, device=device, dtype=dtype)
    lengths = [300, 137, 0, 1]
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=device)
    out, lse = flashattn.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens, num_splits=num_splits,
                                                 return_softmax_lse=True)
    ref, base = reference_per_sequence(q, k_cache, v_cache, lengths)
    assert_rule(out, ref, base, atol_for(dtype), "out")
    assert torch.all(out[2] == 0) and torch.all(lse[2] == float("-inf"))  # no key: 0 and -inf, as flash_attn
    alone = flashattn.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens, num_splits=num_splits)
    assert torch.equal(alone, out)  # no LSE asked for: the kernels skip it, the output is the same


@pytest.mark.parametrize("device", devices())
def test_outputs_without_lse_are_the_same(device):
    """Without return_attn_probs no LSE is allocated or written: the output bits are those of the call with it."""
    dtype = dtype_for(device)
    torch.manual_seed(7)
    q, k, v = (torch.randn(2, s, h, 64, device=device, dtype=dtype) for s, h in ((37, 4), (70, 2), (70, 2)))
    out, lse, _ = flashattn.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    assert lse.shape == (2, 4, 37) and torch.equal(flashattn.flash_attn_func(q, k, v, causal=True), out)
    cu = torch.tensor([0, 30, 66], dtype=torch.int32, device=device)
    packed = [x.flatten(0, 1)[:66] for x in (q, k, v)]
    out, lse, _ = flashattn.flash_attn_varlen_func(*packed, cu, cu, 36, 36, causal=True, return_attn_probs=True)
    assert lse.shape == (4, 66)
    assert torch.equal(flashattn.flash_attn_varlen_func(*packed, cu, cu, 36, 36, causal=True), out)


def test_kvcache_length_errors_name_cache_seqlens():
    """The C++ library validates the lengths (as seqused_k); the errors name this function's argument."""
    q = torch.randn(2, 1, 4, 32)
    k_cache = torch.randn(2, 16, 2, 32)
    f = flashattn.flash_attn_with_kvcache
    for bad in (torch.tensor([3, 17], dtype=torch.int32), torch.tensor([-1, 2], dtype=torch.int32),
                torch.tensor([3], dtype=torch.int32), torch.tensor([[3, 4]], dtype=torch.int32),
                torch.tensor([3.0, 4.0]), torch.tensor([3, 4], dtype=torch.int32)[:, None].expand(2, 2)[:, 0].float()):
        with pytest.raises(ValueError, match="'cache_seqlens'"):
            f(q, k_cache, k_cache, cache_seqlens=bad)
    with pytest.raises(ValueError, match="'k_cache'"):  # the head dims differ: named as the cache
        f(q, k_cache[..., :16], k_cache, cache_seqlens=torch.tensor([3, 4], dtype=torch.int32))
    strided = torch.tensor([3, 9, 4, 9], dtype=torch.int64)[::2]  # int64, strided: converted, as flash_attn's
    out = f(q, k_cache, k_cache, cache_seqlens=strided)
    expect = f(q, k_cache, k_cache, cache_seqlens=torch.tensor([3, 4], dtype=torch.int32))
    assert torch.equal(out, expect)
