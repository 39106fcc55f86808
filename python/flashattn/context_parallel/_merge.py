"""The ring steps' partial (O, LSE) pairs, combined with flashattn's LSE merge (the C++ `merge`:
LSE = log sum_c exp(LSE_c), O = sum_c exp(LSE_c - LSE) O_c in fp32, a split with LSE_c = -inf is
skipped, not scaled, so rows a step did not compute may hold anything).

Why slots rather than folding each step into a running result: the merge is memory-bound next to the
step's attention (per output element, attention does O(local seqlen) work, the merge O(1) bytes), and
its output may not overlap its inputs. Folding every step would copy the running fp32 result and the
step's output into a stacked buffer and merge them back: ~26 bytes per output element and step, 17% of
a 16k-token step's attention on an H100. Here each step converts its output into its own fp32 slot
once (rows it did not compute keep LSE = -inf), and one merge reads several slots at a time:
- steps <= max_slots (a ring of up to 4 ranks): all partials in slots, one merge at the end that
  writes the result in its final dtype: ~10.5 bytes per element and step;
- more steps: max_slots - 2 partial slots between two slots that take turns holding the running
  result (a merge reads [running, partials...] and writes the other end), ~14 bytes with 4 slots.
Memory: at most max_slots fp32 copies of the output, during the forward only.
"""

from __future__ import annotations

import torch

from .. import _C
from .._torch_ops import _stream, _to_dlpack

MAX_SLOTS = 4


class PartialResults:
    """out_shape: the result's shape, (batch, seqlen, heads, d_v) or packed (total, heads, d_v); lse_shape
    (batch, heads, seqlen) or (heads, total)."""

    def __init__(self, out_shape, lse_shape, device, steps, max_slots=None):
        max_slots = MAX_SLOTS if max_slots is None else max_slots
        if max_slots < 3:
            raise ValueError(f"max_slots: expected >= 3 (two running slots and one partial), got {max_slots}")
        self._packed = len(out_shape) == 3  # merge wants (splits, batch, ...): packed tokens are batch 1
        self._rotating = steps > max_slots
        self._partial_slots = max_slots - 2 if self._rotating else steps
        n = max_slots if self._rotating else steps
        self._out = torch.empty((n, *out_shape), dtype=torch.float32, device=device)
        self._lse = torch.empty((n, *lse_shape), dtype=torch.float32, device=device)
        self._running = None  # slot of the running result (rotating: 0 or n - 1)
        self._filled = 0      # partial slots filled since the last merge

    def slot(self):
        """(out, lse) fp32 views of a free slot, its LSE all -inf: the caller writes the rows it computed."""
        if self._filled == self._partial_slots:
            self._fold()
        index = self._slot_index(self._filled)
        self._filled += 1
        self._lse[index].fill_(float("-inf"))
        return self._out[index], self._lse[index]

    def result(self, out_dtype):
        """The merge of every partial so far: out in out_dtype, lse fp32."""
        lo, hi = self._window()
        shape_out, shape_lse = self._out.shape[1:], self._lse.shape[1:]
        out = torch.empty(shape_out, dtype=out_dtype, device=self._out.device)
        lse = torch.empty(shape_lse, dtype=torch.float32, device=self._out.device)
        self._merge(lo, hi, out, lse)
        return out, lse

    # Partial i sits next to the running result: after it (running in slot 0, or none yet) or before it
    # (running in the last slot), so that [running, partials...] is always one range of slots.
    def _slot_index(self, i):
        if self._running is not None and self._running != 0:
            return self._running - 1 - i
        return (1 if self._rotating else 0) + i

    def _window(self):
        """The range of slots that holds the running result and the filled partials."""
        if self._running is None:
            first = 1 if self._rotating else 0
            return first, first + self._filled
        if self._running == 0:
            return 0, 1 + self._filled
        return self._running - self._filled, self._running + 1

    def _fold(self):
        """Merges the running result and the full partial slots into the slot at the other end."""
        lo, hi = self._window()
        target = len(self._out) - 1 if self._running in (None, 0) else 0
        self._merge(lo, hi, self._out[target], self._lse[target])
        self._running, self._filled = target, 0

    def _merge(self, lo, hi, out, lse):
        partial_out, partial_lse = self._out[lo:hi], self._lse[lo:hi]
        if self._packed:
            partial_out, partial_lse, out, lse = partial_out[:, None], partial_lse[:, None], out[None], lse[None]
        _C.merge(_to_dlpack(partial_out), _to_dlpack(partial_lse), _to_dlpack(out), _to_dlpack(lse),
                 stream=_stream(out))
