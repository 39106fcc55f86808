"""Context parallelism: ring attention over a torch.distributed process group, for sequences sharded
along the sequence dimension across ranks (GPUs through NCCL, CPU processes through gloo).

    import torch.distributed as dist
    from flashattn.context_parallel import ring_flash_attn_func, zigzag_shard

    rank, world = dist.get_rank(), dist.get_world_size()
    q, k, v = (zigzag_shard(x, rank, world) for x in (q_full, k_full, v_full))   # (batch, seqlen / W, heads, d)
    out = ring_flash_attn_func(q, k, v, causal=True)                            # this rank's tokens
    out.backward(grad)                                                          # dq, dk, dv of this rank's tokens

Every rank computes attention of its queries over all ranks' keys: K/V blocks travel around the ring
(rank r sends to r + 1) with batched point-to-point transfers that overlap the local attention,
flashattn's own kernels compute each block, and flashattn's LSE merge combines the partial results.
The backward passes dK/dV accumulators around the ring with their blocks. Causal attention is load
balanced by zig-zag sharding (zigzag_shard / zigzag_unshard; the `layout` argument). Packed
documents: ring_flash_attn_varlen_func, zigzag_shard_varlen, local_cu_seqlens.

Sliding windows follow global positions (dense batches; planned chunk pair by chunk pair). Not there:
ALiBi and windows over packed documents (NotImplementedError naming the argument), dropout.
docs/context-parallelism.md: communication volume, when compute hides it, scaling to many nodes.
"""

from ._api import ring_flash_attn_func, ring_flash_attn_varlen_func
from ._sharding import (
    local_cu_seqlens,
    sequence_positions,
    varlen_positions,
    zigzag_shard,
    zigzag_shard_varlen,
    zigzag_unshard,
    zigzag_unshard_varlen,
)

__all__ = [
    "ring_flash_attn_func",
    "ring_flash_attn_varlen_func",
    "zigzag_shard",
    "zigzag_unshard",
    "zigzag_shard_varlen",
    "zigzag_unshard_varlen",
    "local_cu_seqlens",
    "sequence_positions",
    "varlen_positions",
]
