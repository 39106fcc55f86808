"""What the Python layer adds to a decode step on the GPU.

Problem: batch 1, 1 query token, 4096 keys, 32 query heads over 8 KV heads, head dim 128, bf16 (the
decode shape of the project's benchmarks). Host time per call, the GPU queue never full (100 calls
between synchronisations, far under the launch queue's depth), median of 30 rounds:

- C++ launch:  flashattn::forward called in a C++ loop on views made once (flashattn._C.time_forward),
  also with a (batch,) seqused_k (the kv-cache call with per-sequence lengths);
- binding only: flashattn._C.forward_eager (the eager path's entry) from Python on preallocated outputs, as
  flashattn calls it: the tensors themselves where torch has DLPack's C exchange API, else fresh DLPack
  capsules (an older build without it: flashattn._C.forward, capsules through nanobind);
- flash_attn_func(q, k, v)                       eager, no input needs a gradient (no LSE is allocated);
- the same with return_attn_probs=True           (out and LSE allocated);
- flash_attn_with_kvcache(q, k_cache, v_cache)   eager, without and with cache_seqlens (a tensor);
- torch.ops.flashattn.fwd_kvcache: the operator route that tracing and dispatch modes take;
- flash_attn_func(q, k, v) with inputs requiring grad (eager training route) and the autograd operator
  torch.ops.flashattn.fwd (what torch.compile's AOT autograd uses: register_autograd);
- torch SDPA on the same tensors, for scale.

The paths are timed interleaved (one batch of each per round) so that drift of a shared host hits all alike.

"added" = a Python path's time minus the C++ launch of the same call. Also the GPU time per call (CUDA
events) for context. Prints a table and, with --json PATH, writes the numbers.

    python python/examples/overhead.py [--json out.json]
    python python/examples/overhead.py --device cpu --keys 16   # the CPU proxy: one OpenMP thread, so
                                                                 # the kernel's own time stays small
"""

import argparse
import json
import os
import statistics
import sys
import time


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--keys", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--device", default="cuda", help="cpu: the proxy on the host's CPU (fp32)")
    return parser.parse_args()


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None and ARGS.device == "cpu":
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # before any OpenMP runtime starts

import torch  # noqa: E402

import flashattn  # noqa: E402
from flashattn import _C  # noqa: E402


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def host_us_per_call(fn, calls=100):
    for _ in range(20):
        fn()
    sync()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    took = (time.perf_counter() - start) / calls * 1e6
    sync()
    return took


def gpu_us_per_call(fn, calls=200):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / calls


def main(args):
    torch.manual_seed(0)
    dev, dt = args.device, torch.bfloat16 if args.device == "cuda" else torch.float32
    q = torch.randn(1, 1, 32, 128, device=dev, dtype=dt)
    k = torch.randn(1, args.keys, 8, 128, device=dev, dtype=dt)
    v = torch.randn(1, args.keys, 8, 128, device=dev, dtype=dt)
    seqlens = torch.full((1,), args.keys, dtype=torch.int32, device=dev)
    out = torch.empty_like(q)
    lse = torch.empty(1, 32, 1, device=dev, dtype=torch.float32)
    stream = torch.cuda.current_stream().cuda_stream if dev == "cuda" else 0
    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
    qs, ks, vs = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def cpp(**extra):  # 100 launches timed inside C++, as host_us_per_call times 100 Python calls
        sync()
        took = _C.time_forward(q, k, v, out, lse, 100, stream=stream, **extra)
        sync()
        return took

    baselines = {"C++ launch (fa::forward)": lambda: cpp(),
                 "C++ launch, seqused_k": lambda: cpp(seqused_k=seqlens)}
    try:
        cpp(seqused_k=seqlens)
    except TypeError:  # an older build (before/after comparisons): no seqused_k in the binding
        baselines["C++ launch, seqused_k"] = lambda: cpp()
    cap = torch._C._to_dlpack
    opts = (None, False, -1, -1, 0.0, None, None)  # the operators' options: scale .. alibi_slopes, sinks
    plain, used = baselines
    if hasattr(_C, "forward_eager") and _C.has_exchange_api(torch.Tensor):
        binding = ("binding only (_C.forward_eager)",
                   lambda: _C.forward_eager(q, k, v, out, lse, None, None, None, False, -1, -1, 0.0, False, 0, None))
    elif hasattr(_C, "forward_eager"):
        binding = ("binding only (_C.forward_eager, capsules)",
                   lambda: _C.forward_eager(cap(q), cap(k), cap(v), cap(out), cap(lse), None, None, None, False, -1,
                                            -1, 0.0, False, 0, stream))
    else:  # an older build (before/after comparisons)
        binding = ("binding only (_C.forward, capsules)",
                   lambda: _C.forward(cap(q), cap(k), cap(v), cap(out), cap(lse), None, False, -1, -1, 0.0, None,
                                      False, 0, 0, stream))
    paths = {  # name: (call, the C++ launch it adds to)
        binding[0]: (binding[1], plain),
        "flash_attn_func (no grad)": (lambda: flashattn.flash_attn_func(q, k, v), plain),
        "flash_attn_func (no grad, with LSE)": (lambda: flashattn.flash_attn_func(q, k, v, return_attn_probs=True),
                                                plain),
        "flash_attn_with_kvcache": (lambda: flashattn.flash_attn_with_kvcache(q, k, v), plain),
        "flash_attn_with_kvcache (seqlens)": (lambda: flashattn.flash_attn_with_kvcache(q, k, v,
                                                                                        cache_seqlens=seqlens),
                                              used),
        "op fwd_kvcache (traced route)": (lambda: torch.ops.flashattn.fwd_kvcache.default(q, k, v, None, *opts, 0),
                                          plain),
        "flash_attn_func (grad, eager)": (lambda: flashattn.flash_attn_func(qg, kg, vg), plain),
        "op fwd (grad, register_autograd)": (lambda: torch.ops.flashattn.fwd.default(qg, kg, vg, *opts, False, 0),
                                             plain),
        "torch SDPA (peer, GQA)": (lambda: torch.nn.functional.scaled_dot_product_attention(qs, ks, vs,
                                                                                            enable_gqa=True), plain),
    }
    base_samples = {name: [] for name in baselines}
    samples = {name: [] for name in paths}
    for _ in range(3):  # warm up
        for fn in baselines.values():
            fn()
    for _ in range(args.rounds):
        for name, fn in baselines.items():
            base_samples[name].append(fn())
        for name, (fn, _) in paths.items():
            samples[name].append(host_us_per_call(fn))
    device = torch.cuda.get_device_name() if dev == "cuda" else f"cpu (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')})"
    gpu = gpu_us_per_call(lambda: _C.forward(q, k, v, out, lse, stream=stream)) if dev == "cuda" else None
    results = {"problem": f"b1 sq1 sk{args.keys} h32/8 d128 {str(dt)[6:]}", "device": device,
               "flashattn": flashattn.__version__, "torch": torch.__version__, "python": sys.version.split()[0],
               "gpu_kernel_us": gpu, "cpp_launch_us": {}, "paths": {}}
    print(f"{results['problem']} on {device}; GPU time per call: {gpu and round(gpu, 1)} us")
    print(f"{'path':38s} {'host us/call':>12s} {'min':>7s} {'added':>7s}  (median of {args.rounds} rounds)")
    for name, values in base_samples.items():
        median, best = statistics.median(values), min(values)
        results["cpp_launch_us"][name] = {"median": median, "min": best}
        print(f"{name:38s} {median:12.2f} {best:7.2f} {'':>7s}")
    for name, values in samples.items():
        median, best = statistics.median(values), min(values)
        base = results["cpp_launch_us"][paths[name][1]]["median"]
        results["paths"][name] = {"median": median, "min": best, "added_median": median - base,
                                  "over": paths[name][1]}
        print(f"{name:38s} {median:12.2f} {best:7.2f} {median - base:7.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(ARGS)
