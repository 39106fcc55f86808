#!/usr/bin/env python3
"""Ring attention (flashattn.context_parallel) against plain flashattn attention on one device.

    python3 bench/gpu/bench_context_parallel.py --json bench/results/DATE-h100-context-parallel.json
    python3 bench/gpu/bench_context_parallel.py --device cpu --seqlens 256 --heads 4 --heads-k 2 --head-dim 32 \\
        --dtype fp32 --iters 3 --warmup 1                                       # a quick check of the script

Modes (--modes):
  1rank   a 1-rank process group (NCCL on CUDA, gloo if NCCL refuses or on the CPU) in this process:
          the ring's overhead over the same kernels (target: ring >= 0.97x plain, forward and backward).
          Timed like training runs it: calls queued back to back, each bracketed by CUDA events (the
          host's Python runs ahead of the GPU); median over --iters.
  2ranks  two processes sharing the one device through gloo (NCCL refuses two ranks on one GPU), K/V
          staged through pinned host memory: both ranks' ring attention over their zig-zag halves
          against plain attention over the whole sequence in one process. Not a scaling figure (the
          two ranks time-share one device, and the host staging synchronises every step): it shows
          what the split itself costs. Wall-clock time of a whole call on both ranks (barrier, call,
          synchronize), median over --iters.

Problem (DESIGN §6 shapes): batch 1, --heads 32 over --heads-k 8 (GQA), head dim 128, bf16, causal and
not, seqlen 16k/32k/64k total tokens. FLOPs: forward 4*s*s*h*d (halved when causal), backward 2.5x.
Prints a table (ratio = plain time / ring time: 1.00 = no overhead) and writes it as JSON to --json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import flashattn
from flashattn import context_parallel as cp

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--modes", nargs="+", default=["1rank", "2ranks"], choices=("1rank", "2ranks", "sim"))
    p.add_argument("--sim-world", type=int, default=8, help="ring size the sim mode simulates")
    p.add_argument("--seqlens", nargs="+", type=int, default=[16384, 32768, 65536], help="total tokens")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--heads-k", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--causal", default="both", choices=("both", "yes", "no"))
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--json", help="write the results to this path")
    args = p.parse_args(argv)
    if args.device == "cuda" and not (torch.cuda.is_available() and flashattn.cuda_available()):
        p.error("--device cuda: no usable GPU or flashattn was built without CUDA (FLASHATTN_CUDA=ON pip install .)")
    if args.heads % args.heads_k:
        p.error(f"--heads-k {args.heads_k} must divide --heads {args.heads}")
    for s in args.seqlens:
        if s % 4:
            p.error(f"--seqlens: {s} is not a multiple of 4 (zig-zag over 2 ranks cuts it into 4 chunks)")
        if "sim" in args.modes and s % (2 * args.sim_world):
            p.error(f"--seqlens: {s} is not a multiple of {2 * args.sim_world} (zig-zag over --sim-world ranks)")
    if args.iters < 1 or args.warmup < 0:
        p.error("--iters must be >= 1 and --warmup >= 0")
    return args


def flops(seqlen, args, causal):
    fwd = 4 * seqlen * seqlen * args.heads * args.head_dim / (2 if causal else 1)
    return fwd, 2.5 * fwd


def make_inputs(seqlen, args, device, seed=0):
    """Full-sequence q, k, v, dout (batch 1), the same in every process (a seeded generator on the device)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    dtype = DTYPES[args.dtype]

    def rand(heads):
        return torch.randn(1, seqlen, heads, args.head_dim, generator=gen, device=device, dtype=dtype)

    return rand(args.heads), rand(args.heads_k), rand(args.heads_k), rand(args.heads)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def queued_ms(fn, device, warmup, iters):
    """Median time of fn, calls queued back to back (CUDA events; wall clock on the CPU)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    if device.type != "cuda":
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    synchronize(device)
    return statistics.median(s.elapsed_time(e) for s, e in events)


def timed_pair(attention, q, k, v, dout, device, args, timer=None):
    """(forward ms, backward ms) of attention(q, k, v) -> out; timer: queued_ms (default) or wall_ms."""
    timer = timer or queued_ms
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    forward_ms = timer(lambda: attention(q, k, v), device, args.warmup, args.iters)
    out = attention(q, k, v)
    backward_ms = timer(lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True), device,
                        args.warmup, args.iters)
    return forward_ms, backward_ms


def causal_list(args):
    return {"both": [False, True], "yes": [True], "no": [False]}[args.causal]


def init_group(device, rank, world, store_path, prefer_nccl):
    """A process group over a FileStore (no network); NCCL when asked for and it accepts, else gloo."""
    timeout = datetime.timedelta(minutes=10)
    if prefer_nccl and device.type == "cuda" and dist.is_nccl_available():
        try:
            dist.init_process_group("nccl", store=dist.FileStore(store_path + ".nccl", world), rank=rank,
                                    world_size=world, timeout=timeout, device_id=device)
            return "nccl"
        except Exception as e:  # noqa: BLE001 - fall back, and say so in the table
            print(f"NCCL refused the group ({type(e).__name__}: {e}); using gloo", file=sys.stderr)
            if dist.is_initialized():
                dist.destroy_process_group()
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", store=dist.FileStore(store_path + ".gloo", world), rank=rank, world_size=world,
                            timeout=timeout)
    return "gloo"


def row(mode, backend, seqlen, causal, args, plain, ring, share=1.0):
    """share: the fraction of the whole attention's FLOPs the timed calls do (sim: 1 / ring size)."""
    fwd_flops, bwd_flops = (share * f for f in flops(seqlen, args, causal))
    return {
        "mode": mode, "backend": backend, "seqlen": seqlen, "causal": causal, "heads": args.heads,
        "heads_k": args.heads_k, "head_dim": args.head_dim, "dtype": args.dtype,
        "plain_fwd_ms": plain[0], "ring_fwd_ms": ring[0], "fwd_ratio": plain[0] / ring[0],
        "plain_bwd_ms": plain[1], "ring_bwd_ms": ring[1], "bwd_ratio": plain[1] / ring[1],
        "plain_fwd_tflops": fwd_flops / plain[0] / 1e9, "ring_fwd_tflops": fwd_flops / ring[0] / 1e9,
        "plain_bwd_tflops": bwd_flops / plain[1] / 1e9, "ring_bwd_tflops": bwd_flops / ring[1] / 1e9,
    }


def plain_attention(causal):
    return lambda q, k, v: flashattn.flash_attn_func(q, k, v, causal=causal)


def ring_attention(causal):
    return lambda q, k, v: cp.ring_flash_attn_func(q, k, v, causal=causal)


def run_one_rank(args, device, store_dir):
    backend = init_group(device, 0, 1, os.path.join(store_dir, "one"), prefer_nccl=True)
    rows = []
    try:
        for seqlen in args.seqlens:
            for causal in causal_list(args):
                q, k, v, dout = make_inputs(seqlen, args, device)
                plain = timed_pair(plain_attention(causal), q, k, v, dout, device, args)
                ring = timed_pair(ring_attention(causal), q, k, v, dout, device, args)
                rows.append(row("1rank", backend, seqlen, causal, args, plain, ring))
                print_row(rows[-1])
                del q, k, v, dout
    finally:
        dist.destroy_process_group()
    return rows


def wall_ms(fn, device, warmup, iters):
    """Median wall time of whole calls, every rank starting together (barrier) and finishing its device work."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        dist.barrier()
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def two_rank_worker(rank, args, store_dir, result_path):
    device = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    init_group(device, rank, 2, os.path.join(store_dir, "two"), prefer_nccl=False)
    rows = []
    try:
        for seqlen in args.seqlens:
            for causal in causal_list(args):
                q, k, v, dout = make_inputs(seqlen, args, device)
                # the whole sequence in one process (rank 0), the other rank waiting
                plain = timed_pair(plain_attention(causal), q, k, v, dout, device, args) if rank == 0 else None
                dist.barrier()
                local = [cp.zigzag_shard(x, rank, 2) for x in (q, k, v, dout)]
                del q, k, v, dout
                ring_fwd, ring_bwd = timed_pair(ring_attention(causal), *local, device, args, timer=wall_ms)
                del local
                times = [None, None]
                dist.all_gather_object(times, (ring_fwd, ring_bwd))
                if rank == 0:  # a call ends when its slowest rank does
                    ring = (max(t[0] for t in times), max(t[1] for t in times))
                    rows.append(row("2ranks", "gloo", seqlen, causal, args, plain, ring))
                    print_row(rows[-1])
    finally:
        dist.destroy_process_group()
    if rank == 0:
        with open(result_path, "w") as f:
            json.dump(rows, f)


class _SimulatedRing:
    """Rank 0 of a ring of world_size ranks whose shifts hand back what was sent (no transfer): every
    step computes what rank 0 of a real ring computes, on its own block's data."""

    def __init__(self, world_size):
        self.rank, self.world_size = 0, world_size

    def source(self, step):
        return (self.rank - step) % self.world_size

    def shift(self, tensors):
        class _Done:
            def wait(self):
                return list(tensors)

        return _Done()


def run_simulated(args, device):
    from flashattn.context_parallel._algorithm import Options, RingAttention
    from flashattn.context_parallel._tokens import DenseTokens

    world = args.sim_world
    rows = []
    for seqlen in args.seqlens:
        for causal in causal_list(args):
            q, k, v, dout = make_inputs(seqlen, args, device)
            plain = timed_pair(plain_attention(causal), q, k, v, dout, device, args)
            plain = (plain[0] / world, plain[1] / world)  # linear scaling
            local = [cp.zigzag_shard(x, 0, world) for x in (q, k, v, dout)]
            del q, k, v, dout
            ring, options = _SimulatedRing(world), Options(None, causal, "zigzag", 0.0, False)

            def attention(q, k, v):
                return RingAttention.apply(q, k, v, ring, DenseTokens(), options)[0]

            ring_times = timed_pair(attention, *local, device, args)
            rows.append(row(f"sim{world}", "none", seqlen, causal, args, plain, ring_times, share=1 / world))
            rows[-1]["plain_note"] = f"plain attention over {seqlen} tokens / {world}"
            print_row(rows[-1])
    return rows


def run_two_ranks(args, store_dir):
    result_path = os.path.join(store_dir, "two-ranks.json")
    mp.spawn(two_rank_worker, args=(args, store_dir, result_path), nprocs=2)
    with open(result_path) as f:
        return json.load(f)


HEADER = (f"{'mode':7} {'backend':7} {'causal':6} {'seqlen':>7} | {'plain fwd':>10} {'ring fwd':>10} {'ratio':>6} "
          f"| {'plain bwd':>10} {'ring bwd':>10} {'ratio':>6} | ring TFLOP/s fwd/bwd")


def print_row(r):
    print(f"{r['mode']:7} {r['backend']:7} {'yes' if r['causal'] else 'no':6} {r['seqlen']:>7} | "
          f"{r['plain_fwd_ms']:>8.3f}ms {r['ring_fwd_ms']:>8.3f}ms {r['fwd_ratio']:>6.3f} | "
          f"{r['plain_bwd_ms']:>8.3f}ms {r['ring_bwd_ms']:>8.3f}ms {r['bwd_ratio']:>6.3f} | "
          f"{r['ring_fwd_tflops']:.3g} / {r['ring_bwd_tflops']:.3g}", flush=True)


def environment(args):
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__)), check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    device = torch.cuda.get_device_name(0) if args.device == "cuda" else platform.processor() or "cpu"
    return {"device": device, "torch": torch.__version__, "flashattn": flashattn.__version__, "commit": commit,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "args": vars(args)}


def main(argv=None):
    args = parse_args(argv)
    env = environment(args)
    print(f"# {env['device']}, torch {env['torch']}, flashattn {env['flashattn']} ({env['commit']}); batch 1, "
          f"{args.heads}/{args.heads_k} heads, d {args.head_dim}, {args.dtype}; ratio = plain time / ring time")
    print(HEADER)
    rows = []
    with tempfile.TemporaryDirectory() as store_dir:
        if "1rank" in args.modes:
            device = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
            if device.type == "cuda":
                torch.cuda.set_device(device)
            rows += run_one_rank(args, device, store_dir)
        if "2ranks" in args.modes:
            rows += run_two_ranks(args, store_dir)
        if "sim" in args.modes:
            rows += run_simulated(args, torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "rows": rows}, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
