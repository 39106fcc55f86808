"""The torch.ops.flashattn operators under torch's tooling: opcheck (schema, fake, autograd registration),
torch.compile(fullgraph=True) with zero graph breaks (torch._dynamo.explain), and on CUDA: no host
synchronisation in the forward, CUDA-graph capture and replay, compile with CUDA graphs.

FLASHATTN_EXPLAIN_LOG=path appends the explain() reports to that file (the device run keeps them)."""

import os

import pytest

torch = pytest.importorskip("torch")

import flashattn  # noqa: E402
from torch_reference import devices, grads, max_err  # noqa: E402

CUDA = "cuda" in devices()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA build and GPU")


def dtype_for(device):
    return torch.float32 if device == "cpu" else torch.bfloat16


def backend_for(device):
    # inductor on CUDA (what users run); aot_eager on the CPU keeps the suite fast on small machines
    # (same dynamo graph and AOT autograd tracing of our fake implementations, no C++ codegen).
    return "inductor" if device == "cuda" else "aot_eager"


def log_explain(title, explanation):
    path = os.environ.get("FLASHATTN_EXPLAIN_LOG")
    if path:
        with open(path, "a") as f:  # the summary and the ops of each graph; the guards are left out
            f.write(f"==== {title}\n{str(explanation).split('Out Guards:')[0]}\n")


class Block(torch.nn.Module):
    """A GQA attention block: qkv projection, flashattn (flash_attn_func and the SDPA entry), output projection."""

    def __init__(self, dim=256, heads=4, heads_k=2, head_dim=64):
        super().__init__()
        self.heads, self.heads_k, self.head_dim = heads, heads_k, head_dim
        self.qkv = torch.nn.Linear(dim, (heads + 2 * heads_k) * head_dim)
        self.out = torch.nn.Linear(heads * head_dim, dim)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).split([self.heads * self.head_dim, self.heads_k * self.head_dim,
                                     self.heads_k * self.head_dim], dim=-1)
        q = q.view(b, n, self.heads, self.head_dim)
        k = k.view(b, n, self.heads_k, self.head_dim)
        v = v.view(b, n, self.heads_k, self.head_dim)
        a = flashattn.flash_attn_func(q, k, v, causal=True)
        s = flashattn.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                   is_causal=True, enable_gqa=True)
        return self.out((a + s.transpose(1, 2)).reshape(b, n, -1))


def decode_step(q, k_cache, v_cache, k_new, v_new, cache_seqlens):
    return flashattn.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=cache_seqlens,
                                             causal=True)


# ---- opcheck -------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", devices())
def test_opcheck(device):
    dtype = dtype_for(device)
    make = lambda *s, g=True: torch.randn(*s, device=device, dtype=dtype, requires_grad=g)  # noqa: E731
    q, k, v = make(2, 9, 4, 64), make(2, 11, 2, 64), make(2, 11, 2, 64)
    opts = (None, True, -1, -1, 0.0, None, None, False, 0)
    tests = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(torch.ops.flashattn.fwd.default, (q, k, v, *opts), test_utils=tests)
    sinks = torch.randn(4, device=device, dtype=torch.float32, requires_grad=True)  # attention sinks, differentiable
    torch.library.opcheck(torch.ops.flashattn.fwd.default, (q, k, v, None, True, -1, -1, 0.0, None, sinks, False, 0),
                          test_utils=tests)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32, device=device)
    qv, kv, vv = make(9, 4, 64), make(9, 2, 64), make(9, 2, 64)
    torch.library.opcheck(torch.ops.flashattn.varlen_fwd.default, (qv, kv, vv, cu, cu, 5, 5, *opts), test_utils=tests)
    seqlens = torch.tensor([3, 11], dtype=torch.int32, device=device)
    torch.library.opcheck(torch.ops.flashattn.fwd_kvcache.default,
                          (q.detach(), k.detach(), v.detach(), seqlens, None, True, -1, -1, 0.0, None, None, 0))
    # the full kvcache operator mutates the caches (the append): its schema says so
    k_cache, v_cache = torch.zeros(2, 16, 2, 64, device=device, dtype=dtype), torch.zeros(2, 16, 2, 64, device=device,
                                                                                           dtype=dtype)
    new = torch.randn(2, 3, 2, 64, device=device, dtype=dtype)
    table_free = (None, None, None, None, None, True, None, True, -1, -1, 0.0, None, None, 0)
    torch.library.opcheck(torch.ops.flashattn.fwd_kvcache_full.default,
                          (q.detach(), k_cache, v_cache, new, new.clone(), seqlens.clamp(max=13)) + table_free,
                          test_utils=("test_schema", "test_faketensor"))
    out, lse = torch.ops.flashattn.fwd(q, k, v, *opts)
    # not differentiable itself (no double backward): schema and fake implementation only
    torch.library.opcheck(torch.ops.flashattn.bwd.default,
                          (torch.randn_like(out), q, k, v, out, lse, None, True, -1, -1, 0.0, None, None, False),
                          test_utils=("test_schema", "test_faketensor"))


# ---- routing: plain eager calls the kernel, anything that watches the dispatcher sees the operators --

@pytest.mark.parametrize("device", devices())
def test_modes_and_tracing_see_the_operators(device):
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    dtype = dtype_for(device)
    q, k, v = (torch.randn(2, 9, h, 64, device=device, dtype=dtype) for h in (4, 2, 2))
    eager = flashattn.flash_attn_func(q, k, v, causal=True)
    via_op, _ = torch.ops.flashattn.fwd_kvcache(q, k, v, None, None, True, -1, -1, 0.0, None, None, 0)
    assert torch.equal(eager, via_op)  # the same kernel either way
    with Record() as record:
        flashattn.flash_attn_func(q, k, v, causal=True)
        flashattn.flash_attn_with_kvcache(q, k, v, cache_seqlens=5)
    assert record.ops.count("flashattn.fwd_kvcache.default") == 2, record.ops
    graph = torch.fx.experimental.proxy_tensor.make_fx(lambda a, b, c: flashattn.flash_attn_func(a, b, c))(q, k, v)
    assert "flashattn.fwd_kvcache" in str(graph.code)
    qg = q.clone().requires_grad_()
    with Record() as record:
        out = flashattn.flash_attn_func(qg, k, v, causal=True)
    assert "flashattn.fwd.default" in record.ops, record.ops
    # register_autograd's route and the eager autograd.Function give the same gradients
    dout = torch.randn_like(out)
    (through_op,) = grads(out, (qg,), dout)
    (eager_grad,) = grads(flashattn.flash_attn_func(qg, k, v, causal=True), (qg,), dout)
    assert torch.equal(through_op, eager_grad)


# ---- torch.compile -------------------------------------------------------------------------------

@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("grad", [False, True])
def test_compile_block_fullgraph(device, grad):
    torch.manual_seed(0)
    torch._dynamo.reset()
    dtype = dtype_for(device)
    block = Block().to(device=device, dtype=dtype)
    x = torch.randn(2, 70, 256, device=device, dtype=dtype, requires_grad=grad)
    with torch.set_grad_enabled(grad):
        explanation = torch._dynamo.explain(block)(x)
    log_explain(f"Block on {device}, grad={grad}", explanation)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, str(explanation)
    ops = {str(n.target) for g in explanation.graphs for n in g.graph.nodes if n.op == "call_function"}
    assert any("flashattn" in op for op in ops), ops

    compiled = torch.compile(block, fullgraph=True, backend=backend_for(device))
    with torch.set_grad_enabled(grad):
        eager, ours = block(x), compiled(x)
    assert max_err(ours, eager) <= (1e-5 if dtype == torch.float32 else 2e-2)
    if grad:
        (g_eager,) = torch.autograd.grad(eager.square().sum(), x)
        (g_ours,) = torch.autograd.grad(ours.square().sum(), x)
        assert max_err(g_ours, g_eager) <= (1e-4 if dtype == torch.float32 else 5e-2) * g_eager.abs().max().item()


@pytest.mark.parametrize("device", devices())
def test_compile_decode_step_fullgraph(device):
    torch._dynamo.reset()
    dtype = dtype_for(device)
    q = torch.randn(3, 1, 8, 64, device=device, dtype=dtype)
    k_cache = torch.randn(3, 64, 2, 64, device=device, dtype=dtype)
    v_cache = torch.randn(3, 64, 2, 64, device=device, dtype=dtype)
    k_new = torch.randn(3, 1, 2, 64, device=device, dtype=dtype)
    v_new = torch.randn(3, 1, 2, 64, device=device, dtype=dtype)
    seqlens = torch.tensor([5, 40, 63], dtype=torch.int32, device=device)
    explanation = torch._dynamo.explain(decode_step)(q, k_cache.clone(), v_cache.clone(), k_new, v_new, seqlens)
    log_explain(f"decode step (kv cache, per-sequence lengths) on {device}", explanation)
    assert explanation.graph_break_count == 0, str(explanation)
    kc, vc = k_cache.clone(), v_cache.clone()
    eager = decode_step(q, kc, vc, k_new, v_new, seqlens)
    kc2, vc2 = k_cache.clone(), v_cache.clone()
    ours = torch.compile(decode_step, fullgraph=True, backend=backend_for(device))(q, kc2, vc2, k_new, v_new, seqlens)
    assert torch.equal(kc2, kc) and torch.equal(vc2, vc)  # the in-place append happened under compile too
    assert max_err(ours, eager) <= (1e-6 if dtype == torch.float32 else 1e-2)


# ---- CUDA: no host synchronisation, CUDA graphs --------------------------------------------------

@needs_cuda
def test_forward_never_synchronises():
    q = torch.randn(2, 33, 8, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(2, 70, 2, 64, device="cuda", dtype=torch.bfloat16)
    cu = torch.tensor([0, 30, 66], dtype=torch.int32, device="cuda")
    seqlens = torch.tensor([3, 60], dtype=torch.int32, device="cuda")
    k_cache, new = k.clone(), torch.randn(2, 1, 2, 64, device="cuda", dtype=torch.bfloat16)
    flashattn.flash_attn_func(q, k, k, causal=True)  # first calls: CUDA context, smem opt-in
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronising torch call raises
    try:
        flashattn.flash_attn_func(q, k, k, causal=True)
        flashattn.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), k.transpose(1, 2),
                                               is_causal=True, enable_gqa=True)
        flashattn.flash_attn_varlen_func(q.flatten(0, 1)[:66], k.flatten(0, 1)[:66], k.flatten(0, 1)[:66], cu, cu,
                                         36, 36, causal=True)
        flashattn.flash_attn_with_kvcache(q[:, :1], k_cache, k_cache.clone(), new, new, cache_seqlens=seqlens)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@needs_cuda
def test_cuda_graph_capture_and_replay():
    torch.manual_seed(1)
    dt = torch.bfloat16
    q = torch.randn(2, 100, 8, 128, device="cuda", dtype=dt)
    k = torch.randn(2, 300, 2, 128, device="cuda", dtype=dt)
    v = torch.randn(2, 300, 2, 128, device="cuda", dtype=dt)
    # a decode step: append one token at per-sequence positions, attend over each cache
    k_cache = torch.randn(2, 256, 2, 128, device="cuda", dtype=dt)
    v_cache = torch.randn(2, 256, 2, 128, device="cuda", dtype=dt)
    qd, kn, vn = (torch.randn(2, 1, h, 128, device="cuda", dtype=dt) for h in (8, 2, 2))
    seqlens = torch.tensor([10, 200], dtype=torch.int32, device="cuda")

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up off the capture
        for _ in range(2):
            flashattn.flash_attn_func(q, k, v, causal=True)
            decode_step(qd, k_cache.clone(), v_cache.clone(), kn, vn, seqlens)
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = flashattn.flash_attn_func(q, k, v, causal=True)
        out_d = decode_step(qd, k_cache, v_cache, kn, vn, seqlens)
    for step in range(3):  # new inputs in place, replay, compare with eager on copies
        q.copy_(torch.randn_like(q))
        qd.copy_(torch.randn_like(qd))
        kn.copy_(torch.randn_like(kn))
        kc_before, vc_before = k_cache.clone(), v_cache.clone()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, flashattn.flash_attn_func(q, k, v, causal=True))
        kc, vc = kc_before.clone(), vc_before.clone()
        expect = decode_step(qd, kc, vc, kn, vn, seqlens)
        assert torch.equal(out_d, expect) and torch.equal(k_cache, kc), f"replay {step}"
        seqlens += 1  # the captured graph reads the lengths on the device


@needs_cuda
def test_compile_with_cuda_graphs():
    torch._dynamo.reset()
    block = Block().cuda().to(torch.bfloat16)
    x = torch.randn(2, 64, 256, device="cuda", dtype=torch.bfloat16)
    compiled = torch.compile(block, fullgraph=True, mode="reduce-overhead")
    with torch.no_grad():
        eager = block(x)
        for _ in range(3):  # record, then replay
            ours = compiled(x)
        torch.cuda.synchronize()
    assert max_err(ours, eager) <= 2e-2
