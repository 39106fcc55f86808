#!/usr/bin/env python3
"""A model of ring attention's time on many GPUs from measured single-GPU rates (docs/context-parallelism.md).

    python3 tools/cp_model.py              # the tables of the design note (Markdown)
    python3 tools/cp_model.py --heads-k 32 --fwd-tflops 600

Each ring step overlaps one block transfer with one block of attention, so a step takes
max(compute, transfer); the step without a transfer (the last, forward) takes compute alone, and the
backward's final pass that returns dK/dV to their owners is not hidden. Compute per step assumes the
single-GPU rates hold for the per-step block (an upper bound for small blocks: the kernels are slower
below ~4k tokens); transfers take a fixed latency (--latency-us: NCCL launch + network, ~10 us) plus bytes at
the link's full bandwidth. The merge of partial outputs (memory-bound, O(tokens)) is left out.

Strategies:
  ring      one ring over all W GPUs, zig-zag sharded. Within a node every transfer is NVLink; with
            W > 8 the ring crosses nodes and every step waits for its slowest link (InfiniBand).
  2d        Ulysses inside the node, ring across nodes: an all-to-all over NVLink gives each of a
            node's 8 GPUs the node's whole sequence shard for heads / 8 heads (kv heads / 8: needs
            8 | heads_k, else K/V are replicated), then a ring over the N = W / 8 nodes. Same bytes per
            GPU per step as the flat ring, 8x the compute per step, N steps instead of W; the
            all-to-alls (q, k, v in and out back; backward: dO in, dq, dk, dv back) are not hidden.
"""
from __future__ import annotations

import argparse

GPUS_PER_NODE = 8


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--heads-k", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--fwd-tflops", type=float, default=650.0, help="measured H100 forward, d 128 (DESIGN.md)")
    p.add_argument("--bwd-tflops", type=float, default=390.0, help="measured H100 backward, d 128 (DESIGN.md)")
    p.add_argument("--nvlink-gbs", type=float, default=450.0, help="per GPU per direction (H100 SXM)")
    p.add_argument("--ib-gbs", type=float, default=50.0, help="per GPU (one NDR 400 Gb/s NIC per GPU)")
    p.add_argument("--latency-us", type=float, default=10.0, help="fixed cost of one transfer")
    p.add_argument("--gpus", type=int, nargs="+", default=[8, 64, 512])
    p.add_argument("--per-gpu-tokens", type=int, default=16384, help="weak scaling: 128k tokens per 8 GPUs")
    p.add_argument("--total-tokens", type=int, nargs="+", default=[1 << 17, 1 << 20],
                   help="strong scaling: each of these sequences on every W")
    return p.parse_args(argv)


def kv_bytes(tokens, heads_k, d):
    """One K/V block in bf16."""
    return 2 * tokens * heads_k * d * 2


def dkv_bytes(tokens, heads_k, d):
    """The dK/dV accumulators travelling with a block, fp32 (as flashattn.context_parallel sends them)."""
    return 2 * tokens * heads_k * d * 4


def attention_flops(q_tokens, k_tokens, heads, d, causal):
    return 4 * q_tokens * k_tokens * heads * d / (2 if causal else 1)


def ring_times(steps, fwd_compute, bwd_compute, fwd_bytes, bwd_bytes, dkv_return_bytes, bandwidth, latency):
    """(forward s, backward s) of a ring of `steps` equal steps."""
    def transfer(nbytes):
        return latency + nbytes / bandwidth

    fwd = fwd_compute + (steps - 1) * max(fwd_compute, transfer(fwd_bytes))
    bwd = steps * max(bwd_compute, transfer(bwd_bytes)) + (transfer(dkv_return_bytes) if steps > 1 else 0)
    return fwd, bwd


def model(gpus, seqlen, args, strategy, causal=True):
    """Forward and backward time and efficiency (single-GPU rate on 1/W of the work = 1.0)."""
    h, hk, d = args.heads, args.heads_k, args.head_dim
    fwd_rate, bwd_rate = args.fwd_tflops * 1e12, args.bwd_tflops * 1e12
    latency = args.latency_us * 1e-6
    per_gpu = seqlen // gpus
    total_flops = attention_flops(seqlen, seqlen, h, d, causal)
    ideal_fwd, ideal_bwd = total_flops / gpus / fwd_rate, 2.5 * total_flops / gpus / bwd_rate
    exposed = 0.0  # seconds of transfers nothing hides (the 2d all-to-alls)
    if strategy == "ring" or gpus <= GPUS_PER_NODE:
        steps, tokens, heads, heads_k = gpus, per_gpu, h, hk
        bandwidth = (args.nvlink_gbs if gpus <= GPUS_PER_NODE else args.ib_gbs) * 1e9
    else:
        nodes = gpus // GPUS_PER_NODE
        steps, tokens = nodes, seqlen // nodes
        heads, heads_k = h / GPUS_PER_NODE, max(hk / GPUS_PER_NODE, 1)  # fewer kv heads than GPUs: replicated
        bandwidth = args.ib_gbs * 1e9
        a2a = (GPUS_PER_NODE - 1) / GPUS_PER_NODE * per_gpu * d * 2 * (2 * h + 2 * hk)  # q, o + k, v (bytes)
        exposed = latency + a2a / (args.nvlink_gbs * 1e9)
    step_flops = attention_flops(tokens, tokens, heads, d, causal)  # every zig-zag step: half a block
    fwd, bwd = ring_times(steps, step_flops / fwd_rate, 2.5 * step_flops / bwd_rate, kv_bytes(tokens, heads_k, d),
                          kv_bytes(tokens, heads_k, d) + dkv_bytes(tokens, heads_k, d),
                          dkv_bytes(tokens, heads_k, d), bandwidth, latency)
    fwd, bwd = fwd + exposed, bwd + exposed
    transfer_us = (latency + kv_bytes(tokens, heads_k, d) / bandwidth) * 1e6
    return {"tokens_per_gpu": per_gpu, "step_compute_us": step_flops / fwd_rate * 1e6, "step_transfer_us": transfer_us,
            "fwd_ms": fwd * 1e3, "bwd_ms": bwd * 1e3, "fwd_eff": ideal_fwd / fwd, "bwd_eff": ideal_bwd / bwd}


def hide_threshold(args, bandwidth_gbs, causal, backward):
    """Per-rank tokens above which one ring step's attention takes longer than its transfer (the
    per-step compute grows as tokens^2, the transfer as tokens)."""
    h, hk, d = args.heads, args.heads_k, args.head_dim
    per_token_bytes = (kv_bytes(1, hk, d) + (dkv_bytes(1, hk, d) if backward else 0))
    flops_per_token2 = attention_flops(1, 1, h, d, causal) * (2.5 if backward else 1)
    rate = (args.bwd_tflops if backward else args.fwd_tflops) * 1e12
    # tokens^2 * flops_per_token2 / rate = tokens * per_token_bytes / bandwidth
    return per_token_bytes / (bandwidth_gbs * 1e9) * rate / flops_per_token2


def main(argv=None):
    args = parse_args(argv)
    print(f"heads {args.heads}/{args.heads_k}, d {args.head_dim}, bf16 K/V, fp32 dK/dV; forward {args.fwd_tflops:g}, "
          f"backward {args.bwd_tflops:g} TFLOP/s; NVLink {args.nvlink_gbs:g} GB/s, InfiniBand {args.ib_gbs:g} GB/s, "
          f"{args.latency_us:g} us a transfer\n")
    print("Per-rank tokens above which a step's attention hides its transfer:\n")
    print("| link | forward | forward causal | backward | backward causal |")
    print("|---|---|---|---|---|")
    for name, bw in (("NVLink", args.nvlink_gbs), ("InfiniBand", args.ib_gbs)):
        cells = [f"{hide_threshold(args, bw, c, b):,.0f}" for b in (False, True) for c in (False, True)]
        print(f"| {name} | " + " | ".join(cells) + " |")
    tables = [(f"Weak scaling, {args.per_gpu_tokens:,} tokens per GPU", lambda w: args.per_gpu_tokens * w)]
    tables += [(f"Strong scaling, {total:,} tokens", lambda w, total=total: total) for total in args.total_tokens]
    for title, seqlen_of in tables:
        print(f"\n{title} (causal, zig-zag; efficiency = single-GPU rate on 1/W of the work / modeled time):\n")
        print("| GPUs | strategy | tokens/GPU | step compute / transfer (us) | forward ms (eff.) "
              "| backward ms (eff.) |")
        print("|---|---|---|---|---|---|")
        for gpus in args.gpus:
            for strategy in (("ring",) if gpus <= GPUS_PER_NODE else ("ring", "2d")):
                m = model(gpus, seqlen_of(gpus), args, strategy)
                print(f"| {gpus} | {strategy} | {m['tokens_per_gpu']:,} | {m['step_compute_us']:,.0f} / "
                      f"{m['step_transfer_us']:,.0f} | {m['fwd_ms']:,.1f} ({m['fwd_eff']:.2f}) | "
                      f"{m['bwd_ms']:,.1f} ({m['bwd_eff']:.2f}) |")


if __name__ == "__main__":
    main()
