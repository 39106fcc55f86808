// forward_kvcache (flash_attn_with_kvcache): the append of new tokens (rotary on the keys) into a
// dense or paged cache, then attention of the (rotated) q over the cache, against the fp64 oracle
// (ref::forward_kvcache): outputs, LSE and every element of both caches after the call. Page
// sizes 1, 3, 16, 256; left padding; permuted and partial cache_batch_idx; rotary in both layouts
// and partial rotary dims; sinks; causal / window / softcap / ALiBi; every split count.
// Then each bad argument: the call throws flashattn::Error naming it and leaves q, the caches,
// the new tokens, out and lse bitwise unchanged.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>

#include "common/testing.h"

namespace fa_test {
namespace {

using flashattn::KVCache;

struct KVCase {
  std::string name;
  DType dtype = DType::f32;
  int batch = 3, sq = 1, new_tokens = 2, heads = 4, heads_k = 2, d = 64, dv = 64;
  int capacity = 40;   // slots per sequence (paged: rounded up to whole pages)
  int page_size = 0;   // 0: a dense cache
  bool leftpad = false;
  bool batch_idx = false;  // a permuted subset of more cache rows than sequences
  int rotary_dim = 0;
  bool interleaved = true;
  bool causal = false;
  int wl = -1;
  bool sinks = false;
  float softcap = 0;
  bool alibi = false;
  int num_splits = 0;
  bool no_seqlens = false;  // cache_seqlens unset: the whole cache (no append)
};

// One kvcache problem: the caches, index tensors and tables, all seeded random.
struct KVProblem {
  KVCase c;
  int cache_rows = 0, pages_per_seq = 0, num_pages = 0, capacity = 0;
  Buffer bq, bkn, bvn, bkc, bvc, bseq, bidx, blp, bpt, bcos, bsin, bsink, balibi, bout, blse;
  Tensor q, k_new, v_new, out, lse;
  KVCache cache;
  Options opt;
  std::vector<int32_t> seqlens, leftpad, idx, table;

  KVProblem(const KVCase& kc, uint64_t seed) : c(kc) {
    Rng rng(seed);
    const bool paged = c.page_size > 0;
    cache_rows = c.batch_idx ? c.batch + 2 : c.batch;
    if (paged) {
      pages_per_seq = (c.capacity + c.page_size - 1) / c.page_size;
      capacity = pages_per_seq * c.page_size;
      num_pages = cache_rows * pages_per_seq + 3;
    } else {
      capacity = c.capacity;
    }
    auto make = [&](Buffer& b, DType t, std::vector<int64_t> shape, bool fill) {
      int64_t n = 1;
      for (int64_t s : shape) n *= s;
      b = Buffer(t, n);
      Tensor v = view(b, shape);
      if (fill) fill_normal(v, rng);
      return v;
    };
    q = make(bq, c.dtype, {c.batch, c.sq, c.heads, c.d}, true);
    if (c.new_tokens > 0) {
      k_new = make(bkn, c.dtype, {c.batch, c.new_tokens, c.heads_k, c.d}, true);
      v_new = make(bvn, c.dtype, {c.batch, c.new_tokens, c.heads_k, c.dv}, true);
    }
    const int64_t rows0 = paged ? num_pages : cache_rows, rows1 = paged ? c.page_size : capacity;
    cache.k_cache = make(bkc, c.dtype, {rows0, rows1, c.heads_k, c.d}, true);
    cache.v_cache = make(bvc, c.dtype, {rows0, rows1, c.heads_k, c.dv}, true);
    out = make(bout, c.dtype, {c.batch, c.sq, c.heads, c.dv}, false);
    lse = make(blse, DType::f32, {c.batch, c.heads, c.sq}, false);

    // Lengths before the append: varied, one empty sequence, one nearly full.
    leftpad.assign(c.batch, 0);
    seqlens.resize(c.batch);
    for (int b = 0; b < c.batch; ++b) {
      const int room = capacity - c.new_tokens;
      seqlens[b] = b == 0 ? room : b == 1 ? 0 : int(rng.next() % uint64_t(room + 1));
      if (c.leftpad) leftpad[b] = int(rng.next() % uint64_t(seqlens[b] + 1));
    }
    if (!c.no_seqlens) {
      cache.cache_seqlens = make(bseq, DType::i32, {c.batch}, false);
      std::copy(seqlens.begin(), seqlens.end(), static_cast<int32_t*>(bseq.data()));
    }
    if (c.leftpad) {
      cache.cache_leftpad = make(blp, DType::i32, {c.batch}, false);
      std::copy(leftpad.begin(), leftpad.end(), static_cast<int32_t*>(blp.data()));
    }
    idx.resize(c.batch);
    std::iota(idx.begin(), idx.end(), 0);
    if (c.batch_idx) {
      std::vector<int32_t> rows(cache_rows);
      std::iota(rows.begin(), rows.end(), 0);
      for (int i = cache_rows - 1; i > 0; --i) std::swap(rows[i], rows[rng.next() % uint64_t(i + 1)]);
      std::copy(rows.begin(), rows.begin() + c.batch, idx.begin());
      cache.cache_batch_idx = make(bidx, DType::i32, {c.batch}, false);
      std::copy(idx.begin(), idx.end(), static_cast<int32_t*>(bidx.data()));
    }
    if (paged) {
      // Pages in a random order; entries past a sequence's last slot hold ids out of range, which
      // a kernel must never read.
      std::vector<int32_t> pages(num_pages);
      std::iota(pages.begin(), pages.end(), 0);
      for (int i = num_pages - 1; i > 0; --i) std::swap(pages[i], pages[rng.next() % uint64_t(i + 1)]);
      table.assign(size_t(cache_rows) * pages_per_seq, -1000);
      for (int r = 0; r < cache_rows; ++r)
        for (int i = 0; i < pages_per_seq; ++i) table[r * pages_per_seq + i] = pages[r * pages_per_seq + i];
      for (int b = 0; b < c.batch; ++b) {
        const int used = c.no_seqlens ? capacity : seqlens[b] + c.new_tokens;
        for (int i = (used + c.page_size - 1) / c.page_size; i < pages_per_seq; ++i)
          table[idx[b] * pages_per_seq + i] = 1 << 30;
      }
      cache.page_table = make(bpt, DType::i32, {cache_rows, pages_per_seq}, false);
      std::copy(table.begin(), table.end(), static_cast<int32_t*>(bpt.data()));
    }
    if (c.rotary_dim > 0) {
      cache.rotary_cos = make(bcos, c.dtype, {capacity, c.rotary_dim / 2}, false);
      cache.rotary_sin = make(bsin, c.dtype, {capacity, c.rotary_dim / 2}, false);
      for (int pos = 0; pos < capacity; ++pos)
        for (int i = 0; i < c.rotary_dim / 2; ++i) {
          const double theta = pos * std::pow(10000.0, -2.0 * i / c.rotary_dim);
          store(*cache.rotary_cos, pos * (c.rotary_dim / 2) + i, std::cos(theta));
          store(*cache.rotary_sin, pos * (c.rotary_dim / 2) + i, std::sin(theta));
        }
      cache.rotary_interleaved = c.interleaved;
    }
    opt.causal = c.causal;
    opt.window_left = c.wl;
    opt.softcap = c.softcap;
    opt.num_splits = c.num_splits;
    if (c.sinks) {
      opt.sinks = make(bsink, DType::f32, {c.heads}, false);
      fill_normal(*opt.sinks, rng, 2.0);
    }
    if (c.alibi) {
      opt.alibi_slopes = make(balibi, DType::f32, {c.heads}, false);
      fill_uniform(*opt.alibi_slopes, rng, 0.05, 0.5);
    }
  }

  std::vector<Buffer*> buffers() {
    return {&bq, &bkn, &bvn, &bkc, &bvc, &bseq, &bidx, &blp, &bpt, &bcos, &bsin, &bsink, &balibi, &bout, &blse};
  }
};

std::vector<KVCase> cases() {
  std::vector<KVCase> v;
  auto add = [&](std::string name, auto&& tweak) {
    KVCase c;
    c.name = name;
    tweak(c);
    v.push_back(c);
  };
  add("dense_append", [](KVCase&) {});
  add("dense_no_append", [](KVCase& c) { c.new_tokens = 0; });
  add("dense_full_cache", [](KVCase& c) { c.new_tokens = 0, c.no_seqlens = true; });
  add("dense_causal_chunk", [](KVCase& c) { c.sq = 3, c.new_tokens = 3, c.causal = true; });
  add("dense_leftpad", [](KVCase& c) { c.leftpad = true, c.causal = true; });
  add("dense_batch_idx", [](KVCase& c) { c.batch_idx = true; });
  add("dense_batch_idx_leftpad_rotary", [](KVCase& c) { c.batch_idx = true, c.leftpad = true, c.rotary_dim = 64; });
  add("rotary_interleaved", [](KVCase& c) { c.rotary_dim = 64; });
  add("rotary_neox", [](KVCase& c) { c.rotary_dim = 64, c.interleaved = false; });
  add("rotary_partial_neox_causal", [](KVCase& c) { c.rotary_dim = 32, c.interleaved = false, c.sq = 2, c.causal = true; });
  add("rotary_partial_window", [](KVCase& c) { c.rotary_dim = 16, c.sq = 2, c.wl = 5; });
  add("rotary_odd_dims", [](KVCase& c) { c.d = 40, c.dv = 24, c.rotary_dim = 20, c.interleaved = false; });
  add("paged1", [](KVCase& c) { c.page_size = 1; });
  add("paged3_leftpad_rotary", [](KVCase& c) { c.page_size = 3, c.leftpad = true, c.rotary_dim = 64; });
  add("paged16_batch_idx", [](KVCase& c) { c.page_size = 16, c.batch_idx = true, c.capacity = 70; });
  add("paged16_batch_idx_leftpad_causal", [](KVCase& c) {
    c.page_size = 16, c.batch_idx = true, c.leftpad = true, c.sq = 2, c.causal = true, c.capacity = 70;
  });
  add("paged256_long", [](KVCase& c) { c.page_size = 256, c.capacity = 600, c.num_splits = 3; });
  add("paged256_tiled_path", [](KVCase& c) { c.page_size = 256, c.capacity = 300, c.sq = 20, c.new_tokens = 20, c.causal = true, c.heads = 8, c.heads_k = 1; });
  add("paged16_full_cache", [](KVCase& c) { c.page_size = 16, c.new_tokens = 0, c.no_seqlens = true; });
  add("sinks", [](KVCase& c) { c.sinks = true; });
  add("sinks_split", [](KVCase& c) { c.sinks = true, c.capacity = 700, c.num_splits = 4; });
  add("sinks_paged_causal_softcap_alibi", [](KVCase& c) {
    c.sinks = true, c.page_size = 16, c.sq = 3, c.new_tokens = 3, c.causal = true, c.softcap = 5, c.alibi = true;
  });
  add("window_softcap_alibi_split", [](KVCase& c) { c.wl = 7, c.softcap = 3, c.alibi = true, c.num_splits = 2; });
  add("bf16_paged_rotary_sinks", [](KVCase& c) {
    c.dtype = DType::bf16, c.page_size = 16, c.rotary_dim = 64, c.interleaved = false, c.sinks = true, c.leftpad = true;
  });
  add("f16_dense_batch_idx", [](KVCase& c) { c.dtype = DType::f16, c.batch_idx = true, c.rotary_dim = 32; });
  return v;
}

class KVCacheOracle : public ::testing::TestWithParam<KVCase> {};

TEST_P(KVCacheOracle, MatchesOracle) {
  KVProblem p(GetParam(), test_seed());
  const KVCase& c = p.c;
  const auto ref = ref::forward_kvcache(p.q, p.k_new, p.v_new, p.cache, p.opt);
  const auto q_before = p.bq.snapshot();
  p.bout.poison();
  p.blse.poison();
  ASSERT_TRUE(runs("forward_kvcache", [&] { flashattn::forward_kvcache(p.q, p.k_new, p.v_new, p.cache, p.out, p.lse, p.opt); }));
  for (Buffer* b : p.buffers()) ASSERT_TRUE(b->guards_intact());
  EXPECT_TRUE(p.bq.snapshot() == q_before) << "q was modified (rotary must rotate a copy)";

  const auto out = to_dense(p.out), lse = to_dense(p.lse);
  const auto k_after = to_dense(p.cache.k_cache), v_after = to_dense(p.cache.v_cache);
  if (c.dtype == DType::f32) {
    EXPECT_TRUE(close_rel("O", out, ref.out));
    EXPECT_TRUE(close_rel("LSE", lse, ref.lse));
    EXPECT_TRUE(close_rel("k_cache", k_after, ref.k_cache));
  } else {
    // The oracle stores the rotated keys and q in the dtype as a kernel must; ours rotates in fp32,
    // the oracle in fp64: a stored element may differ by one rounding (2^-8 relative in bf16).
    const double tol = c.dtype == DType::bf16 ? 1.0 / 128 : 1.0 / 1024;
    EXPECT_TRUE(close_rel("k_cache", k_after, ref.k_cache, tol));
    EXPECT_TRUE(close_rel("O", out, ref.out, 4 * tol));
    EXPECT_TRUE(close_rel("LSE", lse, ref.lse, tol));
  }
  // Values are copied, never converted: exactly the new tokens (or the old cache).
  EXPECT_TRUE(v_after == ref.v_cache) << "v_cache differs from the oracle's append";
  if (!c.sinks) {
    EXPECT_TRUE(masked_rows_exact(out, lse, ref.lse, int64_t(c.batch) * c.sq, c.heads, c.dv,
                                  [&](int64_t r, int h) { return (r / c.sq * c.heads + h) * c.sq + r % c.sq; }));
  }
}

INSTANTIATE_TEST_SUITE_P(Cases, KVCacheOracle, ::testing::ValuesIn(cases()),
                         [](const auto& info) { return info.param.name; });

// The oracle's page lookup is the shared one (AttnParams::kv_row_offset); this checks it against
// the plain definition: a paged cache attends exactly like the dense cache its pages spell.
TEST(KVCachePaged, EqualsTheDenseCacheItsPagesSpell) {
  for (int page : {1, 5, 16}) {
    SCOPED_TRACE("page size " + std::to_string(page));
    KVCase c;
    c.page_size = page;
    c.new_tokens = 0;
    c.causal = true;
    KVProblem paged(c, test_seed(std::to_string(page)));
    // The dense cache: row b, slot s = the paged cache's page table[b][s / page], row s % page.
    KVCase dc = c;
    dc.page_size = 0;
    dc.capacity = paged.capacity;
    KVProblem dense(dc, test_seed("dense"));
    for (int b = 0; b < c.batch; ++b) {
      static_cast<int32_t*>(dense.bseq.data())[b] = paged.seqlens[b];
      for (int s = 0; s < paged.seqlens[b]; ++s)
        for (int h = 0; h < c.heads_k; ++h)
          for (int d = 0; d < c.d; ++d) {
            const int64_t src = ((int64_t(paged.table[b * paged.pages_per_seq + s / page]) * page + s % page) * c.heads_k + h) * c.d + d;
            const int64_t dst = ((int64_t(b) * dense.capacity + s) * c.heads_k + h) * c.d + d;
            store(dense.cache.k_cache, dst, load(paged.cache.k_cache, src));
            store(dense.cache.v_cache, dst, load(paged.cache.v_cache, src));
          }
    }
    std::memcpy(dense.bq.data(), paged.bq.data(), paged.bq.bytes());
    ASSERT_TRUE(runs("paged", [&] { flashattn::forward_kvcache(paged.q, Tensor{}, Tensor{}, paged.cache, paged.out, paged.lse, paged.opt); }));
    const auto ref = ref::forward_kvcache(dense.q, Tensor{}, Tensor{}, dense.cache, dense.opt);
    EXPECT_TRUE(close_rel("O", to_dense(paged.out), ref.out));
    EXPECT_TRUE(close_rel("LSE", to_dense(paged.lse), ref.lse));
  }
}

// flash_attn_varlen_func with a block table: packed queries over a paged cache, lengths from
// cu_seqlens_k (or seqused_k), against the oracle on the packed keys the pages spell.
TEST(VarlenPaged, EqualsThePackedKeysItsPagesSpell) {
  for (int page : {1, 16, 256}) {
    SCOPED_TRACE("page size " + std::to_string(page));
    Rng rng(test_seed(std::to_string(page)));
    const int heads = 4, heads_k = 2, d = 32;
    const std::vector<int> lens_q = {2, 1, 0, 5}, lens_k = {40, 300, 3, 5};
    const int batch = 4, pages_per_seq = (300 + page - 1) / page, num_pages = batch * pages_per_seq + 1;
    std::vector<int32_t> cu_q = {0}, cu_k = {0};
    for (int b = 0; b < batch; ++b) cu_q.push_back(cu_q.back() + lens_q[b]), cu_k.push_back(cu_k.back() + lens_k[b]);
    Buffer bq(DType::f32, int64_t(cu_q.back()) * heads * d), bk(DType::f32, int64_t(num_pages) * page * heads_k * d),
        bv(DType::f32, int64_t(num_pages) * page * heads_k * d), bo(DType::f32, int64_t(cu_q.back()) * heads * d),
        bl(DType::f32, int64_t(heads) * cu_q.back()), bcq(DType::i32, batch + 1), bck(DType::i32, batch + 1),
        bpt(DType::i32, int64_t(batch) * pages_per_seq), pk(DType::f32, int64_t(cu_k.back()) * heads_k * d),
        pv(DType::f32, int64_t(cu_k.back()) * heads_k * d);
    const Tensor q = view(bq, {cu_q.back(), heads, d}), kc = view(bk, {num_pages, page, heads_k, d}),
                 vc = view(bv, {num_pages, page, heads_k, d}), out = view(bo, {cu_q.back(), heads, d}),
                 lse = view(bl, {heads, cu_q.back()});
    fill_normal(q, rng);
    fill_normal(kc, rng);
    fill_normal(vc, rng);
    std::copy(cu_q.begin(), cu_q.end(), static_cast<int32_t*>(bcq.data()));
    std::copy(cu_k.begin(), cu_k.end(), static_cast<int32_t*>(bck.data()));
    auto* table = static_cast<int32_t*>(bpt.data());
    for (int i = 0; i < batch * pages_per_seq; ++i) table[i] = (i * 7 + 3) % num_pages;  // scattered pages
    for (int b = 0; b < batch; ++b)
      for (int s = 0; s < lens_k[b]; ++s)
        for (int e = 0; e < heads_k * d; ++e) {
          const int64_t src = (int64_t(table[b * pages_per_seq + s / page]) * page + s % page) * heads_k * d + e;
          const int64_t dst = int64_t(cu_k[b] + s) * heads_k * d + e;
          static_cast<float*>(pk.data())[dst] = static_cast<const float*>(bk.data())[src];
          static_cast<float*>(pv.data())[dst] = static_cast<const float*>(bv.data())[src];
        }
    flashattn::VarlenLayout paged{view(bcq, {batch + 1}), view(bck, {batch + 1}), 5, 300, view(bpt, {batch, pages_per_seq})};
    flashattn::VarlenLayout packed{view(bcq, {batch + 1}), view(bck, {batch + 1}), 5, 300, std::nullopt};
    Options opt;
    opt.causal = true;
    ASSERT_TRUE(runs("forward_varlen paged", [&] { flashattn::forward_varlen(q, kc, vc, out, lse, paged, opt); }));
    const auto ref = ref::forward(q, view(pk, {cu_k.back(), heads_k, d}), view(pv, {cu_k.back(), heads_k, d}), opt, &packed);
    EXPECT_TRUE(close_rel("O", to_dense(out), ref.out));
    EXPECT_TRUE(close_rel("LSE", to_dense(lse), ref.lse));
    // A page id past the cache in use is refused before anything is written.
    table[1 * pages_per_seq + 2] = num_pages;
    const auto out_before = bo.snapshot();
    try {
      flashattn::forward_varlen(q, kc, vc, out, lse, paged, opt);
      ADD_FAILURE() << "no error";
    } catch (const flashattn::Error& e) {
      EXPECT_EQ(e.argument(), "page_table");
    }
    EXPECT_TRUE(bo.snapshot() == out_before);
  }
}

// rotary.h is shared by the oracle and the kernels, so the oracle is checked against the layouts
// written out by hand: interleaved rotates (2i, 2i + 1), NeoX rotates (i, i + rotary_dim / 2), by
// the angle of table row cache_seqlens + j; dims past rotary_dim are copied.
TEST(KVCacheRotary, OracleRotatesTheDocumentedPairs) {
  for (bool interleaved : {true, false}) {
    SCOPED_TRACE(interleaved ? "interleaved" : "neox");
    KVCase c;
    c.rotary_dim = 8;
    c.d = 12;
    c.dv = 12;
    c.interleaved = interleaved;
    KVProblem p(c, test_seed(interleaved ? "i" : "n"));
    const auto ref = ref::forward_kvcache(p.q, p.k_new, p.v_new, p.cache, p.opt);
    for (int b = 0; b < c.batch; ++b)
      for (int j = 0; j < c.new_tokens; ++j) {
        const int pos = p.seqlens[b] + j;
        for (int i = 0; i < 4; ++i) {
          const int a = interleaved ? 2 * i : i, z = interleaved ? 2 * i + 1 : i + 4;
          const double cs = load(*p.cache.rotary_cos, pos * 4 + i), sn = load(*p.cache.rotary_sin, pos * 4 + i);
          const int64_t src = ((int64_t(b) * c.new_tokens + j) * c.heads_k) * c.d;  // kv head 0
          const double x0 = load(p.k_new, src + a), x1 = load(p.k_new, src + z);
          const int64_t dst = ((int64_t(b) * p.capacity + pos) * c.heads_k) * c.d;
          EXPECT_NEAR(ref.k_cache[dst + a], x0 * cs - x1 * sn, 1e-6);
          EXPECT_NEAR(ref.k_cache[dst + z], x0 * sn + x1 * cs, 1e-6);
        }
        for (int d = 8; d < 12; ++d)
          EXPECT_EQ(ref.k_cache[((int64_t(b) * p.capacity + pos) * c.heads_k) * c.d + d],
                    load(p.k_new, ((int64_t(b) * c.new_tokens + j) * c.heads_k) * c.d + d));
      }
  }
}

// ---- a rejected call writes nothing ------------------------------------------------------------

struct BadArg {
  std::string name;      // the test's
  std::string argument;  // the one the error must name
  std::function<void(KVProblem&)> spoil;
};

// The page-table entry of sequence 0's last slot after the append (a page the call must use).
int64_t last_page(const KVProblem& p) {
  return int64_t(p.idx[0]) * p.pages_per_seq + (p.seqlens[0] + p.c.new_tokens - 1) / p.c.page_size;
}

std::vector<BadArg> bad_args() {
  auto i32 = [](Buffer& b) { return static_cast<int32_t*>(b.data()); };
  return {
      {"length_past_cache", "cache_seqlens", [=](KVProblem& p) { i32(p.bseq)[2] = p.capacity - 1; }},
      {"negative_length", "cache_seqlens", [=](KVProblem& p) { i32(p.bseq)[2] = -1; }},
      {"page_id_out_of_range", "page_table", [=](KVProblem& p) { i32(p.bpt)[last_page(p)] = p.num_pages; }},
      {"negative_page_id", "page_table", [=](KVProblem& p) { i32(p.bpt)[last_page(p)] = -2; }},
      {"leftpad_past_length", "cache_leftpad", [=](KVProblem& p) { i32(p.blp)[2] = i32(p.bseq)[2] + 1; }},
      {"batch_idx_out_of_range", "cache_batch_idx", [=](KVProblem& p) { i32(p.bidx)[1] = p.cache_rows; }},
      {"batch_idx_repeated", "cache_batch_idx", [=](KVProblem& p) { i32(p.bidx)[2] = i32(p.bidx)[0]; }},
      {"seqlens_dtype", "cache_seqlens", [](KVProblem& p) { p.cache.cache_seqlens->dtype = DType::f32; }},
      {"seqlens_shape", "cache_seqlens", [](KVProblem& p) { p.cache.cache_seqlens->shape[0] = 2; }},
      {"page_table_dtype", "page_table", [](KVProblem& p) { p.cache.page_table->dtype = DType::f32; }},
      {"k_new_dtype", "k", [](KVProblem& p) { p.k_new.dtype = DType::f16; }},
      {"v_new_shape", "v", [](KVProblem& p) { p.v_new.shape[2] = 1; }},
      {"v_new_missing", "v", [](KVProblem& p) { p.v_new = Tensor{}; }},
      {"k_cache_heads", "k_cache", [](KVProblem& p) { p.cache.k_cache.shape[2] = 3; p.cache.v_cache.shape[2] = 3; }},
      {"v_cache_pages", "v_cache", [](KVProblem& p) { p.cache.v_cache.shape[0] -= 1; }},
      {"rotary_table_short", "rotary_cos", [](KVProblem& p) { p.cache.rotary_cos->shape[0] -= 1; p.cache.rotary_sin->shape[0] -= 1; }},
      {"rotary_dim_too_wide", "rotary_cos", [](KVProblem& p) {
         p.cache.rotary_cos->shape[1] = 40, p.cache.rotary_sin->shape[1] = 40;
         p.cache.rotary_cos->stride[0] = 40, p.cache.rotary_sin->stride[0] = 40;
         p.cache.rotary_cos->shape[0] = 8, p.cache.rotary_sin->shape[0] = 8;
       }},
      {"rotary_sin_missing", "rotary_sin", [](KVProblem& p) { p.cache.rotary_sin.reset(); }},
      {"sinks_shape", "sinks", [](KVProblem& p) { p.opt.sinks->shape[0] = 3; }},
      {"sinks_dtype", "sinks", [](KVProblem& p) { p.opt.sinks->dtype = DType::bf16; }},
      {"out_aliases_cache", "out", [](KVProblem& p) { p.out.data = p.cache.k_cache.data; }},
      {"cache_aliases_new_tokens", "k_cache", [](KVProblem& p) { p.k_new.data = p.cache.k_cache.data; }},
      {"lse_shape", "lse", [](KVProblem& p) { p.lse.shape[2] = 7; }},
      {"q_dtype", "q", [](KVProblem& p) { p.q.dtype = DType::i32; }},
      {"window_with_causal", "window_right", [](KVProblem& p) { p.opt.causal = true, p.opt.window_right = 2; }},
      {"seqused_k_given", "seqused_k", [](KVProblem& p) { p.opt.seqused_k = *p.cache.cache_seqlens; }},
  };
}

class KVCacheRejects : public ::testing::TestWithParam<BadArg> {};

TEST_P(KVCacheRejects, NamesTheArgumentAndWritesNothing) {
  KVCase c;  // a call that uses every feature, valid until spoiled
  c.page_size = 4;
  c.batch = 4;
  c.leftpad = true;
  c.batch_idx = true;
  c.rotary_dim = 32;
  c.sinks = true;
  c.causal = true;
  KVProblem p(c, test_seed());
  {  // the unspoiled call runs (so the rejection below is the spoiled argument's)
    KVProblem ok(c, test_seed());
    ASSERT_TRUE(runs("valid call", [&] { flashattn::forward_kvcache(ok.q, ok.k_new, ok.v_new, ok.cache, ok.out, ok.lse, ok.opt); }));
  }
  GetParam().spoil(p);
  std::vector<std::vector<uint8_t>> before;
  for (Buffer* b : p.buffers()) before.push_back(b->snapshot());
  try {
    flashattn::forward_kvcache(p.q, p.k_new, p.v_new, p.cache, p.out, p.lse, p.opt);
    ADD_FAILURE() << "no error";
  } catch (const flashattn::Error& e) {
    EXPECT_EQ(e.argument(), GetParam().argument) << e.what();
    EXPECT_FALSE(e.expected().empty());
    EXPECT_FALSE(e.got().empty());
  }
  const auto bufs = p.buffers();
  for (size_t i = 0; i < bufs.size(); ++i) {
    EXPECT_TRUE(bufs[i]->snapshot() == before[i]) << "buffer " << i << " was modified by a rejected call";
    EXPECT_TRUE(bufs[i]->guards_intact());
  }
}

INSTANTIATE_TEST_SUITE_P(Args, KVCacheRejects, ::testing::ValuesIn(bad_args()),
                         [](const auto& info) { return info.param.name; });

// Appending needs cache_seqlens; rotary needs an append.
TEST(KVCacheRejects, AppendWithoutLengthsAndRotaryWithoutAppend) {
  KVCase c;
  c.rotary_dim = 16;
  KVProblem p(c, test_seed());
  KVCache no_lengths = p.cache;
  no_lengths.cache_seqlens.reset();
  no_lengths.rotary_cos.reset();
  no_lengths.rotary_sin.reset();
  try {
    flashattn::forward_kvcache(p.q, p.k_new, p.v_new, no_lengths, p.out, p.lse, p.opt);
    ADD_FAILURE() << "no error";
  } catch (const flashattn::Error& e) {
    EXPECT_EQ(e.argument(), "cache_seqlens");
  }
  try {
    flashattn::forward_kvcache(p.q, Tensor{}, Tensor{}, p.cache, p.out, p.lse, p.opt);
    ADD_FAILURE() << "no error";
  } catch (const flashattn::Error& e) {
    EXPECT_EQ(e.argument(), "rotary_cos");
  }
}

}  // namespace
}  // namespace fa_test
