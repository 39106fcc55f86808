"""Ring attention, forward and backward, as one torch.autograd.Function.

Forward, on every rank, over W steps (W = ring size):
    shift = send (K, V) in hand to rank + 1, receive rank - 1's       (issued first: it overlaps the step)
    (O_s, LSE_s) = local attention of this rank's Q on the block in hand (the calls of _schedule.py:
                   one, or with a sliding window one per visible chunk pair)
    keep (O_s, LSE_s) as an fp32 partial result                         (_merge.py: merged a few at a time)
    (K, V) = shift.wait()
(O, LSE) = flashattn's LSE merge of the partials. The first step is this rank's own block, which every
query row sees (itself at least, when causal), so no row ends without a key. With W = 1 there is
nothing to shift or merge (and, without a window, one call): the result is the local kernel's.

Backward (standard ring-attention backward): each step recomputes its block's attention from the
*global* O and LSE saved by the forward (the local kernels compute D = rowsum(dO * O) from the O they
are given, and P = exp(S - LSE) with the global LSE, so every step's gradients are exactly that
block's share of the full attention's gradients):
    dQ        accumulates on this rank (fp32; one rank with one call: the kernel's dQ as it is)
    dK, dV    an fp32 accumulator travels with each K/V block: at step s this rank holds the block of
              rank r - s and its accumulator (received from rank r - 1, which added its share at step
              s - 1), adds its own share and passes it on to rank r + 1. After the W-th pass every
              accumulator is back at its owner, complete.
The order of every addition is fixed by the ring (rank r adds in ring order, never concurrently), so
with the local kernels' deterministic flag the whole backward is bitwise reproducible run to run.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ._merge import PartialResults
from ._schedule import step_calls


class Options(NamedTuple):
    softmax_scale: Optional[float]
    causal: bool
    layout: str
    softcap: float
    deterministic: bool
    window: tuple = (-1, -1)  # global (left, right); dense batches only


def _plans(q, ring, options):
    """The local calls of every ring step (step_calls of _schedule.py)."""
    seqlen = q.shape[1] if q.dim() == 4 else None  # windows (dense only) are planned on the local seqlen
    return [step_calls(ring.rank, ring.source(step), ring.world_size, seqlen, options.causal, options.layout,
                       options.window) for step in range(ring.world_size)]


class _InFlight:
    """The shifts not waited for yet. When a step raises (e.g. the C++ library refuses an argument,
    on every rank alike), waiting for them before re-raising leaves the process group with no
    half-done transfer, so it can still be used."""

    def __init__(self):
        self.shifts = []

    def start(self, shift):
        self.shifts.append(shift)
        return shift

    def finish(self, shift):
        self.shifts.remove(shift)
        return shift.wait()

    def drain(self):
        for shift in self.shifts:
            try:
                shift.wait()
            except Exception:  # the original error is the one to report
                pass
        self.shifts = []


def ring_forward(q, k, v, ring, tokens, options):
    """-> out (q's dtype), lse fp32, over the whole ring's keys."""
    world_size = ring.world_size
    plans = _plans(q, ring, options)
    calls = sum(len(plan) for plan in plans)
    if world_size == 1 and calls == 1:  # nothing to shift or merge: the local kernel's result as it is
        return tokens.forward(q, k, v, plans[0][0], options)
    in_flight = _InFlight()
    partials = None
    block = (k, v)
    try:
        for step in range(world_size):
            shift = in_flight.start(ring.shift(block)) if step + 1 < world_size else None
            for call in plans[step]:
                step_out, step_lse = tokens.forward(q, *block, call, options)
                if partials is None:  # shapes known now (d_v is v's head dim)
                    out_shape = (*q.shape[:-1], step_out.shape[-1])
                    partials = PartialResults(out_shape, tokens.lse_shape(q), q.device, calls)
                tokens.write(*partials.slot(), step_out, step_lse, call.queries)
            if shift is not None:
                block = in_flight.finish(shift)
    except BaseException:
        in_flight.drain()
        raise
    return partials.result(q.dtype)


def ring_backward(dout, q, k, v, out, lse, ring, tokens, options):
    """-> dq, dk, dv in the dtypes of q, k, v."""
    world_size = ring.world_size
    plans = _plans(q, ring, options)
    if world_size == 1 and len(plans[0]) == 1:  # nothing to shift or add: the local kernel's gradients
        return tokens.backward(dout, q, k, v, out, lse, plans[0][0], options)
    in_flight = _InFlight()
    # fp32 accumulators; dK/dV of the block in hand: this rank's own at step 0, then what rank r - 1 passed on
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dkv = [torch.zeros(x.shape, dtype=torch.float32, device=x.device) for x in (k, v)]
    dkv_shift = None
    block = (k, v)
    try:
        for step in range(world_size):
            shift = in_flight.start(ring.shift(block)) if step + 1 < world_size else None
            grads = [tokens.backward(dout, q, *block, out, lse, call, options) for call in plans[step]]
            if step > 0:
                dkv = in_flight.finish(dkv_shift)
            for call, (dq_s, dk_s, dv_s) in zip(plans[step], grads):  # in call order: deterministic
                tokens.add(dq, dq_s, call.queries)
                tokens.add(dkv[0], dk_s, call.keys)
                tokens.add(dkv[1], dv_s, call.keys)
            if world_size > 1:  # after the last step this pass brings every accumulator home
                dkv_shift = in_flight.start(ring.shift(dkv))
            if shift is not None:
                block = in_flight.finish(shift)
        if dkv_shift is not None:
            dkv = in_flight.finish(dkv_shift)
    except BaseException:
        in_flight.drain()
        raise
    return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype)


class RingAttention(torch.autograd.Function):
    """(q, k, v) -> (out, lse); lse is not differentiable (as in flash_attn)."""

    @staticmethod
    def forward(ctx, q, k, v, ring, tokens, options):
        out, lse = ring_forward(q, k, v, ring, tokens, options)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.ring, ctx.tokens, ctx.options = ring, tokens, options
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ring_backward(dout, q, k, v, out, lse, ctx.ring, ctx.tokens, ctx.options)
        return dq, dk, dv, None, None, None
