#!/usr/bin/env python3
"""Decoding on the GPU: one query token against a long KV cache, flashattn (through
flashattn-gpu-bench) against PyTorch SDPA's flash, cuDNN and mem-efficient backends.

    python3 bench/gpu/bench_decode.py --ours build/bench/gpu/flashattn-gpu-bench --out DIR

Shape (docs/DESIGN.md §6): 32 query heads over 8 KV heads, d 128, bf16, seqlen_q 1, batch 1 and 16,
keys 4k ... 128k (batch 16 up to what fits). Decoding is memory-bound, so every result is a
bandwidth: TB/s = (K + V + Q + O bytes) / median time, next to the device's ceilings measured in
the same run (torch copy, read + write; a plain streaming read, read only).

SDPA is called with (b, h, s, d) views of (b, s, h, d) memory, the layout flash_attn and we take.
GQA: each backend first gets enable_gqa=True (8 KV heads, as we read them); a backend that refuses
it gets K/V expanded to 32 heads (repeat_interleave, outside the timing), and the table says
which. K/V sets are rotated so that no call finds its K/V in L2 (as flashattn-gpu-bench --rotate-kv does).
--splits-sweep also times ours at fixed num_splits values for the key lengths it names.
--paged-sizes (default 16,256) times flashattn.flash_attn_with_kvcache through the Python API, as serving
engines call it, on a contiguous cache and on paged caches (block_table, pages in a shuffled order) of those
page sizes, same lengths (cache_seqlens tensor): the paged/contiguous ratio is issue 13's >= 0.95 target.
Prints a Markdown table with ratios and writes NAME.json and NAME.md under --out.
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

HEADS, HEADS_K, D = 32, 8, 128
BACKENDS = (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
            ("efficient", SDPBackend.EFFICIENT_ATTENTION))


def median_ms(fn, warmup, iters):
    for i in range(warmup):
        fn(i)
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for i, (s, e) in enumerate(zip(starts, ends)):
        s.record()
        fn(warmup + i)
        e.record()
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) for s, e in zip(starts, ends))
    return times[len(times) // 2]


def copy_ceiling(warmup, iters):
    x = torch.empty(1 << 30, device="cuda", dtype=torch.uint8).random_()
    y = torch.empty_like(x)
    ms = median_ms(lambda i: y.copy_(x), warmup, iters)
    del x, y
    return 2 * (1 << 30) / (ms * 1e-3) / 1e12  # bytes read + written


def torch_read_ceiling(warmup, iters):
    x = torch.randn(1 << 28, device="cuda", dtype=torch.float32)  # 1 GiB
    ms = median_ms(lambda i: x.sum(), warmup, iters)
    del x
    return (1 << 30) / (ms * 1e-3) / 1e12


def kv_bytes(b, s):
    return 2 * b * s * HEADS_K * D * 2


def io_bytes(b, s):
    return kv_bytes(b, s) + 2 * b * HEADS * D * 2  # + q and out


def run_ours(binary, cases, warmup, iters, read_mib):
    cmd = [binary, "--warmup", str(warmup), "--iters", str(iters), "--rotate-kv"]
    if read_mib:
        cmd += ["--read-bandwidth", str(read_mib)]
    for b, s, splits in cases:
        cmd += ["--case", f"{b},{s},{HEADS},{D},0,{HEADS_K},1,{splits}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stdout, proc.stderr, file=sys.stderr)
        sys.exit("flashattn-gpu-bench failed")
    read_tbps, ours = None, {}
    for line in proc.stdout.splitlines():
        r = json.loads(line)
        if "read_tbps" in r:
            read_tbps = r["read_tbps"]
        else:
            ours[(r["batch"], r["seqlen"], r["num_splits"])] = r
    return read_tbps, ours


def time_sdpa(b, s, warmup, iters, l2_bytes):
    """Median ms per backend (None when it refuses), and the GQA mode each ran in."""
    copies = max(1, min(16, -(-4 * l2_bytes // kv_bytes(b, s))))
    q = torch.randn(b, 1, HEADS, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    ks = [torch.randn(b, s, HEADS_K, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(copies)]
    vs = [torch.randn(b, s, HEADS_K, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(copies)]
    result = {}
    free = torch.cuda.mem_get_info()[0]
    for name, backend in BACKENDS:
        ms, mode = None, None
        try:
            with sdpa_kernel(backend):
                ms = median_ms(lambda i: F.scaled_dot_product_attention(
                    q, ks[i % copies], vs[i % copies], enable_gqa=True), warmup, iters)
            mode = "gqa"
        except Exception as e:
            gqa_error = str(e).splitlines()[0][:120]
            # Expanded K/V: 4x the bytes, so one copy only (it exceeds L2 from 2k keys on).
            need = kv_bytes(b, s) * HEADS // HEADS_K
            if need < 0.8 * free:
                try:
                    ke = ks[0].repeat_interleave(HEADS // HEADS_K, dim=1)
                    ve = vs[0].repeat_interleave(HEADS // HEADS_K, dim=1)
                    with sdpa_kernel(backend):
                        ms = median_ms(lambda i: F.scaled_dot_product_attention(q, ke, ve), warmup, iters)
                    mode = "expanded"
                    del ke, ve
                except Exception as e2:
                    print(f"{name} b{b} s{s}: gqa: {gqa_error}; expanded: {str(e2).splitlines()[0][:120]}",
                          file=sys.stderr)
            else:
                print(f"{name} b{b} s{s}: gqa refused ({gqa_error}); expanded K/V would need {need / 2**30:.1f} GiB",
                      file=sys.stderr)
            torch.cuda.empty_cache()
        result[name] = (ms, mode)
    del q, ks, vs
    torch.cuda.empty_cache()
    return result


def time_python_kvcache(b, s, page_size, warmup, iters, l2_bytes):
    """Median ms of flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=...) through the Python API;
    page_size 0: a contiguous (b, s, 8, 128) cache, else paged (num_pages, page_size, 8, 128) with a shuffled
    block_table. K/V sets rotate so that no call finds them in L2."""
    import flashattn

    copies = max(1, min(8, -(-4 * l2_bytes // kv_bytes(b, s))))
    q = torch.randn(b, 1, HEADS, D, device="cuda", dtype=torch.bfloat16)
    seqlens = torch.full((b,), s, dtype=torch.int32, device="cuda")
    sets = []
    for _ in range(copies):
        if page_size == 0:
            k = torch.randn(b, s, HEADS_K, D, device="cuda", dtype=torch.bfloat16)
            sets.append((k, torch.randn_like(k), None))
        else:
            pages = b * (-(-s // page_size))
            k = torch.randn(pages, page_size, HEADS_K, D, device="cuda", dtype=torch.bfloat16)
            table = torch.randperm(pages, device="cuda", dtype=torch.int32).view(b, -1)
            sets.append((k, torch.randn_like(k), table))

    def call(i):
        k, v, table = sets[i % copies]
        flashattn.flash_attn_with_kvcache(q, k, v, cache_seqlens=seqlens, block_table=table)

    ms = median_ms(call, warmup, iters)
    del q, sets
    torch.cuda.empty_cache()
    return ms


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ours", required=True, help="path of flashattn-gpu-bench")
    ap.add_argument("--out", default=".")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--seqlens", default="4096,8192,16384,32768,65536,131072")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--splits-sweep",
                    default="1:32768:8/16/33/66,16:131072:1/2",
                    help="B:S:N1/N2/..[,...]: also time ours at these fixed num_splits for (batch B, keys S)")
    ap.add_argument("--paged-sizes", default="16,256",
                    help="page sizes for the paged-vs-contiguous table through the Python API ('' skips it)")
    ap.add_argument("--name", default="decode")
    ap.add_argument("--baseline", help="also time this flashattn-gpu-bench (built from another commit)")
    args = ap.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.cuda.get_device_name(0)
    props = torch.cuda.get_device_properties(0)
    l2_bytes = getattr(props, "L2_cache_size", 50 << 20)
    total = props.total_memory
    copy = copy_ceiling(args.warmup, args.iters)
    torch_read = torch_read_ceiling(args.warmup, args.iters)

    shapes = []
    for b in map(int, args.batches.split(",")):
        for s in map(int, args.seqlens.split(",")):
            if kv_bytes(b, s) * 1.2 > 0.8 * total:  # ours' K/V (+ rotation) and SDPA's must fit, one at a time
                print(f"skip b{b} s{s}: K/V {kv_bytes(b, s) / 2**30:.1f} GiB", file=sys.stderr)
                continue
            shapes.append((b, s))
    cases = [(b, s, 0) for b, s in shapes]
    for spec in filter(None, args.splits_sweep.split(",")):
        b, s, counts = spec.split(":")
        if (int(b), int(s)) in shapes:
            cases += [(int(b), int(s), int(n)) for n in counts.split("/")]
    read_tbps, ours = run_ours(args.ours, cases, args.warmup, args.iters, 1024)
    base = run_ours(args.baseline, [(b, s, 0) for b, s in shapes], args.warmup, args.iters, 0)[1] if args.baseline else {}

    print(f"device: {dev}; torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}")
    print(f"ceilings: copy (read + write, torch) {copy:.2f} TB/s; read only: streaming kernel {read_tbps:.2f} TB/s, "
          f"torch sum {torch_read:.2f} TB/s")

    rows = []
    for b, s in shapes:
        o = ours[(b, s, 0)]
        row = {"batch": b, "seqlen_k": s, "heads": HEADS, "heads_k": HEADS_K, "head_dim": D,
               "bytes": io_bytes(b, s), "ours_ms": o["ms"], "ours_tbps": o["tbps"]}
        if base:
            row["baseline_tbps"] = base[(b, s, 0)]["tbps"]
        for name, (ms, mode) in time_sdpa(b, s, args.warmup, args.iters, l2_bytes).items():
            row[f"{name}_ms"] = ms
            row[f"{name}_mode"] = mode
            row[f"{name}_tbps"] = io_bytes(b, s) / (ms * 1e-3) / 1e12 if ms else None
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)

    def fmt(x, p=2):
        return "—" if x is None else f"{x:.{p}f}"

    def mode(r, name):
        return "" if r[f"{name}_mode"] in (None, "gqa") else " (exp.)"

    lines = [
        f"Device: {dev}; torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}. Ceilings: copy "
        f"(read + write) {copy:.2f} TB/s, read-only {read_tbps:.2f} TB/s (streaming kernel; torch sum "
        f"{torch_read:.2f}).",
        f"Decode: 1 query token, {HEADS} query heads / {HEADS_K} KV heads, d {D}, bf16; TB/s = (K + V + Q + O bytes) "
        "/ median time. SDPA with enable_gqa=True; (exp.) = that backend refused it and ran on K/V "
        "expanded to 32 heads (it then reads 4x the bytes; the TB/s still counts the 8-head bytes).",
        "",
        "| batch | keys | K+V MiB | ours TB/s | SDPA flash | cuDNN | efficient | ours/flash | ours/cuDNN | ours/eff. | ours µs |"
        + (" baseline TB/s | ours/baseline |" if base else ""),
        "|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if base else ""),
    ]
    for r in rows:
        ratio = {n: (r["ours_tbps"] / r[f"{n}_tbps"] if r[f"{n}_tbps"] else None) for n, _ in BACKENDS}
        lines.append(
            f"| {r['batch']} | {r['seqlen_k'] // 1024}k | {kv_bytes(r['batch'], r['seqlen_k']) / 2**20:.0f} | "
            f"**{fmt(r['ours_tbps'])}** | {fmt(r['flash_tbps'])}{mode(r, 'flash')} | "
            f"{fmt(r['cudnn_tbps'])}{mode(r, 'cudnn')} | {fmt(r['efficient_tbps'])}{mode(r, 'efficient')} | "
            f"{fmt(ratio['flash'])} | {fmt(ratio['cudnn'])} | {fmt(ratio['efficient'])} | {r['ours_ms'] * 1e3:.1f} |"
            + (f" {fmt(r['baseline_tbps'])} | {fmt(r['ours_tbps'] / r['baseline_tbps'])} |" if base else ""))
    sweep_rows = [ours[k] for k in sorted(ours) if k[2] != 0]
    if sweep_rows:
        lines += ["", "ours at fixed num_splits (0 = the heuristic, in the table above):", "",
                  "| batch | keys | num_splits | TB/s | µs |", "|---|---|---|---|---|"]
        for r in sweep_rows:
            lines.append(f"| {r['batch']} | {r['seqlen'] // 1024}k | {r['num_splits']} | {r['tbps']:.2f} | "
                         f"{r['ms'] * 1e3:.1f} |")
    paged_sizes = [int(x) for x in args.paged_sizes.split(",") if x]
    paged_rows = []
    if paged_sizes:
        lines += ["", "Through the Python API (flash_attn_with_kvcache, cache_seqlens tensor): contiguous cache vs "
                  "paged (block_table, shuffled pages); TB/s as above, ratio = paged / contiguous time⁻¹.", "",
                  "| batch | keys | contiguous TB/s (µs) | " + " | ".join(f"page {p} TB/s (µs), ratio" for p in paged_sizes)
                  + " |", "|---|---|---|" + "---|" * len(paged_sizes)]
        for b, s in shapes:
            contiguous = time_python_kvcache(b, s, 0, args.warmup, args.iters, l2_bytes)
            row = {"batch": b, "seqlen_k": s, "contiguous_ms": contiguous}
            cells = []
            for p in paged_sizes:
                ms = time_python_kvcache(b, s, p, args.warmup, args.iters, l2_bytes)
                row[f"page{p}_ms"] = ms
                cells.append(f"{io_bytes(b, s) / (ms * 1e-3) / 1e12:.2f} ({ms * 1e3:.1f}), {contiguous / ms:.2f}")
            paged_rows.append(row)
            lines.append(f"| {b} | {s // 1024}k | {io_bytes(b, s) / (contiguous * 1e-3) / 1e12:.2f} "
                         f"({contiguous * 1e3:.1f}) | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    (out / f"{args.name}.md").write_text(table + "\n")
    (out / f"{args.name}.json").write_text(json.dumps(
        {"device": dev, "torch": torch.__version__, "cudnn": torch.backends.cudnn.version(),
         "copy_tbps": copy, "read_tbps": read_tbps, "torch_sum_read_tbps": torch_read, "rows": rows,
         "ours_all": list(ours.values()), "python_paged": paged_rows}, indent=1))


if __name__ == "__main__":
    main()
