"""flashattn's operators in torch's dispatcher, namespace ``flashattn``.

    torch.ops.flashattn.fwd          (q, k, v, ...) -> (out, softmax_lse)           autograd: bwd
    torch.ops.flashattn.bwd          (dout, q, k, v, out, softmax_lse, ...) -> (dq, dk, dv)
    torch.ops.flashattn.varlen_fwd   packed sequences + cu_seqlens                   autograd: varlen_bwd
    torch.ops.flashattn.varlen_bwd
    torch.ops.flashattn.fwd_kvcache  (q, k_cache, v_cache, cache_seqlens?, ...)     inference only: also
                                     flash_attn_func's operator when no input needs a gradient

Each has a fake (meta) implementation, so torch.compile traces through them without a graph break,
and the forward ones have their backward registered with torch.library.register_autograd. The
kernels run on the caller's current CUDA stream and nothing here reads a device value on the host:
the forward is CUDA-graph capturable.

Routing of the flash_attn functions (forward()/varlen_forward()/kvcache() below). Under tracing
(torch.compile, export, make_fx), with a dispatch or function mode active, with tensor subclasses or
functorch transforms: the operators (fwd/varlen_fwd when an input needs a gradient, else fwd_kvcache).
In plain eager with plain tensors: the same kernel functions, called directly (under one
torch.autograd.Function when a gradient is wanted). Same computation, minus two Python costs measured
on the development machine: the dispatcher's round trip through a Python kernel (boxing 11 arguments
into IValues and back, ~3 us, a third of a decode step's budget) and register_autograd's generic
wrapper, whose fill_defaults rebuilds the schema's argument list once per argument on every call
(~60 us a call for these 11-argument schemas).

Registered with torch.library.Library.define/impl rather than the torch.library.custom_op decorator:
same dispatcher entries (schema with the pt2_compliant tag, CPU and CUDA kernels, fake, autograd),
but custom_op wraps every eager call in extra Python layers (a dynamo-disabled wrapper and an
output aliasing check) that cost about 5 microseconds a call, half the overhead budget of a decode
step (python/examples/overhead.py measures it).

The tensors reach the extension as views, no copies. The eager forward (the decode step's hot path)
goes through ``_C.forward_eager``: positional arguments, and the tensors themselves where torch has
DLPack's C exchange API (torch >= 2.10: the extension reads each tensor's DLTensor and the current
CUDA stream in C), else DLPack capsules made by torch's C++ exporter (~0.2 us a tensor; the
Python-level ``Tensor.__dlpack__`` costs ~2 us). Without an LSE and in the usual layout,
``_C.forward_eager_out`` also makes the layout tests and calls ``torch.empty_like(q)`` in C. The
other entries take capsules through nanobind.
"""

from __future__ import annotations

import torch

from . import _C
from ._checks import error

_lib = torch.library.Library("flashattn", "DEF")
_TAGS = (torch.Tag.pt2_compliant_tag,)
_DEVICES = ("CPU", "CUDA")

# ---- handing tensors to the extension ------------------------------------------------------------

_to_dlpack = getattr(torch._C, "_to_dlpack", None)
if _to_dlpack is None:  # a torch without the private exporter: the public protocol's capsule
    def _to_dlpack(t):
        return t.detach().__dlpack__()  # __dlpack__ refuses tensors that require grad

_forward_eager, _forward_eager_out = _C.forward_eager, _C.forward_eager_out
_EXCHANGE_API = _C.has_exchange_api(torch.Tensor)  # forward_eager takes tensors (else capsules)
_empty_like = torch.empty_like
_CONTIGUOUS = torch.contiguous_format
_F32, _I32 = torch.float32, torch.int32

# The current CUDA stream of a device index as an integer handle (torch's C++ getter: ~0.1 us, where
# torch.cuda.current_stream builds a Stream object). Only called for CUDA tensors.
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)
if _raw_stream is None:
    def _raw_stream(device_index):
        return torch.cuda.current_stream(device_index).cuda_stream


def _stream(t):
    """The current CUDA stream of t's device as an integer handle (0 on the CPU)."""
    return _raw_stream(t.get_device()) if t.is_cuda else 0


def _dense_last(t):
    """The kernels need a contiguous last dim; every other stride may be anything. (A size-1 last dim
    keeps its stride through contiguous(), and the C++ check accepts it.)"""
    return t if t.stride(-1) == 1 else t.contiguous()


def _capsule(t):
    return None if t is None else _to_dlpack(t)


def _need_rank(t, name, rank, layout):
    if t.dim() != rank:
        raise error(name, f"rank {rank} {layout}", f"rank {t.dim()} {list(t.shape)}")


def _empty_out(q, v):
    """A row-major tensor like q with v's head dim (empty_like is the cheapest allocation in eager)."""
    if v.shape[-1] == q.shape[-1]:
        return _empty_like(q, memory_format=_CONTIGUOUS)
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def _lse(q):
    _need_rank(q, "q", 4, "(batch, seqlen_q, heads, head_dim)")
    return q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=_F32)


def _varlen_lse(q):
    _need_rank(q, "q", 3, "(total_q, heads, head_dim)")
    return q.new_empty((q.shape[1], q.shape[0]), dtype=_F32)


# Output allocation, shared by the kernels and the fake implementations so that both give the same
# shapes, dtypes and strides.
def _fwd_outputs(q, v):
    return _empty_out(q, v), _lse(q)


def _varlen_outputs(q, v):
    return _empty_out(q, v), _varlen_lse(q)


def _grads(q, k, v):
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty(k.shape, dtype=k.dtype, device=k.device),
            torch.empty(v.shape, dtype=v.dtype, device=v.device))


def _define(schema, kernel, fake):
    name = schema.split("(", 1)[0]
    _lib.define(schema, tags=_TAGS)
    for device in _DEVICES:
        _lib.impl(name, kernel, device)
    torch.library.register_fake(f"flashattn::{name}", fake, lib=_lib)
    return getattr(torch.ops.flashattn, name).default


_OPTIONS = ("float? softmax_scale, bool causal, int window_left, int window_right, float softcap, Tensor? alibi_slopes, "
            "Tensor? sinks")

# ---- the forward calls themselves (operator kernels and the eager route) -------------------------


def _run_forward(q, k, v, softmax_scale, causal, window_left, window_right, softcap, alibi_slopes, sinks,
                 deterministic, num_splits, seqused_k, want_lse):
    """Dense batches: (out, lse), lse None when not wanted (the C++ forward then skips it: one
    allocation less per call). seqused_k: int32 (batch) keys used per sequence, or None.
    The decode step's hot path: every line here is host time added to each call."""
    if _EXCHANGE_API and not want_lse:  # the usual layout: tested, allocated and run in C (~0.3 us less)
        out = _forward_eager_out(_empty_like, q, k, v, seqused_k, alibi_slopes, softmax_scale, causal, window_left,
                                 window_right, softcap, deterministic, num_splits, sinks)
        if out is not NotImplemented:
            return out, None
    if q.is_contiguous() and k.is_contiguous() and v.is_contiguous():  # one cheap test for the usual case
        # empty_like keeps a contiguous q's layout and is torch's cheapest allocation in eager
        out = _empty_like(q) if v.shape[-1] == q.shape[-1] else _empty_out(q, v)
    else:
        q, k, v = _dense_last(q), _dense_last(k), _dense_last(v)
        out = _empty_out(q, v)
    lse = _lse(q) if want_lse else None
    if _EXCHANGE_API:  # stream None: q's current CUDA stream, asked of torch in C
        _forward_eager(q, k, v, out, lse, seqused_k, alibi_slopes, softmax_scale, causal, window_left, window_right,
                       softcap, deterministic, num_splits, None, sinks)
    else:
        _forward_eager(_to_dlpack(q), _to_dlpack(k), _to_dlpack(v), _to_dlpack(out),
                       None if lse is None else _to_dlpack(lse),
                       None if seqused_k is None else _to_dlpack(seqused_k),
                       None if alibi_slopes is None else _to_dlpack(alibi_slopes),
                       softmax_scale, causal, window_left, window_right, softcap, deterministic, num_splits,
                       _raw_stream(q.get_device()) if q.is_cuda else 0, _capsule(sinks))
    return out, lse


def _run_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_left,
                window_right, softcap, alibi_slopes, sinks, deterministic, num_splits, want_lse, seqused_k=None,
                page_table=None, seqused_q=None, zero_out=False):
    """Packed sequences: (out, lse), lse None when not wanted. page_table: k/v are paged caches."""
    q, k, v = _dense_last(q), _dense_last(k), _dense_last(v)
    out = _empty_out(q, v)
    lse = _varlen_lse(q) if want_lse else None
    if zero_out and seqused_q is not None:  # rows past seqused_q are not written by the kernels
        out.zero_()
        if lse is not None:
            lse.fill_(float("-inf"))
    _C.forward_varlen(_to_dlpack(q), _to_dlpack(k), _to_dlpack(v), _to_dlpack(out),
                      None if lse is None else _to_dlpack(lse), _to_dlpack(cu_seqlens_q), _to_dlpack(cu_seqlens_k),
                      max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_left, window_right, softcap,
                      _capsule(alibi_slopes), deterministic, 0, num_splits, _stream(q), _capsule(seqused_k),
                      _capsule(sinks), _capsule(page_table), _capsule(seqused_q))
    return out, lse


# ---- dense batches -------------------------------------------------------------------------------


def _fwd_kernel(q, k, v, softmax_scale, causal, window_left, window_right, softcap, alibi_slopes, sinks,
                deterministic, num_splits):
    return _run_forward(q, k, v, softmax_scale, causal, window_left, window_right, softcap, alibi_slopes, sinks,
                        deterministic, num_splits, None, True)


def _fwd_fake(q, k, v, *options):
    return _fwd_outputs(q, v)


fwd = _define(f"fwd(Tensor q, Tensor k, Tensor v, {_OPTIONS}, bool deterministic, int num_splits) "
              "-> (Tensor output, Tensor softmax_lse)", _fwd_kernel, _fwd_fake)


def _bwd_kernel(dout, q, k, v, out, lse, softmax_scale, causal, window_left, window_right, softcap, alibi_slopes,
                sinks, deterministic):
    dout, q, k, v, out = (_dense_last(t) for t in (dout, q, k, v, out))
    dq, dk, dv = _grads(q, k, v)
    _C.backward(_to_dlpack(dout), _to_dlpack(q), _to_dlpack(k), _to_dlpack(v), _to_dlpack(out), _to_dlpack(lse),
                _to_dlpack(dq), _to_dlpack(dk), _to_dlpack(dv), softmax_scale, causal, window_left, window_right,
                softcap, _capsule(alibi_slopes), deterministic, 0, 0, _stream(q), _capsule(sinks))
    return dq, dk, dv


def _sink_grad(dout, out, lse, sinks, cu_seqlens_q=None, max_seqlen_q=0):
    """d loss / d sinks (fp32, then the sinks' dtype), from the forward's out and LSE (core/sink.h)."""
    dout = _dense_last(dout)
    dsinks = torch.empty(sinks.shape, dtype=_F32, device=sinks.device)
    _C.sink_gradient(_to_dlpack(dout), _to_dlpack(out), _to_dlpack(lse), _to_dlpack(_fp32_sinks(sinks)),
                     _to_dlpack(dsinks), _capsule(cu_seqlens_q), max_seqlen_q, 0, _stream(out))
    return dsinks.to(sinks.dtype)


def _fp32_sinks(sinks):
    """The kernels take fp32 contiguous sinks (other float dtypes are converted, as flash-attn-4 allows)."""
    if sinks is None or (sinks.dtype is _F32 and sinks.is_contiguous()):
        return sinks
    if not sinks.is_floating_point():
        raise error("sinks", "a floating-point tensor (one logit per head, fp32)", str(sinks.dtype))
    return sinks.detach().to(_F32).contiguous()


def _bwd_fake(dout, q, k, v, *rest):
    return _grads(q, k, v)


bwd = _define(f"bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor output, Tensor softmax_lse, {_OPTIONS}, "
              "bool deterministic) -> (Tensor dq, Tensor dk, Tensor dv)", _bwd_kernel, _bwd_fake)


def _fwd_setup(ctx, inputs, output):
    q, k, v, softmax_scale, causal, window_left, window_right, softcap, alibi_slopes, sinks, deterministic, _ = inputs
    ctx.save_for_backward(q, k, v, *output, alibi_slopes, sinks)
    ctx.options = (softmax_scale, causal, window_left, window_right, softcap)
    ctx.deterministic = deterministic


def _fwd_backward(ctx, dout, _dlse):
    # The LSE output is not differentiable (as in flash_attn): its gradient is ignored.
    q, k, v, out, lse, alibi_slopes, sinks = ctx.saved_tensors
    dq, dk, dv = bwd(dout, q, k, v, out, lse, *ctx.options, alibi_slopes, sinks, ctx.deterministic)
    dsinks = sink_bwd(dout, out, lse, sinks) if sinks is not None and ctx.needs_input_grad[9] else None
    return dq, dk, dv, None, None, None, None, None, None, dsinks, None, None


def _sink_bwd_kernel(dout, out, lse, sinks):
    return _sink_grad(dout, out, lse, sinks)


def _sink_bwd_fake(dout, out, lse, sinks):
    return torch.empty(sinks.shape, dtype=sinks.dtype, device=sinks.device)


sink_bwd = _define("sink_bwd(Tensor dout, Tensor output, Tensor softmax_lse, Tensor sinks) -> Tensor",
                   _sink_bwd_kernel, _sink_bwd_fake)


def _varlen_sink_bwd_kernel(dout, out, lse, sinks, cu_seqlens_q, max_seqlen_q):
    return _sink_grad(dout, out, lse, sinks, cu_seqlens_q, max_seqlen_q)


varlen_sink_bwd = _define("varlen_sink_bwd(Tensor dout, Tensor output, Tensor softmax_lse, Tensor sinks, "
                          "Tensor cu_seqlens_q, int max_seqlen_q) -> Tensor",
                          _varlen_sink_bwd_kernel, lambda dout, out, lse, sinks, *rest: _sink_bwd_fake(dout, out, lse, sinks))

torch.library.register_autograd("flashattn::fwd", _fwd_backward, setup_context=_fwd_setup, lib=_lib)


def _no_double_backward(ctx, *grads):
    raise NotImplementedError("flashattn: the backward is not differentiable (no double backward / create_graph)")


torch.library.register_autograd("flashattn::bwd", _no_double_backward, lib=_lib)

# ---- packed variable-length sequences ------------------------------------------------------------

_VARLEN = "Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k"


def _varlen_fwd_kernel(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
                       window_left, window_right, softcap, alibi_slopes, sinks, deterministic, num_splits):
    return _run_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
                       window_left, window_right, softcap, alibi_slopes, sinks, deterministic, num_splits, True)


def _varlen_fwd_fake(q, k, v, *rest):
    return _varlen_outputs(q, v)


varlen_fwd = _define(f"varlen_fwd(Tensor q, Tensor k, Tensor v, {_VARLEN}, {_OPTIONS}, bool deterministic, "
                     "int num_splits) -> (Tensor output, Tensor softmax_lse)", _varlen_fwd_kernel, _varlen_fwd_fake)


def _varlen_bwd_kernel(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                       softmax_scale, causal, window_left, window_right, softcap, alibi_slopes, sinks, deterministic):
    dout, q, k, v, out = (_dense_last(t) for t in (dout, q, k, v, out))
    dq, dk, dv = _grads(q, k, v)
    _C.backward_varlen(_to_dlpack(dout), _to_dlpack(q), _to_dlpack(k), _to_dlpack(v), _to_dlpack(out),
                       _to_dlpack(lse), _to_dlpack(dq), _to_dlpack(dk), _to_dlpack(dv), _to_dlpack(cu_seqlens_q),
                       _to_dlpack(cu_seqlens_k), max_seqlen_q, max_seqlen_k, softmax_scale, causal,
                       window_left, window_right, softcap, _capsule(alibi_slopes), deterministic, 0, 0,
                       _stream(q), _capsule(sinks))
    return dq, dk, dv


varlen_bwd = _define(f"varlen_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor output, Tensor softmax_lse, "
                     f"{_VARLEN}, {_OPTIONS}, bool deterministic) -> (Tensor dq, Tensor dk, Tensor dv)",
                     _varlen_bwd_kernel, _bwd_fake)


def _varlen_setup(ctx, inputs, output):
    (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_left,
     window_right, softcap, alibi_slopes, sinks, deterministic, _) = inputs
    ctx.save_for_backward(q, k, v, *output, cu_seqlens_q, cu_seqlens_k, alibi_slopes, sinks)
    ctx.max_seqlens = (max_seqlen_q, max_seqlen_k)
    ctx.options = (softmax_scale, causal, window_left, window_right, softcap)
    ctx.deterministic = deterministic


def _varlen_backward(ctx, dout, _dlse):
    q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes, sinks = ctx.saved_tensors
    dq, dk, dv = varlen_bwd(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, *ctx.max_seqlens, *ctx.options,
                            alibi_slopes, sinks, ctx.deterministic)
    dsinks = None
    if sinks is not None and ctx.needs_input_grad[13]:
        dsinks = varlen_sink_bwd(dout, out, lse, sinks, cu_seqlens_q, ctx.max_seqlens[0])
    return (dq, dk, dv) + (None,) * 10 + (dsinks, None, None)


torch.library.register_autograd("flashattn::varlen_fwd", _varlen_backward, setup_context=_varlen_setup, lib=_lib)
torch.library.register_autograd("flashattn::varlen_bwd", _no_double_backward, lib=_lib)

# ---- KV cache (inference) ------------------------------------------------------------------------


def _seqused(t, name="cache_seqlens"):
    """An index tensor (lengths, page ids, cache rows) as the C++ API wants it: int32, contiguous (a no-op
    when it is; other integer dtypes are converted, as flash_attn_with_kvcache promises)."""
    if t is None or (t.dtype is _I32 and t.is_contiguous()):
        return t
    if t.is_floating_point() or t.is_complex() or t.dtype is torch.bool:
        raise error(name, "an integer tensor (int32)", str(t.dtype))
    return t.to(_I32).contiguous()


def _kvcache_kernel(q, k_cache, v_cache, cache_seqlens, softmax_scale, causal, window_left, window_right, softcap,
                    alibi_slopes, sinks, num_splits):
    # Per-sequence cache lengths are Options::seqused_k: the kernels read them on the device (no host
    # read, so a decode step stays graph-capturable) and CUDA's decode kernel, split-KV included, runs
    # over the cache as it is.
    return _run_forward(q, k_cache, v_cache, softmax_scale, causal, window_left, window_right, softcap,
                        alibi_slopes, _fp32_sinks(sinks), False, num_splits, _seqused(cache_seqlens), True)


def _kvcache_fake(q, k_cache, v_cache, cache_seqlens, *options):
    return _fwd_outputs(q, v_cache)


fwd_kvcache = _define(f"fwd_kvcache(Tensor q, Tensor k_cache, Tensor v_cache, Tensor? cache_seqlens, {_OPTIONS}, "
                      "int num_splits) -> (Tensor output, Tensor softmax_lse)", _kvcache_kernel, _kvcache_fake)


# ---- routing for the flash_attn functions --------------------------------------------------------

_is_compiling = torch.compiler.is_compiling
_dispatch_modes = torch._C._len_torch_dispatch_stack
_function_mode = torch._C._is_torch_function_mode_enabled
_functorch_stack = getattr(torch._C._functorch, "peek_interpreter_stack", lambda: None)
_jit_tracing = getattr(torch._C, "_is_tracing", None) or (lambda: torch._C._get_tracing_state() is not None)
_grad_enabled = torch.is_grad_enabled
_Tensor = torch.Tensor


def _plain_eager(q, k, v):
    """True when nothing would see the difference between the operator and its kernel: no tracing
    (dynamo, jit), no dispatch or function mode, no functorch transform, no tensor subclass.
    (is_compiling first: dynamo folds it to True and never reaches the C-level queries it cannot trace.)"""
    return (type(q) is _Tensor and type(k) is _Tensor and type(v) is _Tensor and not _is_compiling()
            and not _dispatch_modes() and not _function_mode() and _functorch_stack() is None
            and not _jit_tracing())


class _EagerAttention(torch.autograd.Function):
    """Plain eager with a gradient wanted: fwd's kernel forward, bwd's kernel backward."""

    @staticmethod
    def forward(ctx, q, k, v, softmax_scale, causal, window_left, window_right, softcap, alibi_slopes, sinks,
                deterministic):
        out, lse = _fwd_kernel(q, k, v, softmax_scale, causal, window_left, window_right, softcap, alibi_slopes,
                               _fp32_sinks(sinks), deterministic, 0)
        ctx.save_for_backward(q, k, v, out, lse, alibi_slopes, sinks)
        ctx.options = (softmax_scale, causal, window_left, window_right, softcap)
        ctx.deterministic = deterministic
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, alibi_slopes, sinks = ctx.saved_tensors
        dq, dk, dv = _bwd_kernel(dout, q, k, v, out, lse, *ctx.options, alibi_slopes, _fp32_sinks(sinks),
                                 ctx.deterministic)
        dsinks = _sink_grad(dout, out, lse, sinks) if sinks is not None and ctx.needs_input_grad[9] else None
        return dq, dk, dv, None, None, None, None, None, None, dsinks, None


class _EagerVarlenAttention(torch.autograd.Function):
    """Plain eager with a gradient wanted, packed sequences: varlen_fwd's and varlen_bwd's kernels."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
                window_left, window_right, softcap, alibi_slopes, sinks, deterministic):
        out, lse = _varlen_fwd_kernel(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                                      causal, window_left, window_right, softcap, alibi_slopes, _fp32_sinks(sinks),
                                      deterministic, 0)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes, sinks)
        ctx.max_seqlens = (max_seqlen_q, max_seqlen_k)
        ctx.options = (softmax_scale, causal, window_left, window_right, softcap)
        ctx.deterministic = deterministic
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes, sinks = ctx.saved_tensors
        dq, dk, dv = _varlen_bwd_kernel(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, *ctx.max_seqlens,
                                        *ctx.options, alibi_slopes, _fp32_sinks(sinks), ctx.deterministic)
        dsinks = None
        if sinks is not None and ctx.needs_input_grad[13]:
            dsinks = _sink_grad(dout, out, lse, sinks, cu_seqlens_q, ctx.max_seqlens[0])
        return (dq, dk, dv) + (None,) * 10 + (dsinks, None)


def _wants_grad(q, k, v, sinks=None):
    # requires_grad first: inference tensors answer False without the grad-mode lookup
    return (q.requires_grad or k.requires_grad or v.requires_grad
            or (sinks is not None and sinks.requires_grad)) and _grad_enabled()


def forward(q, k, v, opts, want_lse=True):
    """flash_attn_func's route (see the module docstring) -> (out, softmax_lse); in plain eager without a
    gradient, softmax_lse is None unless want_lse (the kernels then skip it). opts: an AttentionOptions."""
    if _plain_eager(q, k, v):
        if _wants_grad(q, k, v, opts.sinks):
            return _EagerAttention.apply(q, k, v, opts.softmax_scale, opts.causal, opts.window_left,
                                         opts.window_right, opts.softcap, opts.alibi_slopes, opts.sinks,
                                         opts.deterministic)
        return _run_forward(q, k, v, opts.softmax_scale, opts.causal, opts.window_left, opts.window_right,
                            opts.softcap, opts.alibi_slopes, _fp32_sinks(opts.sinks), False, 0, None, want_lse)
    options = (opts.softmax_scale, opts.causal, opts.window_left, opts.window_right, opts.softcap, opts.alibi_slopes,
               opts.sinks)
    if _wants_grad(q, k, v, opts.sinks):
        return fwd(q, k, v, *options, opts.deterministic, 0)
    return fwd_kvcache(q, k, v, None, *options, 0)


def varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, opts, want_lse=True,
                   seqused_k=None, page_table=None, seqused_q=None):
    """flash_attn_varlen_func's route -> (out, softmax_lse); softmax_lse as in forward(). A paged cache
    (page_table), seqused_k or seqused_q: forward only (as in flash_attn v3). Rows past seqused_q are not
    written: they hold zeros here (flash_attn leaves them unspecified)."""
    args = (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, opts.softmax_scale, opts.causal,
            opts.window_left, opts.window_right, opts.softcap, opts.alibi_slopes)
    if page_table is not None or seqused_k is not None or seqused_q is not None:
        if _wants_grad(q, k, v, opts.sinks):
            name = "page_table" if page_table is not None else "seqused_k" if seqused_k is not None else "seqused_q"
            raise error(name, "inputs that need no gradient (paged caches, seqused_k and seqused_q are forward-only)",
                        "inputs that require grad")
        out, lse = _run_varlen(*args, _fp32_sinks(opts.sinks), False, 0, want_lse, _seqused(seqused_k, "seqused_k"),
                               _seqused(page_table, "page_table"), _seqused(seqused_q, "seqused_q"), zero_out=True)
        return out, lse
    if _plain_eager(q, k, v):
        if _wants_grad(q, k, v, opts.sinks):
            return _EagerVarlenAttention.apply(*args, opts.sinks, opts.deterministic)
        return _run_varlen(*args, _fp32_sinks(opts.sinks), opts.deterministic, 0, want_lse)
    return varlen_fwd(*args, opts.sinks, opts.deterministic, 0)


def kvcache(q, k_cache, v_cache, cache_seqlens, opts, want_lse=True):
    """flash_attn_with_kvcache's route without an append or cache indexing (inference only) -> (out, softmax_lse);
    softmax_lse as in forward()."""
    if _plain_eager(q, k_cache, v_cache):
        if not (cache_seqlens is None or (cache_seqlens.dtype is _I32 and cache_seqlens.is_contiguous())):
            cache_seqlens = _seqused(cache_seqlens)
        return _run_forward(q, k_cache, v_cache, opts.softmax_scale, opts.causal, opts.window_left, opts.window_right,
                            opts.softcap, opts.alibi_slopes, _fp32_sinks(opts.sinks), False, opts.num_splits,
                            cache_seqlens, want_lse)
    return fwd_kvcache(q, k_cache, v_cache, cache_seqlens, opts.softmax_scale, opts.causal, opts.window_left,
                       opts.window_right, opts.softcap, opts.alibi_slopes, opts.sinks, opts.num_splits)


# ---- the full KV-cache call: append (rotary), paged, cache rows, left padding --------------------


def _run_kvcache_full(q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, cache_leftpad, page_table,
                      rotary_cos, rotary_sin, rotary_interleaved, softmax_scale, causal, window_left, window_right,
                      softcap, alibi_slopes, sinks, num_splits, want_lse):
    """The C++ forward_kvcache validates everything, appends k/v in place (rotary on k), then attends:
    nothing is written into the caches before every argument has been checked."""
    q = _dense_last(q)
    out = _empty_out(q, v_cache)
    lse = _lse(q) if want_lse else None
    _C.forward_kvcache_eager(*(_eager_arg(t) for t in (q, k, v, k_cache, v_cache, out, lse,
                                                       _seqused(cache_seqlens, "cache_seqlens"),
                                                       _seqused(cache_batch_idx, "cache_batch_idx"),
                                                       _seqused(cache_leftpad, "cache_leftpad"),
                                                       _seqused(page_table, "page_table"), rotary_cos, rotary_sin)),
                             rotary_interleaved, _eager_arg(alibi_slopes), _eager_arg(_fp32_sinks(sinks)),
                             softmax_scale, causal, window_left, window_right, softcap, False, num_splits,
                             None if _EXCHANGE_API else (_raw_stream(q.get_device()) if q.is_cuda else 0))
    return out, lse


def _eager_arg(t):
    """A tensor as the eager entries take it: itself (DLPack C exchange API) or a capsule."""
    if t is None or _EXCHANGE_API:
        return t
    return _to_dlpack(t)


def _kvcache_full_kernel(q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, cache_leftpad, page_table,
                         rotary_cos, rotary_sin, rotary_interleaved, softmax_scale, causal, window_left, window_right,
                         softcap, alibi_slopes, sinks, num_splits):
    return _run_kvcache_full(q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, cache_leftpad, page_table,
                             rotary_cos, rotary_sin, rotary_interleaved, softmax_scale, causal, window_left,
                             window_right, softcap, alibi_slopes, sinks, num_splits, True)


def _kvcache_full_fake(q, k_cache, v_cache, *rest):
    return _fwd_outputs(q, v_cache)


fwd_kvcache_full = _define(
    "fwd_kvcache_full(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor? k, Tensor? v, Tensor? cache_seqlens, "
    "Tensor? cache_batch_idx, Tensor? cache_leftpad, Tensor? page_table, Tensor? rotary_cos, Tensor? rotary_sin, "
    f"bool rotary_interleaved, {_OPTIONS}, int num_splits) -> (Tensor output, Tensor softmax_lse)",
    _kvcache_full_kernel, _kvcache_full_fake)


def kvcache_full(q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, cache_leftpad, page_table, rotary_cos,
                 rotary_sin, rotary_interleaved, opts, want_lse=True):
    """flash_attn_with_kvcache's route when it appends or indexes the cache -> (out, softmax_lse)."""
    args = (q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, cache_leftpad, page_table, rotary_cos,
            rotary_sin, rotary_interleaved, opts.softmax_scale, opts.causal, opts.window_left, opts.window_right,
            opts.softcap, opts.alibi_slopes, opts.sinks, opts.num_splits)
    if _plain_eager(q, k_cache, v_cache):
        return _run_kvcache_full(*args, want_lse)
    return fwd_kvcache_full(*args)
