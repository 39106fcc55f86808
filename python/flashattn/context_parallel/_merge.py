"""Folding one ring step's partial attention into the running result with flashattn's LSE merge
(the C++ `merge`: LSE = log sum_c exp(LSE_c), O = sum_c exp(LSE_c - LSE) O_c, in fp32; a row whose
LSEs are all -inf gets zeros and -inf, never NaN)."""

from __future__ import annotations

import torch

from .. import _C
from .._torch_ops import _stream, _to_dlpack


def merge_into(out, lse, part_out, part_lse):
    """out (batch, seqlen, heads, d_v) fp32 and lse (batch, heads, seqlen) fp32, both views that may be
    strided, become the merge of themselves with (part_out, part_lse) of the same shapes (part_out in
    any float dtype). The merge reads every split of a row before writing it, but its output may not
    overlap its inputs (the C++ check refuses that), so the two splits are stacked into a fresh
    buffer first; the merge then writes straight into the caller's views."""
    partials = torch.stack((out, part_out.to(torch.float32)))
    partial_lse = torch.stack((lse, part_lse))
    _C.merge(_to_dlpack(partials), _to_dlpack(partial_lse), _to_dlpack(out), _to_dlpack(lse), stream=_stream(out))
