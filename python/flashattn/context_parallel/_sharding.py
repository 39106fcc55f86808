"""Which tokens each rank holds, and helpers to shard a batch over the ranks and put it back together.

Layouts (see _schedule.py for why zig-zag balances causal attention):
    "zigzag":     the sequence is cut into 2W equal chunks; rank r holds chunks r and 2W-1-r, in that order
    "contiguous": the sequence is cut into W equal chunks; rank r holds chunk r
Packed documents (varlen) are sharded document by document: every rank holds the same share of every
document, so the local packing is described by the same cu_seqlens on every rank (the global
cu_seqlens divided by W).

The positions are what rotary embeddings need: a rank's token t sits at global position positions[t].
"""

from __future__ import annotations

import torch

from .._checks import error
from ._schedule import LAYOUTS


def _check_ring(rank, world_size):
    if not isinstance(world_size, int) or world_size < 1:
        raise error("world_size", "an int >= 1", repr(world_size))
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise error("rank", f"an int in [0, {world_size})", repr(rank))


def _chunks(layout, world_size):
    if layout not in LAYOUTS:
        raise error("layout", " or ".join(repr(x) for x in LAYOUTS), repr(layout))
    return 2 * world_size if layout == "zigzag" else world_size


def _owned_chunks(rank, world_size, layout):
    return (rank, 2 * world_size - 1 - rank) if layout == "zigzag" else (rank,)


def sequence_positions(seqlen, rank, world_size, layout="zigzag", device=None):
    """int64 (seqlen // world_size,): the global positions of the tokens `rank` holds, in local order."""
    _check_ring(rank, world_size)
    chunks = _chunks(layout, world_size)
    if seqlen % chunks:
        raise error("seqlen", f"a multiple of {chunks} ({layout}: {chunks} equal chunks for {world_size} ranks)",
                    str(seqlen))
    size = seqlen // chunks
    return torch.cat([torch.arange(c * size, (c + 1) * size, device=device)
                      for c in _owned_chunks(rank, world_size, layout)])


def varlen_positions(cu_seqlens, rank, world_size, layout="zigzag"):
    """int64: the indices, into the globally packed tokens, of the tokens `rank` holds (its share of every
    document, packed in document order). cu_seqlens: the global offsets (a tensor or a sequence of ints)."""
    _check_ring(rank, world_size)
    chunks = _chunks(layout, world_size)
    bounds = cu_seqlens.tolist() if isinstance(cu_seqlens, torch.Tensor) else list(cu_seqlens)
    device = cu_seqlens.device if isinstance(cu_seqlens, torch.Tensor) else None
    parts = []
    for d, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        if (end - start) % chunks or end < start:
            raise error("cu_seqlens", f"document lengths that are multiples of {chunks} ({layout} over {world_size} "
                        "ranks)", f"document {d} of length {end - start}")
        size = (end - start) // chunks
        parts += [torch.arange(start + c * size, start + (c + 1) * size)
                  for c in _owned_chunks(rank, world_size, layout)]
    index = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
    return index.to(device) if device is not None else index


def local_cu_seqlens(cu_seqlens, world_size):
    """(cu_seqlens int32, max_seqlen) of every rank's local packing, from the global cu_seqlens (any layout:
    each rank holds 1 / world_size of every document)."""
    if not isinstance(world_size, int) or world_size < 1:
        raise error("world_size", "an int >= 1", repr(world_size))
    cu = torch.as_tensor(cu_seqlens)
    if cu.dim() != 1 or cu.numel() < 1 or (cu % world_size != 0).any():
        raise error("cu_seqlens", f"rank-1 offsets of documents whose lengths are multiples of {world_size}",
                    str(cu.tolist()))
    local = torch.div(cu, world_size, rounding_mode="floor").to(torch.int32)
    max_seqlen = int((local[1:] - local[:-1]).max()) if local.numel() > 1 else 0
    return local, max_seqlen


def zigzag_shard(x, rank, world_size, dim=1):
    """The zig-zag shard of x (the full sequence along `dim`) that `rank` holds: chunks r and 2W-1-r of 2W."""
    _check_ring(rank, world_size)
    if x.shape[dim] % (2 * world_size):
        raise error("x", f"a length along dim {dim} that is a multiple of {2 * world_size} (2 chunks per rank)",
                    str(list(x.shape)))
    chunks = x.chunk(2 * world_size, dim)
    return torch.cat((chunks[rank], chunks[2 * world_size - 1 - rank]), dim)


def zigzag_unshard(shards, dim=1):
    """The full sequence from every rank's zig-zag shard (a sequence of W tensors in rank order, e.g. from
    all_gather): inverse of zigzag_shard."""
    shards = list(shards)
    if not shards or any(s.shape != shards[0].shape for s in shards) or shards[0].shape[dim] % 2:
        raise error("shards", "W equal-shaped tensors with an even length along dim " + str(dim),
                    str([list(s.shape) for s in shards]))
    halves = [s.chunk(2, dim) for s in shards]
    return torch.cat([front for front, _ in halves] + [back for _, back in reversed(halves)], dim)


def zigzag_shard_varlen(x, cu_seqlens, rank, world_size):
    """The zig-zag shard of packed documents x (total, ...) that `rank` holds; its packing is
    local_cu_seqlens(cu_seqlens, world_size)."""
    return x.index_select(0, varlen_positions(cu_seqlens, rank, world_size, "zigzag").to(x.device))


def zigzag_unshard_varlen(shards, cu_seqlens):
    """The packed documents from every rank's zig-zag shard (W tensors in rank order): inverse of
    zigzag_shard_varlen."""
    shards = list(shards)
    if not shards:
        raise error("shards", "one tensor per rank", "none")
    world_size = len(shards)
    total = sum(s.shape[0] for s in shards)
    out = shards[0].new_empty((total, *shards[0].shape[1:]))
    for rank, shard in enumerate(shards):
        index = varlen_positions(cu_seqlens, rank, world_size, "zigzag").to(shard.device)
        if index.numel() != shard.shape[0]:
            raise error("shards", f"{index.numel()} tokens from rank {rank} (its share of cu_seqlens)",
                        str(shard.shape[0]))
        out.index_copy_(0, index, shard)
    return out
