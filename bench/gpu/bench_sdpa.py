#!/usr/bin/env python3
"""Attention on the GPU, forward or (--bwd) backward: flashattn (through flashattn-gpu-bench) against
PyTorch SDPA's flash (FA2) and cuDNN backends, on the FlashAttention papers' convention (docs/DESIGN.md §6):
16k tokens in total, model dim 2048, heads = 2048 / d, batch = 16384 / seqlen, bf16.

    python3 bench/gpu/bench_sdpa.py --ours build/bench/gpu/flashattn-gpu-bench --out DIR [--bwd]

The backward counts 2.5x the forward's FLOPs. SDPA's backward is timed as torch.autograd.grad of
one recorded forward (retain_graph: the backward kernels alone); ours as flashattn::backward after
one forward.

--ours-sm80 times ours a second time with FLASHATTN_CUDA_FORWARD=sm80 and FLASHATTN_CUDA_BACKWARD=sm80
(the sm80 kernels on a Hopper GPU) and adds its column and the ratio, so the sm90 and sm80 kernels meet in one run.
--baseline BIN times a flashattn-gpu-bench built from another commit the same way (before / after a change
on one GPU, interleaved with everything else).

Measures the device's ceilings first (bf16 GEMM rate, device-to-device copy bandwidth), times
each config with CUDA events (median of --iters after --warmup), prints a Markdown table and
writes NAME.json and NAME.md (--name, default bench) under --out.
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def median_ms(fn, warmup, iters):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for s, e in zip(starts, ends):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) for s, e in zip(starts, ends))
    return times[len(times) // 2]


def ceilings(warmup, iters):
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = median_ms(lambda: a @ b, warmup, iters)
    gemm = 2 * n**3 / (ms * 1e-3) / 1e12
    x = torch.empty(1 << 30, device="cuda", dtype=torch.uint8).random_()
    y = torch.empty_like(x)
    ms = median_ms(lambda: y.copy_(x), warmup, iters)
    copy = 2 * x.numel() / (ms * 1e-3) / 1e12  # bytes read + written, TB/s
    return gemm, copy


def flops(b, h, s, d, causal, bwd=False):
    return 4 * b * h * s * s * d / (2 if causal else 1) * (2.5 if bwd else 1.0)


def sdpa_ms(q, k, v, causal, backend, bwd, warmup, iters):
    with sdpa_kernel(backend):
        if not bwd:
            return median_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal), warmup, iters)
        q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        grad = torch.randn_like(out)
        return median_ms(lambda: torch.autograd.grad(out, (q, k, v), grad, retain_graph=True), warmup, iters)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ours", required=True, help="path of flashattn-gpu-bench")
    ap.add_argument("--out", default=".")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--seqlens", default="1024,2048,4096,8192")
    ap.add_argument("--head-dims", default="64,128")
    ap.add_argument("--name", default="bench", help="output files NAME.md and NAME.json")
    ap.add_argument("--bwd", action="store_true", help="time the backward pass instead of the forward")
    ap.add_argument("--deterministic", action="store_true", help="ours: deterministic backward")
    ap.add_argument("--ours-sm80", action="store_true",
                    help="also time ours on the sm80 kernels (FLASHATTN_CUDA_FORWARD / _BACKWARD=sm80)")
    ap.add_argument("--baseline", help="also time this flashattn-gpu-bench (built from another commit)")
    args = ap.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.cuda.get_device_name(0)
    gemm, copy = ceilings(args.warmup, args.iters)
    print(f"device: {dev}; torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}")
    print(f"ceilings: bf16 GEMM 8192^3 {gemm:.0f} TFLOP/s, device copy {copy:.2f} TB/s")

    configs = []
    for d in map(int, args.head_dims.split(",")):
        for causal in (False, True):
            for s in map(int, args.seqlens.split(",")):
                configs.append((16384 // s, s, 2048 // d, d, causal))

    # Ours: one process per config, run right before the peers of that config, so that all of them
    # meet the GPU in the same thermal and power state (an H100 under sustained attention load sits
    # at its 700 W cap and lowers its clocks; timing all of ours first, then all peers, biased the
    # ratios by up to 15%: bench/gpu/HOPPER_NOTES.md, session 3).
    def run_ours(env_extra, cases, binary=None):
        cmd = [binary or args.ours, "--warmup", str(args.warmup), "--iters", str(args.iters)]
        if args.bwd:
            cmd += ["--backward"] + (["--deterministic"] if args.deterministic else [])
        for b, s, h, d, c in cases:
            cmd += ["--case", f"{b},{s},{h},{d},{int(c)}"]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env_extra})
        if proc.returncode != 0:
            print(proc.stdout, proc.stderr, file=sys.stderr)
            sys.exit("flashattn-gpu-bench failed")
        res = {}
        for line in proc.stdout.splitlines():
            r = json.loads(line)
            res[(r["batch"], r["seqlen"], r["heads"], r["head_dim"], r["causal"])] = r
        return res

    # Extra columns of ours: (name, binary, environment).
    variants = []
    if args.ours_sm80:
        variants.append(("sm80", args.ours, {"FLASHATTN_CUDA_FORWARD": "sm80", "FLASHATTN_CUDA_BACKWARD": "sm80"}))
    if args.baseline:
        variants.append(("baseline", args.baseline, {}))
        if args.ours_sm80:
            variants.append(("baseline-sm80", args.baseline, variants[0][2]))
    rows = []
    for b, s, h, d, causal in configs:
        ours = run_ours({}, [(b, s, h, d, causal)])
        extra = {name: run_ours(env, [(b, s, h, d, causal)], binary) for name, binary, env in variants}
        # (b, s, h, d) memory viewed as (b, h, s, d): the layout flash_attn and ours take natively.
        q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(3))
        key = (b, s, h, d, causal)
        row = {"batch": b, "seqlen": s, "heads": h, "head_dim": d, "causal": causal,
               "ours_ms": ours[key]["ms"], "kernel": ours[key].get("kernel", "")}
        for name, res in extra.items():
            row[f"{name}_ms"] = res[key]["ms"]
        for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
            try:
                row[f"{name}_ms"] = sdpa_ms(q, k, v, causal, backend, args.bwd, args.warmup, args.iters)
            except Exception as e:  # a backend that refuses the shape
                row[f"{name}_ms"] = None
                print(f"{name} failed for {row}: {e}", file=sys.stderr)
        f = flops(b, h, s, d, causal, args.bwd)
        for name in ("ours", "flash", "cudnn") + tuple(extra):
            ms = row[f"{name}_ms"]
            row[f"{name}_tflops"] = f / (ms * 1e-3) / 1e12 if ms else None
        rows.append(row)
        del q, k, v

    def fmt(x, p=0):
        return "—" if x is None else f"{x:.{p}f}"

    names = [name for name, _, _ in variants]
    # Each extra column's ratio: ours against it, but the baseline's sm80 against our sm80.
    partner = {n: ("sm80" if n == "baseline-sm80" else "ours") for n in names}
    lines = [
        f"{'Backward' if args.bwd else 'Forward'}{' (ours deterministic)' if args.deterministic else ''}. "
        f"Device: {dev}; torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}; "
        f"bf16 GEMM ceiling {gemm:.0f} TFLOP/s, copy {copy:.2f} TB/s",
        f"ours ran: {', '.join(sorted(set(r['kernel'] for r in rows if r['kernel'])))}",
        "",
        "| d | causal | seqlen | batch x heads | ours TFLOP/s | SDPA flash | cuDNN | ours/flash | ours/cuDNN | ours ms |"
        + "".join(f" ours {n} | {partner[n]}/{n} |" for n in names),
        "|---|---|---|---|---|---|---|---|---|---|" + "---|---|" * len(names),
    ]
    for r in rows:
        rf = r["ours_tflops"] / r["flash_tflops"] if r["flash_tflops"] else None
        rc = r["ours_tflops"] / r["cudnn_tflops"] if r["cudnn_tflops"] else None
        line = (
            f"| {r['head_dim']} | {'yes' if r['causal'] else 'no'} | {r['seqlen']} | {r['batch']}x{r['heads']} | "
            f"{fmt(r['ours_tflops'])} | {fmt(r['flash_tflops'])} | {fmt(r['cudnn_tflops'])} | "
            f"{fmt(rf, 2)} | {fmt(rc, 2)} | {r['ours_ms']:.3f} |")
        for n in names:
            line += f" {fmt(r[n + '_tflops'])} | {fmt(r[partner[n] + '_tflops'] / r[n + '_tflops'], 2)} |"
        lines.append(line)
    table = "\n".join(lines)
    print(table)
    (out / f"{args.name}.md").write_text(table + "\n")
    (out / f"{args.name}.json").write_text(json.dumps(
        {"pass": "bwd" if args.bwd else "fwd", "device": dev, "torch": torch.__version__, "cudnn": torch.backends.cudnn.version(),
         "gemm_tflops": gemm, "copy_tbps": copy, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
