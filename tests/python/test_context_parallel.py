"""flashattn.context_parallel: ring attention over torch.distributed (gloo, CPU).

- The step plans against the global causal mask, pair by pair (no processes).
- Sharding helpers: zig-zag shard/unshard roundtrips, positions, local cu_seqlens.
- A 1-rank group in this process: the ring is exactly flashattn's single-call result; argument errors.
- 2 and 4 spawned processes (gloo over 127.0.0.1, a FileStore): every case of context_parallel_cases.py
  (causal and not, zig-zag and contiguous, varlen, GQA/MQA, softcap, bf16, deterministic, host staging)
  against single-process flashattn on the unsharded sequence (fp32: relative error <= 1e-5) and against
  the fp64 oracle by DESIGN §5's rule (out, dq, dk, dv).
"""

import os
import tempfile

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

import json  # noqa: E402

import torch.multiprocessing as mp  # noqa: E402

import flashattn  # noqa: E402
from flashattn import context_parallel as cp  # noqa: E402
from flashattn.context_parallel._schedule import ALL, BACK, FRONT, step_calls  # noqa: E402

import context_parallel_cases as cases  # noqa: E402
from torch_reference import atol_for  # noqa: E402

# ---- the step plans (no processes) --------------------------------------------------------------


def _local_rows(n, part):
    if isinstance(part, slice):
        return range(n)[part]
    half = n // 2
    return {ALL: range(n), FRONT: range(half), BACK: range(half, n)}[part]


def _kernel_sees(i, j, sq, sk, causal, window):
    """flashattn's mask inside one call: bottom-right aligned causal/window (DESIGN §2)."""
    left, right = window
    if causal:
        right = 0
    diag = i + sk - sq
    return (right < 0 or j <= diag + right) and (left < 0 or j >= diag - left)


WINDOWS = [(-1, -1), (0, 0), (2, 0), (5, 3), (7, -1), (-1, 4), (20, 20)]


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("world", [1, 2, 3, 4, 5])
def test_plans_cover_exactly_the_visible_pairs(world, causal, layout, window):
    """Over the ring, each (query, key) pair of the global sequence is computed once iff it is visible
    (causal and window by global position, bottom-right = the diagonal: q and k are the same tokens)."""
    chunk = 3
    seqlen = chunk * (2 * world if layout == "zigzag" else world)
    local = seqlen // world
    positions = [cp.sequence_positions(seqlen, r, world, layout).tolist() for r in range(world)]
    computed = torch.zeros(seqlen, seqlen, dtype=torch.int32)
    for rank in range(world):
        work = []
        for step in range(world):
            source = (rank - step) % world
            done = 0
            for call in step_calls(rank, source, world, local, causal, layout, window):
                rows, cols = _local_rows(local, call.queries), _local_rows(local, call.keys)
                for a, i in enumerate(rows):
                    for b, j in enumerate(cols):
                        if _kernel_sees(a, b, len(rows), len(cols), call.causal, call.window):
                            computed[positions[rank][i], positions[source][j]] += 1
                done += len(rows) * len(cols)
            work.append(done)
        if causal and layout == "zigzag" and world > 1 and window == (-1, -1):  # load balance: every step the same
            assert work[1:] == [local * local // 2] * (world - 1)
    i = torch.arange(seqlen)[:, None]
    j = torch.arange(seqlen)[None, :]
    left, right = window
    if causal:
        right = 0
    visible = torch.ones(seqlen, seqlen, dtype=torch.bool)
    if right >= 0:
        visible &= j <= i + right
    if left >= 0:
        visible &= j >= i - left
    assert torch.equal(computed, visible.to(torch.int32))


# ---- the overlap: every transfer is issued before the step it overlaps (no processes) ----------


class _LoggingRing:
    """A ring of `world_size` ranks seen from `rank`, whose shifts hand back what they sent (every rank
    holding the same tensors) and log when they start and end."""

    def __init__(self, rank, world_size, log):
        self.rank, self.world_size, self.log = rank, world_size, log

    def source(self, step):
        return (self.rank - step) % self.world_size

    def shift(self, tensors):
        ring, index = self, sum(1 for e in self.log if e[0] == "start")
        self.log.append(("start", index))

        class _Shift:
            def wait(self):
                ring.log.append(("wait", index))
                return [t.clone() for t in tensors]

        return _Shift()


class _LoggingTokens:
    """DenseTokens that log each step's local call."""

    def __init__(self, log):
        from flashattn.context_parallel._tokens import DenseTokens

        self.dense, self.log = DenseTokens(), log

    def forward(self, *args):
        self.log.append(("compute",))
        return self.dense.forward(*args)

    def backward(self, *args):
        self.log.append(("compute",))
        return self.dense.backward(*args)

    def __getattr__(self, name):
        return getattr(self.dense, name)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_transfers_overlap_the_steps(world):
    """Forward: step s starts the shift of its block before its attention and waits after it. Backward:
    the same for K/V, and the dK/dV accumulator of step s is sent right after it is complete (waited for
    at step s + 1, after that step's attention): no transfer is waited for before the compute it hides
    behind has been issued."""
    from flashattn.context_parallel._algorithm import Options, ring_backward, ring_forward

    log = []
    ring, tokens = _LoggingRing(1, world, log), _LoggingTokens(log)
    options = Options(None, True, "zigzag", 0.0, False)
    q, k, v = (torch.randn(1, 8, 2, 16) for _ in range(3))
    out, lse = ring_forward(q, k, v, ring, tokens, options)
    kinds = [e[0] for e in log]
    assert kinds == ["start", "compute", "wait"] * (world - 1) + ["compute"], kinds
    log.clear()
    ring_backward(torch.randn_like(out), q, k, v, out, lse, ring, tokens, options)
    kinds = [e[0] for e in log]
    # step 0: start K/V, compute, start dK/dV, wait K/V; steps 1..W-2: start K/V, compute, wait the
    # previous dK/dV, start this step's, wait K/V; the last step has no K/V shift; then the final pass
    middle = ["start", "compute", "wait", "start", "wait"] * (world - 2)
    assert kinds == ["start", "compute", "start", "wait"] + middle + ["compute", "wait", "start", "wait"], kinds


# ---- partial results and their merge (no processes) ---------------------------------------------


@pytest.mark.parametrize("max_slots", [3, 4, 5])
@pytest.mark.parametrize("steps", [1, 2, 3, 4, 5, 6, 9])
@pytest.mark.parametrize("packed", [False, True])
def test_partial_results_merge_every_step(steps, max_slots, packed):
    """Slots, folds and the final merge give the fp64 LSE merge of all partials; rows a step did not
    write (LSE -inf, output left as it was: NaN here) contribute nothing."""
    from flashattn.context_parallel._merge import PartialResults

    out_shape, lse_shape = ((12, 3, 8), (3, 12)) if packed else ((2, 6, 3, 8), (2, 3, 6))
    token_dim = 0 if packed else 1
    partials = PartialResults(out_shape, lse_shape, torch.device("cpu"), steps, max_slots)
    outs, lses = [], []
    for step in range(steps):
        out, lse = torch.randn(out_shape), torch.randn(lse_shape) * 4
        if step % 2:  # odd steps compute half of the rows, like zig-zag steps
            n = out_shape[token_dim]
            rows = torch.arange(n // 2, n)
            lse.index_fill_(-1, torch.arange(n // 2), float("-inf"))
        else:
            rows = torch.arange(out_shape[token_dim])
        slot_out, slot_lse = partials.slot()
        slot_out.fill_(float("nan"))  # what a recycled slot may hold
        slot_out.index_copy_(token_dim, rows, out.index_select(token_dim, rows))
        slot_lse.index_copy_(-1, rows, lse.index_select(-1, rows))
        outs.append(out.double())
        lses.append(lse.double())
    merged, merged_lse = partials.result(torch.float32)
    lse_all = torch.stack(lses)
    ref_lse = torch.logsumexp(lse_all, 0)
    weights = torch.exp(lse_all - ref_lse).nan_to_num(0.0)
    weights = weights.transpose(-1, -2).unsqueeze(-1)  # (steps, ..., tokens, heads, 1) like the outputs
    ref = (weights * torch.stack([o.nan_to_num(0.0) for o in outs])).sum(0)
    assert torch.allclose(merged_lse.double(), ref_lse, rtol=1e-6, atol=1e-6)
    assert torch.allclose(merged.double(), ref, rtol=1e-5, atol=1e-6)


# ---- sharding helpers ---------------------------------------------------------------------------


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_zigzag_shard_roundtrip(world):
    x = torch.randn(2, 12 * world, 3, 5)
    shards = [cp.zigzag_shard(x, r, world) for r in range(world)]
    for r, shard in enumerate(shards):
        assert torch.equal(shard, x.index_select(1, cp.sequence_positions(x.shape[1], r, world)))
    assert torch.equal(cp.zigzag_unshard(shards), x)
    y = x.transpose(1, 2).contiguous()  # another sequence dim
    assert torch.equal(cp.zigzag_unshard([cp.zigzag_shard(y, r, world, dim=2) for r in range(world)], dim=2), y)
    every = torch.cat([cp.sequence_positions(x.shape[1], r, world) for r in range(world)])
    assert torch.equal(every.sort().values, torch.arange(x.shape[1]))  # each token on exactly one rank


@pytest.mark.parametrize("world", [1, 2, 3])
def test_zigzag_varlen_roundtrip(world):
    lengths = [2 * world * n for n in (3, 0, 1, 4)]
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    x = torch.randn(int(cu[-1]), 2, 3)
    shards = [cp.zigzag_shard_varlen(x, cu, r, world) for r in range(world)]
    local_cu, local_max = cp.local_cu_seqlens(cu, world)
    assert local_cu.tolist() == [c // world for c in cu.tolist()] and local_max == max(lengths) // world
    for r, shard in enumerate(shards):
        assert shard.shape[0] == int(local_cu[-1])
        for d in range(len(lengths)):  # document d's local tokens: chunks r and 2W-1-r of that document
            a, b = cu[d].item(), cu[d + 1].item()
            doc = x[a:b]
            assert torch.equal(shard[local_cu[d]:local_cu[d + 1]], cp.zigzag_shard(doc[None], r, world)[0])
    assert torch.equal(cp.zigzag_unshard_varlen(shards, cu), x)


def test_sharding_errors_name_the_argument():
    with pytest.raises(ValueError, match="'x'"):
        cp.zigzag_shard(torch.randn(1, 6, 1, 1), 0, 2)
    with pytest.raises(ValueError, match="'rank'"):
        cp.zigzag_shard(torch.randn(1, 8, 1, 1), 2, 2)
    with pytest.raises(ValueError, match="'seqlen'"):
        cp.sequence_positions(9, 0, 2, "contiguous")
    with pytest.raises(ValueError, match="'layout'"):
        cp.sequence_positions(8, 0, 2, "striped")
    with pytest.raises(ValueError, match="'cu_seqlens'"):
        cp.varlen_positions([0, 4, 6], 0, 2)
    with pytest.raises(ValueError, match="'cu_seqlens'"):
        cp.local_cu_seqlens([0, 4, 7], 2)


# ---- a 1-rank group in this process --------------------------------------------------------------


@pytest.fixture(scope="module")
def one_rank_group():
    if dist.is_initialized():
        pytest.skip("a default process group already exists in this process")
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", store=dist.FileStore(os.path.join(tmp, "store"), 1), rank=0, world_size=1)
        try:
            yield dist.group.WORLD
        finally:
            dist.destroy_process_group()


@pytest.mark.parametrize("causal", [False, True])
def test_one_rank_is_the_single_call(one_rank_group, causal):
    """With one rank there is nothing to shift or merge: the ring returns the local kernels' results."""
    q = torch.randn(2, 10, 4, 32, requires_grad=True)
    k = torch.randn(2, 10, 2, 32, requires_grad=True)
    v = torch.randn(2, 10, 2, 32, requires_grad=True)
    dout = torch.randn(2, 10, 4, 32)
    out, lse, _ = cp.ring_flash_attn_func(q, k, v, causal=causal, softcap=3.0, return_attn_probs=True)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_out, ref_lse, _ = flashattn.flash_attn_func(q, k, v, causal=causal, softcap=3.0, return_attn_probs=True)
    ref_grads = torch.autograd.grad(ref_out, (q, k, v), dout)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
    for ours, ref in zip(grads, ref_grads):
        assert torch.equal(ours, ref)


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("causal,window", [(True, (5, 0)), (False, (3, 6))])
def test_one_rank_window(one_rank_group, causal, window, layout):
    """A window on one rank: zig-zag plans one call per chunk pair (merged partials, summed gradients)."""
    q = torch.randn(2, 16, 4, 32, requires_grad=True)
    k = torch.randn(2, 16, 2, 32, requires_grad=True)
    v = torch.randn(2, 16, 2, 32, requires_grad=True)
    dout = torch.randn(2, 16, 4, 32)
    out, lse, _ = cp.ring_flash_attn_func(q, k, v, causal=causal, window_size=window, layout=layout,
                                          return_attn_probs=True)
    ref, ref_lse, _ = flashattn.flash_attn_func(q, k, v, causal=causal, window_size=window, return_attn_probs=True)
    pairs = [(out, ref), (lse, ref_lse)]
    pairs += list(zip(torch.autograd.grad(out, (q, k, v), dout), torch.autograd.grad(ref, (q, k, v), dout)))
    for ours, theirs in pairs:
        assert (ours - theirs).abs().max() <= 1e-5 * theirs.abs().max()


def test_one_rank_varlen_is_the_single_call(one_rank_group):
    cu = torch.tensor([0, 6, 6, 16], dtype=torch.int32)
    q = torch.randn(16, 4, 32, requires_grad=True)
    k = torch.randn(16, 1, 32, requires_grad=True)
    v = torch.randn(16, 1, 32, requires_grad=True)
    out = cp.ring_flash_attn_varlen_func(q, k, v, cu, 10, causal=True)
    ref = flashattn.flash_attn_varlen_func(q, k, v, cu, cu, 10, 10, causal=True)
    assert torch.equal(out, ref)
    dout = torch.randn_like(out)
    for ours, theirs in zip(torch.autograd.grad(out, (q, k, v), dout), torch.autograd.grad(ref, (q, k, v), dout)):
        assert torch.equal(ours, theirs)


def test_errors_name_the_argument(one_rank_group):
    x = torch.randn(1, 8, 2, 16)
    ring = cp.ring_flash_attn_func
    with pytest.raises(ValueError, match="'window_size'"):
        ring(x, x, x, causal=True, window_size=(4, -2))
    with pytest.raises(ValueError, match="'k'"):
        ring(x, x[:, :6], x[:, :6], window_size=(4, 4))  # a window follows positions: q and k the same tokens
    with pytest.raises(NotImplementedError, match="'alibi_slopes'"):
        ring(x, x, x, alibi_slopes=torch.ones(2))
    with pytest.raises(ValueError, match="'layout'"):
        ring(x, x, x, causal=True, layout="striped")
    with pytest.raises(ValueError, match="'q'"):
        ring(x[:, :7], x[:, :7], x[:, :7], causal=True)  # zig-zag needs two equal local chunks
    with pytest.raises(ValueError, match="'k'"):
        ring(x, x[:, :6], x[:, :6], causal=True)
    with pytest.raises(ValueError, match="'k'"):
        ring(torch.randn(1, 8, 3, 16), x, x)  # 2 kv heads do not divide 3 query heads
    with pytest.raises(ValueError, match="'k'"):
        ring(x, x.double(), x.double())
    with pytest.raises(ValueError, match="'v'"):
        ring(x, x, x[:, :4])
    with pytest.raises(ValueError, match="'group'"):
        ring(x, x, x, group="world")
    with pytest.raises(ValueError, match="'q'"):
        ring(x[0], x, x)
    p = torch.randn(12, 2, 16)
    varlen = cp.ring_flash_attn_varlen_func
    with pytest.raises(ValueError, match="'cu_seqlens'"):
        varlen(p, p, p, torch.tensor([0, 5, 12], dtype=torch.int32), 7, causal=True)  # odd local document
    with pytest.raises(ValueError, match="'cu_seqlens'"):
        varlen(p, p, p, torch.tensor([0, 6, 12]), 6)  # int64
    with pytest.raises(ValueError, match="'cu_seqlens'"):
        varlen(p, p, p, torch.tensor([0, 6, 10], dtype=torch.int32), 6)  # does not end at the token count
    with pytest.raises(ValueError, match="'max_seqlen'"):
        varlen(p, p, p, torch.tensor([0, 4, 12], dtype=torch.int32), 6)
    with pytest.raises(NotImplementedError, match="'window_size'"):
        varlen(p, p, p, torch.tensor([0, 6, 12], dtype=torch.int32), 6, causal=True, window_size=(3, 0))


# ---- 2 and 4 processes ---------------------------------------------------------------------------

_RESULTS = {}


def _ring_results(world):
    """Spawns `world` ranks once; every case runs in them. {rank: {case: record}}."""
    if world not in _RESULTS:
        with tempfile.TemporaryDirectory() as tmp:
            saved = os.environ.get("OMP_NUM_THREADS")
            os.environ["OMP_NUM_THREADS"] = "1"  # more ranks than cores: one thread each
            try:
                mp.spawn(cases.worker, args=(world, os.path.join(tmp, "store"), tmp,
                                             [c["name"] for c in cases.CASES]), nprocs=world)
            finally:
                if saved is None:
                    del os.environ["OMP_NUM_THREADS"]
                else:
                    os.environ["OMP_NUM_THREADS"] = saved
            _RESULTS[world] = {r: json.load(open(os.path.join(tmp, f"rank{r}.json"))) for r in range(world)}
    return _RESULTS[world]


def _check_record(c, rec, where):
    fp32 = c["dtype"] == "float32"
    dtype = getattr(torch, c["dtype"])
    assert "exception" not in rec, f"{where}:\n{rec.get('exception')}"
    assert rec["out_dtype"] == str(dtype) and rec["grad_dtypes"] == [str(dtype)] * 3, where
    for what in ("out", "lse", "dq", "dk", "dv"):
        if fp32 or what == "lse":  # fp32 (the LSE is fp32 always): the numerics rule's 1e-5
            assert rec[f"{what}_vs_single"] <= 1e-5, f"{where}: {what} rel. error {rec[f'{what}_vs_single']:.3g}"
    for what in ("out", "dq", "dk", "dv"):
        atol = atol_for(dtype, grad=what != "out") * max(1.0, rec[f"{what}_oracle_max"])
        err, base = rec[f"{what}_vs_oracle"], rec[f"{what}_standard_vs_oracle"]
        assert err <= 2 * base + atol, f"{where}: {what} error {err:.3g} vs standard attention {base:.3g}"
    if c["deterministic"]:
        assert rec["bitwise_repeat"], f"{where}: a second run differs"
    assert rec["staged"] == c["staged"], f"{where}: ring staging {rec['staged']}"


@pytest.mark.parametrize("name", [c["name"] for c in cases.CASES])
@pytest.mark.parametrize("world", [2, 4])
def test_ring_matches_single_process(world, name):
    c = next(c for c in cases.CASES if c["name"] == name)
    for rank, results in _ring_results(world).items():
        _check_record(c, results[name], f"{name}, {world} ranks, rank {rank}")


@pytest.mark.parametrize("world", [2, 4])
def test_ring_over_a_subgroup(world):
    """Global ranks 1..W-1 as the ring: its neighbours are found through the group, not global rank +- 1."""
    for rank, results in _ring_results(world).items():
        if rank == 0:
            error = results["errors"]["non_member"]
            assert error is not None and error[0] == "ValueError" and "'group'" in error[1], error
        else:
            _check_record(cases.SUBGROUP_CASE, results["errors"]["subgroup"], f"subgroup of {world - 1}, rank {rank}")


@pytest.mark.parametrize("world", [2, 4])
def test_ring_errors(world):
    for rank, results in _ring_results(world).items():
        assert results["no_group"][0] == "ValueError" and "'group'" in results["no_group"][1]
        step_error = results["errors"]["step_error"]
        assert step_error is not None and step_error[0] == "ValueError" and "'q'" in step_error[1], step_error
        assert results["errors"]["after_error_finite"], f"rank {rank}: the group was unusable after an error"
