"""flashattn's flash_attn interface on numpy arrays (forward) against the fp64 oracle."""

import numpy as np
import pytest

import flashattn
from reference import attention

rng = np.random.default_rng(1234)


def randn(*shape, dtype=np.float32):
    return rng.standard_normal(shape).astype(dtype)


# fp32 on the CPU: relative error <= 1e-5 (docs/DESIGN.md §5); fp16 outputs carry their own rounding.
TOL = {np.float32: 2e-5, np.float16: 4e-3}


def check(out, ref, dtype):
    assert out.dtype == dtype
    assert np.isfinite(out).all()
    if out.size == 0:
        return
    err = np.abs(out.astype(np.float64) - ref).max()
    assert err <= TOL[dtype] * max(1.0, np.abs(ref).max()), err


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize(
    "b,sq,sk,h,hk,d",
    [(1, 1, 1, 1, 1, 32), (2, 7, 65, 4, 4, 64), (1, 129, 63, 2, 2, 40), (2, 64, 64, 8, 2, 128), (1, 33, 17, 8, 1, 80)],
)
@pytest.mark.parametrize("causal", [False, True])
def test_forward(dtype, b, sq, sk, h, hk, d, causal):
    q, k, v = randn(b, sq, h, d, dtype=dtype), randn(b, sk, hk, d, dtype=dtype), randn(b, sk, hk, d, dtype=dtype)
    out, lse, probs = flashattn.flash_attn_func(q, k, v, causal=causal, return_attn_probs=True)
    ref, ref_lse = attention(q, k, v, causal=causal)
    assert probs is None
    check(out, ref, dtype)
    assert lse.shape == (b, h, sq) and lse.dtype == np.float32
    finite = np.isfinite(ref_lse)
    assert (np.isneginf(lse) == ~finite).all()  # rows with no visible key: LSE = -inf, output 0
    np.testing.assert_allclose(lse[finite], ref_lse[finite], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("window", [(3, 0), (8, 2), (-1, 5), (0, 0)])
@pytest.mark.parametrize("sq,sk", [(40, 40), (17, 50), (50, 17)])
def test_window(window, sq, sk):
    q, k, v = randn(2, sq, 4, 64), randn(2, sk, 2, 64), randn(2, sk, 2, 64)
    out = flashattn.flash_attn_func(q, k, v, window_size=window)
    check(out, attention(q, k, v, window=window)[0], np.float32)


def test_softcap_scale_alibi():
    q, k, v = randn(2, 31, 4, 64) * 3, randn(2, 45, 4, 64) * 3, randn(2, 45, 4, 64)
    out = flashattn.flash_attn_func(q, k, v, softmax_scale=0.3, softcap=5.0, causal=True)
    check(out, attention(q, k, v, softmax_scale=0.3, softcap=5.0, causal=True)[0], np.float32)
    slopes = rng.uniform(0.01, 0.5, size=(2, 4)).astype(np.float32)
    out = flashattn.flash_attn_func(q, k, v, alibi_slopes=slopes)
    check(out, attention(q, k, v, alibi_slopes=slopes)[0], np.float32)


def test_head_dim_v_and_strided_inputs():
    base = randn(2, 20, 6, 64)
    q, k = base[:, :, :4], base[:, :, 2:]  # strided views, last dim contiguous
    v = randn(2, 20, 4, 32)
    out = flashattn.flash_attn_func(q, k, v)
    assert out.shape == (2, 20, 4, 32)
    check(out, attention(q, k, v)[0], np.float32)


def test_packed():
    qkv = randn(2, 33, 3, 4, 64)
    out = flashattn.flash_attn_qkvpacked_func(qkv, causal=True)
    check(out, attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], causal=True)[0], np.float32)
    q, kv = randn(2, 9, 8, 64), randn(2, 40, 2, 2, 64)
    out = flashattn.flash_attn_kvpacked_func(q, kv, causal=True)
    check(out, attention(q, kv[:, :, 0], kv[:, :, 1], causal=True)[0], np.float32)


def varlen_case(lens_q, lens_k, h=4, hk=2, d=64):
    cu_q = np.concatenate([[0], np.cumsum(lens_q)]).astype(np.int32)
    cu_k = np.concatenate([[0], np.cumsum(lens_k)]).astype(np.int32)
    q, k, v = randn(cu_q[-1], h, d), randn(cu_k[-1], hk, d), randn(cu_k[-1], hk, d)
    return q, k, v, cu_q, cu_k


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_matches_per_sequence(causal):
    lens_q, lens_k = [5, 0, 64, 1, 33], [5, 7, 70, 0, 20]
    q, k, v, cu_q, cu_k = varlen_case(lens_q, lens_k)
    out, lse, _ = flashattn.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal,
                                                   return_attn_probs=True)
    assert out.shape == q.shape and lse.shape == (4, q.shape[0])
    for i in range(len(lens_q)):
        qs, ks = slice(cu_q[i], cu_q[i + 1]), slice(cu_k[i], cu_k[i + 1])
        ref, ref_lse = attention(q[None, qs], k[None, ks], v[None, ks], causal=causal)
        check(out[qs], ref[0], np.float32)
        finite = np.isfinite(ref_lse[0])
        assert (np.isneginf(lse[:, qs]) == ~finite).all()
        # and the same sequence through the batched entry point
        if lens_q[i] > 0:
            single = flashattn.flash_attn_func(q[None, qs], k[None, ks], v[None, ks], causal=causal)
            np.testing.assert_allclose(out[qs], single[0], rtol=1e-5, atol=1e-6)


def test_varlen_packed():
    lens = [3, 17, 8]
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    qkv = randn(cu[-1], 3, 4, 32)
    out = flashattn.flash_attn_varlen_qkvpacked_func(qkv, cu, max(lens), causal=True)
    q, kv = randn(cu[-1], 4, 32), randn(cu[-1], 2, 2, 32)
    out2 = flashattn.flash_attn_varlen_kvpacked_func(q, kv, cu, cu, max(lens), max(lens))
    for i in range(len(lens)):
        s = slice(cu[i], cu[i + 1])
        check(out[s], attention(qkv[None, s, 0], qkv[None, s, 1], qkv[None, s, 2], causal=True)[0][0], np.float32)
        check(out2[s], attention(q[None, s], kv[None, s, 0], kv[None, s, 1])[0][0], np.float32)


# ---- errors name the argument -------------------------------------------------------------------

def expect_error(argument, fn, *args, exc=ValueError, **kwargs):
    with pytest.raises(exc) as info:
        fn(*args, **kwargs)
    assert f"'{argument}'" in str(info.value), str(info.value)
    return str(info.value)


def test_errors_name_the_argument():
    q, k, v = randn(1, 8, 4, 32), randn(1, 8, 2, 32), randn(1, 8, 2, 32)
    f = flashattn.flash_attn_func
    expect_error("q", f, q[0], k, v)                                    # wrong rank
    expect_error("k", f, q, k.astype(np.float16), v)                   # mismatched dtype
    expect_error("v", f, q, k, v.astype(np.float16))
    msg = expect_error("dropout_p", f, q, k, v, dropout_p=0.1, exc=NotImplementedError)
    assert "not supported yet" in msg
    expect_error("k", f, q, randn(1, 8, 3, 32), randn(1, 8, 3, 32))     # heads_k must divide heads
    expect_error("k", f, q, randn(1, 8, 2, 16), v)                      # head_dim mismatch
    expect_error("q", f, q.astype(np.float64), k, v)                    # unsupported dtype
    expect_error("softcap", f, q, k, v, softcap=-1.0)
    expect_error("window_size", f, q, k, v, window_size=3)
    expect_error("alibi_slopes", f, q, k, v, alibi_slopes=np.ones(3, np.float32))
    expect_error("qkv", flashattn.flash_attn_qkvpacked_func, randn(1, 8, 2, 4, 32))


def test_varlen_errors():
    q, k, v, cu_q, cu_k = varlen_case([4, 6], [4, 6])
    f = flashattn.flash_attn_varlen_func
    expect_error("cu_seqlens_q", f, q, k, v, cu_q.astype(np.float32), cu_k, 6, 6)
    expect_error("cu_seqlens_k", f, q, k, v, cu_q, np.array([0, 6, 4], np.int32), 6, 6)
    expect_error("max_seqlen_q", f, q, k, v, cu_q, cu_k, 2, 6)
    # a block table makes k/v paged caches (num_pages, page_size, heads_k, d): packed rank-3 k is refused
    expect_error("k", f, q, k, v, cu_q, cu_k, 6, 6, block_table=np.zeros((2, 1), np.int32))


def test_module():
    assert isinstance(flashattn.cuda_available(), bool)
    assert flashattn.__version__


# ---- flash_attn_with_kvcache and the SDPA-shaped entry on numpy arrays --------------------------

@pytest.mark.parametrize("causal", [False, True])
def test_kvcache_appends_and_matches_per_sequence(causal):
    batch, seqlen_cache, h, hk, d = 3, 40, 4, 2, 32
    k_cache, v_cache = randn(batch, seqlen_cache, hk, d), randn(batch, seqlen_cache, hk, d)
    q, k_new, v_new = randn(batch, 2, h, d), randn(batch, 2, hk, d), randn(batch, 2, hk, d)
    before = np.array([0, 17, 38], dtype=np.int32)
    k_old = k_cache.copy()
    out, lse = flashattn.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=before,
                                                 causal=causal, return_softmax_lse=True)
    assert out.shape == q.shape and lse.shape == (batch, h, 2)
    for b, n in enumerate(before):
        np.testing.assert_array_equal(k_cache[b, n:n + 2], k_new[b])
        np.testing.assert_array_equal(k_cache[b, :n], k_old[b, :n])
        np.testing.assert_array_equal(k_cache[b, n + 2:], k_old[b, n + 2:])
        ref, ref_lse = attention(q[b:b + 1], k_cache[b:b + 1, :n + 2], v_cache[b:b + 1, :n + 2], causal=causal)
        check(out[b:b + 1], ref, np.float32)
        np.testing.assert_allclose(lse[b], ref_lse[0], rtol=1e-4, atol=1e-4)
    # an int length: every sequence sees the same prefix of its cache
    out = flashattn.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=9, causal=causal)
    check(out, attention(q, k_cache[:, :9], v_cache[:, :9], causal=causal)[0], np.float32)
    out = flashattn.flash_attn_with_kvcache(q, k_cache, v_cache)  # None: the whole cache
    check(out, attention(q, k_cache, v_cache)[0], np.float32)


def test_kvcache_errors():
    q, cache = randn(2, 1, 4, 32), randn(2, 8, 2, 32)
    f = flashattn.flash_attn_with_kvcache
    expect_error("page_table", f, q, cache, cache, block_table=np.zeros((2, 1), np.float32))
    expect_error("page_table", f, q, cache, cache, block_table=np.full((2, 1), 2, np.int32))  # 2 pages: ids 0, 1
    rot = np.zeros((8, 8), np.float32)
    expect_error("rotary_cos", f, q, cache, cache, rotary_cos=rot, rotary_sin=rot)  # rotary needs an append
    expect_error("cache_seqlens", f, q, cache, cache, cache_seqlens=[3, 9])
    expect_error("cache_seqlens", f, q, cache, cache.copy(), randn(2, 3, 2, 32), randn(2, 3, 2, 32), cache_seqlens=6)


def sdpa_reference(q, k, v, is_causal, scale=None):
    """SDPA semantics in (batch, heads, seqlen, d) with its top-left causal mask, fp64."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    k = np.repeat(k, q.shape[1] // k.shape[1], axis=1)
    v = np.repeat(v, q.shape[1] // v.shape[1], axis=1)
    s = q @ k.swapaxes(-1, -2) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if is_causal:
        s = np.where(np.tril(np.ones(s.shape[-2:], dtype=bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


@pytest.mark.parametrize("sq,sk", [(16, 16), (9, 30), (30, 9)])
@pytest.mark.parametrize("is_causal", [False, True])
def test_sdpa_top_left_causal(sq, sk, is_causal):
    q, k, v = randn(2, 4, sq, 32), randn(2, 2, sk, 32), randn(2, 2, sk, 32)
    out = flashattn.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=0.2, enable_gqa=True)
    assert out.shape == (2, 4, sq, 32)
    check(np.ascontiguousarray(out), sdpa_reference(q, k, v, is_causal, 0.2), np.float32)
    expect_error("attn_mask", flashattn.scaled_dot_product_attention, q, k, v, attn_mask=np.ones((sq, sk)),
                 exc=NotImplementedError)
    expect_error("key", flashattn.scaled_dot_product_attention, q, k, v)  # GQA needs enable_gqa=True
