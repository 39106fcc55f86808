#!/usr/bin/env python3
"""Renders the benchmark tables (the JSON that bench_sdpa.py and bench_decode.py write) as charts:
TFLOP/s (or TB/s for decode) against the sequence length, one panel per head dim (per batch for
decode), ours beside the peers of the same run (torch SDPA flash = FA2, cuDNN; a baseline commit and
our sm80 kernels where the run timed them). Solid lines non-causal, dashed causal.

    python3 bench/gpu/plot_results.py bench/results/PREFIX   # reads PREFIX-{forward,backward,decode}.json

writes PREFIX-{forward,backward,decode}.png beside them (needs matplotlib; runs on any machine).
"""
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# (column prefix in the JSON rows, legend label, colour); missing columns are skipped.
SERIES = [
    ("ours", "flashattn", "tab:red"),
    ("cudnn", "cuDNN (SDPA)", "tab:blue"),
    ("flash", "FA2 (SDPA flash)", "tab:green"),
    ("baseline", "flashattn baseline", "tab:gray"),
    ("sm80", "flashattn sm80 kernels", "tab:orange"),
]


def plot_attention(data, title, path):
    rows = data["rows"]
    dims = sorted({r["head_dim"] for r in rows})
    fig, axes = plt.subplots(1, len(dims), figsize=(5 * len(dims), 4), sharey=True, squeeze=False)
    for ax, d in zip(axes[0], dims):
        for causal, style in ((False, "-"), (True, "--")):
            sel = sorted((r for r in rows if r["head_dim"] == d and r["causal"] == causal), key=lambda r: r["seqlen"])
            if not sel:
                continue
            xs = [r["seqlen"] for r in sel]
            for key, label, colour in SERIES:
                ys = [r.get(f"{key}_tflops") for r in sel]
                if all(y is None for y in ys):
                    continue
                ax.plot(xs, ys, style, color=colour, marker="o", markersize=3,
                        label=f"{label}{' causal' if causal else ''}")
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r["seqlen"] for r in rows if r["head_dim"] == d}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{int(x) // 1024}k"
                                                                           if x >= 1024 else str(int(x))))
        ax.set_title(f"head dim {d}")
        ax.set_xlabel("sequence length (16k tokens per batch)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("TFLOP/s")
    gemm = data.get("gemm_tflops")
    fig.suptitle(f"{title}, {data['device']}, bf16" + (f" (bf16 GEMM ceiling {gemm:.0f} TFLOP/s)" if gemm else ""))
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 5), fontsize=8)
    fig.tight_layout(rect=(0, 0.12, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_decode(data, path):
    rows = data["rows"]
    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 4), sharey=True, squeeze=False)
    for ax, b in zip(axes[0], batches):
        sel = sorted((r for r in rows if r["batch"] == b), key=lambda r: r["seqlen_k"])
        xs = [r["seqlen_k"] for r in sel]
        for key, label, colour in SERIES:
            ys = [r.get(f"{key}_tbps") for r in sel]
            if all(y is None for y in ys):
                continue
            ax.plot(xs, ys, "-", color=colour, marker="o", markersize=3, label=label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs)
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{int(x) // 1024}k"))
        ax.set_title(f"batch {b}")
        ax.set_xlabel("keys in the cache")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("TB/s (K + V + Q + O bytes / time)")
    fig.suptitle(f"Decode: 1 query, 32/8 heads, d 128, bf16, {data['device']} "
                 f"(read ceiling {data.get('read_tbps', 0):.2f} TB/s)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)
    fig.tight_layout(rect=(0, 0.1, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    prefix = sys.argv[1]
    for name, title in (("forward", "Forward"), ("backward", "Backward")):
        src = Path(f"{prefix}-{name}.json")
        if src.exists():
            plot_attention(json.loads(src.read_text()), title, src.with_suffix(".png"))
            print("wrote", src.with_suffix(".png"))
    src = Path(f"{prefix}-decode.json")
    if src.exists():
        plot_decode(json.loads(src.read_text()), src.with_suffix(".png"))
        print("wrote", src.with_suffix(".png"))


if __name__ == "__main__":
    main()
