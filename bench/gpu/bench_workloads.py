#!/usr/bin/env python3
"""The training and serving shapes the fixed-length table leaves out (issues 14 and 15): packed
documents (varlen), GQA with softcap and a sliding window, ALiBi. Ours through flashattn-gpu-bench
with the default dispatch (sm90 where it covers the call), again with the sm80 kernels forced
(FLASHATTN_CUDA_FORWARD / _BACKWARD=sm80) and, with --baseline BIN, a flashattn-gpu-bench built from
another commit; every variant of a shape runs back to back (interleaved), --reps times.

    python3 bench/gpu/bench_workloads.py --ours build/bench/gpu/flashattn-gpu-bench --out DIR [--bwd]

FLOPs: packed documents count each document's own causal half (4 h l^2 d / 2 per document); a
window counts only the (query, key) pairs it lets through (flashattn-gpu-bench does both). The
backward counts 2.5x. Writes NAME.json and NAME.md under --out (--name, default workloads).
"""
import argparse
import json
import os
import random
import statistics
import subprocess
import sys
from pathlib import Path

DOC_LENGTHS = (117, 333, 512, 999, 1500, 2048, 3001, 4096)
TOKENS = 16384


def packed_documents(seed=0):
    """Lengths drawn from DOC_LENGTHS until TOKENS tokens; the last one cut to fit exactly."""
    rng, docs = random.Random(seed), []
    while sum(docs) < TOKENS:
        docs.append(rng.choice(DOC_LENGTHS))
    docs[-1] -= sum(docs) - TOKENS
    return docs


# name, flashattn-gpu-bench arguments (one case each), minimum target (TFLOP/s fwd, bwd; None: none)
def workloads():
    docs = ",".join(map(str, packed_documents()))
    return [
        ("packed docs d128 causal (16 heads)", ["--docs", docs, "--case", "1,4096,16,128,1"], (400, 430)),
        ("GQA 32/8 d128 8k causal, softcap 30, window 4096", ["--softcap", "30", "--window", "4096",
                                                               "--case", "2,8192,32,128,1,8"], (270, None)),
        ("GQA 16/8 d256 4k causal, softcap 50, window 2048", ["--softcap", "50", "--window", "2048",
                                                               "--case", "4,4096,16,256,1,8"], (350, None)),
        ("d128 8k causal (plain)", ["--case", "2,8192,16,128,1"], (None, None)),
        ("d128 8k causal, ALiBi", ["--alibi", "--case", "2,8192,16,128,1"], (None, None)),
        ("d128 8k (plain)", ["--case", "2,8192,16,128,0"], (None, None)),
        ("d128 8k, ALiBi", ["--alibi", "--case", "2,8192,16,128,0"], (None, None)),
    ]


def run_bench(binary, args, env_extra, bwd, warmup, iters):
    env = dict(os.environ, **env_extra)
    cmd = [binary, "--warmup", str(warmup), "--iters", str(iters)] + (["--backward"] if bwd else []) + args
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"error": (proc.stderr or proc.stdout).strip()[-300:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ours", required=True)
    ap.add_argument("--baseline", help="flashattn-gpu-bench of another commit, timed beside ours")
    ap.add_argument("--bwd", action="store_true")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out", required=True)
    ap.add_argument("--name", default="workloads")
    args = ap.parse_args()
    knob = "FLASHATTN_CUDA_BACKWARD" if args.bwd else "FLASHATTN_CUDA_FORWARD"
    variants = [("ours", args.ours, {}), ("ours sm80", args.ours, {knob: "sm80"})]
    if args.baseline:
        variants.append(("baseline", args.baseline, {}))

    rows = []
    for name, bench_args, targets in workloads():
        row = {"workload": name, "args": bench_args, "target": targets[1 if args.bwd else 0], "runs": {}}
        for _ in range(args.reps):
            for label, binary, env in variants:
                r = run_bench(binary, bench_args, env, args.bwd, args.warmup, args.iters)
                row["runs"].setdefault(label, []).append(r)
        for label, runs in row["runs"].items():
            ok = [r["tflops"] for r in runs if "tflops" in r]
            row[label] = statistics.median(ok) if ok else None
            row[label + " kernel"] = next((r.get("kernel") for r in runs if "kernel" in r), runs[0].get("error"))
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("runs", "args")}), flush=True)

    labels = [v[0] for v in variants]
    lines = [f"# {'Backward' if args.bwd else 'Forward'} workloads (bf16, TFLOP/s, median of {args.reps} runs "
             f"of {args.iters} iterations)", "",
             "| workload | " + " | ".join(labels) + " | ours / sm80 | " +
             ("ours / baseline | " if args.baseline else "") + "target | kernel |",
             "|---|" + "---|" * (len(labels) + 3 + bool(args.baseline))]
    fmt = lambda x: f"{x:.0f}" if x else "n/a"
    for r in rows:
        ratio = lambda a, b: f"{r[a] / r[b]:.2f}" if r.get(a) and r.get(b) else "n/a"
        kernel = str(r.get("ours kernel", ""))[:90]
        lines.append(f"| {r['workload']} | " + " | ".join(fmt(r.get(l)) for l in labels) +
                     f" | {ratio('ours', 'ours sm80')} | " +
                     (f"{ratio('ours', 'baseline')} | " if args.baseline else "") +
                     f"{r['target'] or ''} | {kernel} |")
    plain = {r["workload"]: r.get("ours") for r in rows}
    for base in ("d128 8k causal", "d128 8k"):
        a, p = plain.get(base + ", ALiBi"), plain.get(base + " (plain)")
        if a and p:
            lines.append(f"\nALiBi / plain, {base}: {a / p:.2f} (target >= 0.9)")
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.md").write_text(text + "\n")
    (out / f"{args.name}.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    sys.exit(main())
