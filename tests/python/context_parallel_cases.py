"""The multi-process half of test_context_parallel.py: each spawned rank runs every case of CASES on its
shard and records, per case, how far its output, LSE and gradients are from (1) single-process flashattn
on the unsharded sequence and (2) the fp64 oracle, next to the standard attention's error (DESIGN §5).
The parent (pytest) asserts on the records. Not collected by pytest (no test_ prefix)."""

import datetime
import functools
import json
import os
import traceback

import torch
import torch.distributed as dist

import flashattn
from flashattn import context_parallel as cp

from torch_reference import max_err, oracle_dtype


def case(name, **kw):
    base = dict(name=name, batch=2, chunk=5, heads=4, heads_k=2, d=32, causal=False, layout="zigzag", softcap=0.0,
                dtype="float32", varlen=None, deterministic=False, staged=False, merge_slots=None, window=(-1, -1))
    base.update(kw)
    return base


# chunk: tokens per chunk (zig-zag: 2W chunks, contiguous: W); varlen: tokens per chunk of every document
CASES = [
    case("dense"),
    case("dense-causal-zigzag", chunk=7),
    case("dense-causal-zigzag-mqa-softcap", heads=4, heads_k=1, d=40, softcap=5.0, causal=True),
    case("dense-causal-contiguous", causal=True, layout="contiguous", chunk=6),
    case("dense-causal-zigzag-bf16", causal=True, dtype="bfloat16", chunk=8, d=64),
    case("dense-causal-deterministic", causal=True, deterministic=True),
    case("dense-causal-staged", causal=True, staged=True, batch=1),
    case("dense-causal-3-merge-slots", causal=True, merge_slots=3),  # 4 ranks: the running-result rotation
    case("dense-causal-zigzag-window", causal=True, window=(6, 0)),  # across chunk and rank boundaries
    case("dense-zigzag-window-both-sides", window=(4, 3), chunk=4, softcap=5.0),
    case("dense-causal-contiguous-window", causal=True, layout="contiguous", window=(9, 0), chunk=6, heads_k=1),
    case("varlen", varlen=[3, 0, 5, 1], heads_k=4),
    case("varlen-causal-zigzag-gqa", varlen=[3, 0, 5, 1, 2], causal=True),
    case("varlen-causal-contiguous", varlen=[4, 2, 0, 3], causal=True, layout="contiguous", heads_k=1),
    case("varlen-causal-zigzag-bf16", varlen=[4, 1, 6], causal=True, dtype="bfloat16", d=64),
]


def _full_inputs(c, world, gen):
    """Unsharded q, k, v, dout (dense: (batch, S, h, d); varlen: (total, h, d)) and the global cu_seqlens."""
    chunks = 2 * world if c["layout"] == "zigzag" else world
    dtype = getattr(torch, c["dtype"])
    if c["varlen"] is None:
        lead, cu = (c["batch"], c["chunk"] * chunks), None
    else:
        lengths = [n * chunks for n in c["varlen"]]
        cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0).to(torch.int32)
        lead = (int(cu[-1]),)

    def rand(heads, d):
        return torch.randn(*lead, heads, d, generator=gen).to(dtype)

    return (rand(c["heads"], c["d"]), rand(c["heads_k"], c["d"]), rand(c["heads_k"], c["d"]),
            rand(c["heads"], c["d"]), cu)


def _single_process(c, q, k, v, dout, cu):
    """flashattn on the unsharded sequence: out, lse, dq, dk, dv."""
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    if cu is None:
        out, lse, _ = flashattn.flash_attn_func(q, k, v, causal=c["causal"], softcap=c["softcap"],
                                                window_size=c["window"], return_attn_probs=True)
    else:
        m = int((cu[1:] - cu[:-1]).max())
        out, lse, _ = flashattn.flash_attn_varlen_func(q, k, v, cu, cu, m, m, causal=c["causal"], softcap=c["softcap"],
                                                       return_attn_probs=True)
    return (out, lse, *torch.autograd.grad(out, (q, k, v), dout))


def _attention(q, k, v, causal, softcap, dtype, window=(-1, -1)):
    """The textbook attention, S and P materialised, with matmuls in `dtype` and the softmax in fp32 (fp64
    when dtype is fp64): the fp64 oracle, or the standard attention in the input dtype (DESIGN §5)."""
    h, hk, d = q.shape[-2], k.shape[-2], q.shape[-1]
    q, k, v = (x.to(dtype) for x in (q, k, v))
    k, v = k.repeat_interleave(h // hk, dim=-2), v.repeat_interleave(h // hk, dim=-2)
    s = torch.einsum("bihd,bjhd->bhij", q, k) * d ** -0.5
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    left, right = window
    if causal:  # q and k are the same tokens: the diagonal
        right = 0
    i, j = torch.arange(q.shape[1])[:, None], torch.arange(k.shape[1])[None, :]
    hidden = torch.zeros(q.shape[1], k.shape[1], dtype=torch.bool)
    if right >= 0:
        hidden |= j > i + right
    if left >= 0:
        hidden |= j < i - left
    s = s.masked_fill(hidden, float("-inf"))
    p = torch.softmax(s if dtype == torch.float64 else s.float(), dim=-1).to(dtype)
    return torch.einsum("bhij,bjhd->bihd", p, v)


def _textbook(c, q, k, v, dout, cu, dtype):
    """_attention per document (varlen) or per batch: out, dq, dk, dv."""
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))

    def one(qs, ks, vs):
        return _attention(qs, ks, vs, c["causal"], c["softcap"], dtype, c["window"])

    if cu is None:
        out = one(q, k, v)
    else:
        bounds = cu.tolist()
        out = torch.cat([one(q[a:b][None], k[a:b][None], v[a:b][None])[0] for a, b in zip(bounds[:-1], bounds[1:])])
    return (out, *torch.autograd.grad(out, (q, k, v), dout.to(out.dtype)))


def _ring(c, q, k, v, dout, cu, rank, world, group=None):
    """This rank's shard through the ring: positions, out, lse, dq, dk, dv."""
    if cu is None:
        pos = cp.sequence_positions(q.shape[1], rank, world, c["layout"])
        take = functools.partial(torch.index_select, dim=1, index=pos)
    else:
        pos = cp.varlen_positions(cu, rank, world, c["layout"])
        take = functools.partial(torch.index_select, dim=0, index=pos)
    ql, kl, vl = (take(x).detach().requires_grad_() for x in (q, k, v))
    kw = dict(causal=c["causal"], softcap=c["softcap"], layout=c["layout"], deterministic=c["deterministic"],
              return_attn_probs=True, group=group)
    if c["window"] != (-1, -1):
        kw["window_size"] = c["window"]
    if cu is None:
        out, lse, _ = cp.ring_flash_attn_func(ql, kl, vl, **kw)
    else:
        cu_local, max_local = cp.local_cu_seqlens(cu, world)
        out, lse, _ = cp.ring_flash_attn_varlen_func(ql, kl, vl, cu_local, max_local, **kw)
    return (pos, out, lse, *torch.autograd.grad(out, (ql, kl, vl), take(dout)))


def _rel(x, ref):
    scale = ref.abs().max().item() if ref.numel() else 0.0
    return max_err(x, ref) / max(scale, 1e-30)


def run_case(c, rank, world, group=None):
    gen = torch.Generator().manual_seed(1234 + len(c["name"]) * 7 + world)  # same full inputs on every rank
    q, k, v, dout, cu = _full_inputs(c, world, gen)
    single = _single_process(c, q, k, v, dout, cu)
    ref = _textbook(c, q, k, v, dout, cu, oracle_dtype(q.dtype))
    base = _textbook(c, q, k, v, dout, cu, q.dtype)
    original_ring, original_slots = cp._api.Ring, cp._merge.MAX_SLOTS
    if c["staged"]:  # a fresh Ring that stages through host buffers, as for CUDA tensors over gloo
        cp._api._rings.clear()
        cp._api.Ring = functools.partial(original_ring, stage_through_host=True)
    if c["merge_slots"]:
        cp._merge.MAX_SLOTS = c["merge_slots"]
    try:
        pos, *ring = _ring(c, q, k, v, dout, cu, rank, world, group)
        again = _ring(c, q, k, v, dout, cu, rank, world, group)[1:] if c["deterministic"] else None
        staged = cp._api._ring_for(group, q.device).stage_through_host
    finally:
        cp._api.Ring, cp._merge.MAX_SLOTS = original_ring, original_slots
        if c["staged"]:
            cp._api._rings.clear()
    dim = 1 if cu is None else 0
    shard = lambda x, d=dim: x.index_select(d, pos)  # noqa: E731
    record = {}
    names = ("out", "lse", "dq", "dk", "dv")
    single_shards = [shard(single[0]), shard(single[1], -1)] + [shard(g) for g in single[2:]]
    for name, ours, theirs in zip(names, ring, single_shards):
        record[f"{name}_vs_single"] = _rel(ours, theirs)
    for name, ours, r, b in zip(("out", "dq", "dk", "dv"), [ring[0]] + ring[2:], ref, base):
        record[f"{name}_vs_oracle"] = max_err(ours, shard(r))
        record[f"{name}_standard_vs_oracle"] = max_err(shard(b), shard(r))
        record[f"{name}_oracle_max"] = shard(r).abs().max().item()
    record["staged"] = staged
    record["dtype"] = c["dtype"]
    record["out_dtype"] = str(ring[0].dtype)
    record["grad_dtypes"] = [str(g.dtype) for g in ring[2:]]
    if again is not None:
        record["bitwise_repeat"] = all(torch.equal(a, b) for a, b in zip(ring, again))
    return record


def _error_of(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - recorded for the parent to judge
        return [type(e).__name__, str(e)]
    return None


SUBGROUP_CASE = case("subgroup-causal-zigzag", causal=True)


def run_group_cases(rank, world):
    """Errors raised inside a ring step, on every rank alike, leave the group usable; a ring over a
    subgroup (global ranks 1..W-1: its ring neighbours are not global rank +- 1) matches too, and the
    rank outside it gets a clear error."""
    q = torch.randn(1, 4, 2, 320)  # head dim 320: the C++ library refuses it inside step 0
    err = _error_of(lambda: cp.ring_flash_attn_func(q, q, q))
    x = torch.randn(1, 4, 2, 16)
    out = cp.ring_flash_attn_func(x, x, x, causal=True)  # the group still works after the failed call
    results = {"step_error": err, "after_error_finite": bool(torch.isfinite(out).all())}
    sub = dist.new_group(list(range(1, world)))
    if rank == 0:
        results["non_member"] = _error_of(lambda: cp.ring_flash_attn_func(x, x, x, group=sub))
    else:
        results["subgroup"] = run_case(SUBGROUP_CASE, dist.get_rank(sub), dist.get_world_size(sub), sub)
    return results


def worker(rank, world, store_path, result_dir, names):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    results = {"no_group": _error_of(lambda: cp.ring_flash_attn_func(*(torch.randn(1, 4, 2, 8),) * 3))}
    store = dist.FileStore(store_path, world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        for c in CASES:
            if c["name"] in names:
                try:
                    results[c["name"]] = run_case(c, rank, world)
                except Exception:  # every rank fails alike for a bad case: record it, go on
                    results[c["name"]] = {"exception": traceback.format_exc()}
        results["errors"] = run_group_cases(rank, world)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    with open(os.path.join(result_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
