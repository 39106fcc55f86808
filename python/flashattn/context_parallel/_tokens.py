"""The two token layouts the ring runs over, behind one interface: where the tokens of a tensor are,
how to take the front or back half of every local sequence (zig-zag steps use halves), which of
flashattn's kernels a step calls, and how a step's rows are added into the gradients or written into
a partial-result slot.

- DenseTokens: q/k/v (batch, seqlen, heads, d), lse (batch, heads, seqlen). Halves and the row ranges of
  sliding-window calls are slices (views).
- VarlenTokens: packed q/k/v (total, heads, d) with cu_seqlens, lse (heads, total). The halves of
  the packed documents are not contiguous: they are gathered (index_select) into packed tensors of
  their own with halved cu_seqlens, and the step's rows are scattered back (index_copy_/index_add_:
  every index once, so deterministic). A gather copies O(tokens) next to the step's O(tokens^2) attention.

The local kernels are the functions behind torch.ops.flashattn.fwd/bwd/varlen_fwd/varlen_bwd (the
same code the operators run, without the dispatcher's per-call boxing and register_autograd's
wrapper), so the ring runs flashattn's CPU kernels on CPU tensors and its CUDA kernels on CUDA tensors.
"""

from __future__ import annotations

import torch

from .._torch_ops import _bwd_kernel, _fwd_kernel, _varlen_bwd_kernel, _varlen_fwd_kernel
from ._schedule import ALL, BACK, FRONT

class DenseTokens:
    """Batches of equal-length local sequences: token dim 1, LSE token dim -1."""

    def lse_shape(self, q):
        return (q.shape[0], q.shape[2], q.shape[1])

    def rows(self, x, part, lse=False):
        """x's tokens in `part` (ALL, FRONT or BACK half of the local sequence, or a slice): a view."""
        if part == ALL:
            return x
        if not isinstance(part, slice):
            half = x.shape[-1 if lse else 1] // 2
            part = slice(0, half) if part == FRONT else slice(half, None)
        return x[..., part] if lse else x[:, part]

    def forward(self, q, k, v, step, options):
        return _fwd_kernel(self.rows(q, step.queries), self.rows(k, step.keys), self.rows(v, step.keys),
                           options.softmax_scale, step.causal, *step.window, options.softcap, None, None,
                           options.deterministic, 0)

    def backward(self, dout, q, k, v, out, lse, step, options):
        queries = step.queries
        return _bwd_kernel(self.rows(dout, queries), self.rows(q, queries), self.rows(k, step.keys),
                           self.rows(v, step.keys), self.rows(out, queries), self.rows(lse, queries, lse=True),
                           options.softmax_scale, step.causal, *step.window, options.softcap, None, None,
                           options.deterministic)

    def add(self, acc, x, part):
        self.rows(acc, part).add_(x)

    def write(self, slot_out, slot_lse, out, lse, part):
        """A step's (out, lse) of the rows `part` into a partial-result slot (fp32)."""
        self.rows(slot_out, part).copy_(out)
        self.rows(slot_lse, part, lse=True).copy_(lse)


class VarlenTokens:
    """Packed documents: token dim 0, LSE token dim -1. The local cu_seqlens are the same on every rank
    (each holds the same share of every document), so a block from any rank has this rank's layout."""

    def __init__(self, cu_seqlens, max_seqlen, halves):
        self.cu_seqlens, self.max_seqlen = cu_seqlens, max_seqlen
        if halves:  # zig-zag causal: index the front and back half of every local document
            # One host read per call: the gathers' sizes depend on the documents' lengths.
            cu = cu_seqlens.to("cpu", torch.long)
            half_len = (cu[1:] - cu[:-1]) // 2
            half_cu = torch.cat((cu.new_zeros(1), half_len.cumsum(0)))
            # token j of the packed front halves is token cu[d] + (j - half_cu[d]) of its document d
            front = torch.arange(int(half_cu[-1])) + torch.repeat_interleave(cu[:-1] - half_cu[:-1], half_len)
            back = front + torch.repeat_interleave(half_len, half_len)
            self._index = {FRONT: front.to(cu_seqlens.device), BACK: back.to(cu_seqlens.device)}
            self._half_cu = half_cu.to(cu_seqlens.device, torch.int32)
            self._half_max = int(half_len.max()) if half_len.numel() else 0

    def lse_shape(self, q):
        return (q.shape[1], q.shape[0])

    def rows(self, x, part, lse=False):
        if part == ALL:
            return x
        return x.index_select(-1 if lse else 0, self._index[part])

    def _layout(self, part):
        return (self.cu_seqlens, self.max_seqlen) if part == ALL else (self._half_cu, self._half_max)

    def forward(self, q, k, v, step, options):
        (cu_q, max_q), (cu_k, max_k) = self._layout(step.queries), self._layout(step.keys)
        return _varlen_fwd_kernel(self.rows(q, step.queries), self.rows(k, step.keys), self.rows(v, step.keys),
                                  cu_q, cu_k, max_q, max_k, options.softmax_scale, step.causal, *step.window,
                                  options.softcap, None, None, options.deterministic, 0)

    def backward(self, dout, q, k, v, out, lse, step, options):
        queries = step.queries
        (cu_q, max_q), (cu_k, max_k) = self._layout(queries), self._layout(step.keys)
        return _varlen_bwd_kernel(self.rows(dout, queries), self.rows(q, queries), self.rows(k, step.keys),
                                  self.rows(v, step.keys), self.rows(out, queries), self.rows(lse, queries, lse=True),
                                  cu_q, cu_k, max_q, max_k, options.softmax_scale, step.causal, *step.window,
                                  options.softcap, None, None, options.deterministic)

    def add(self, acc, x, part):
        if part == ALL:
            acc.add_(x)
        else:  # every index once: one addition per element, in a fixed order
            acc.index_add_(0, self._index[part], x.to(acc.dtype))

    def write(self, slot_out, slot_lse, out, lse, part):
        if part == ALL:
            slot_out.copy_(out)
            slot_lse.copy_(lse)
        else:
            slot_out.index_copy_(0, self._index[part], out.to(slot_out.dtype))
            slot_lse.index_copy_(1, self._index[part], lse)
