"""flashattn: exact attention that never materialises the n x n score matrix.

A drop-in for ``flash_attn``'s v2 interface (same function names, argument names and defaults)::

    import flashattn as flash_attn
    out = flash_attn.flash_attn_func(q, k, v, causal=True)   # q (batch, seqlen_q, heads, d), k/v (batch, seqlen_k, heads_k, d)

plus ``flashattn.scaled_dot_product_attention`` (torch's SDPA signature and layout) and
``flashattn.integrations.transformers.register()`` (an attention implementation for transformers).

Arrays may be numpy arrays (CPU, forward only; the output is a numpy array) or torch tensors on the
CPU or a CUDA device. torch tensors go through the ``torch.ops.flashattn`` operators: autograd runs
flashattn's backward (gradients in the input dtype), torch.compile(fullgraph=True) traces them
without a graph break, and the CUDA forward never synchronises with the host (CUDA-graph capturable).
``import flashattn`` needs numpy alone; it imports torch when torch is installed.

Serving: ``flash_attn_with_kvcache`` and ``flash_attn_varlen_func`` take paged caches (``block_table`` /
``page_table``, any page size), rotary embedding fused with the append, ``cache_batch_idx``, ``cache_leftpad``
and attention ``sinks``; a rejected call writes nothing. GPU-resident lengths are trusted unless
``set_check_lengths(True)`` (or FLASHATTN_CHECK_LENGTHS=1) checks them with one synchronisation per call.

Not supported yet (NotImplementedError naming the argument): dropout (``dropout_p`` must be 0), SDPA's
``attn_mask``. ``return_attn_probs=True`` returns ``(out, softmax_lse,
None)``: flash_attn's third value is the dropout mask, which only exists with dropout. The LSE output
is not differentiable (as in flash_attn).
"""

from __future__ import annotations

from . import _C
from ._interface import (
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
)
from ._kvcache import flash_attn_with_kvcache
from ._sdpa import scaled_dot_product_attention

__version__ = _C.version()
set_check_lengths = _C.set_check_lengths
check_lengths = _C.check_lengths

__all__ = [
    "flash_attn_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_kvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_with_kvcache",
    "scaled_dot_product_attention",
    "cuda_available",
    "set_check_lengths",
    "check_lengths",
]


def cuda_available() -> bool:
    """Whether this build has the CUDA backend and a usable GPU."""
    return _C.cuda_available()
