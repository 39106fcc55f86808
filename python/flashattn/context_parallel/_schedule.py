"""What each ring step computes: which query rows and key rows of the local problem meet, and whether
the causal mask applies inside that sub-block.

The sequence is cut into chunks and rank r holds some of them (the layout). At ring step s rank r
holds the K/V block of rank (r - s) mod W, so the pair (queries of r, keys of source) visits every
(query chunk, key chunk) pair once over the W steps. Global causality (key position <= query
position; q and k are the same tokens, so flashattn's bottom-right alignment is the diagonal) makes
each pair fully visible, invisible, or the diagonal:

zig-zag (2W chunks, rank r holds chunks r and 2W-1-r; locally [front = chunk r, back = chunk 2W-1-r]):
    source == r   local causal attention: the two chunks are in increasing position order, so the
                  local causal mask is the global one (front sees front causally, back sees front
                  fully and back causally, front never sees back)
    source <  r   the source's chunks are s < r < 2W-1-r < 2W-1-s: both query chunks see the front
                  key chunk (s) fully and the back one (2W-1-s) not at all -> all queries x front keys
    source >  r   r < s < 2W-1-s < 2W-1-r: the front query chunk sees nothing, the back one sees both
                  key chunks fully -> back queries x all keys
  Every step but the first is half of a full block, so all ranks do equal work at every step.

contiguous (W chunks, rank r holds chunk r): source < r full, source == r causal, source > r nothing
  (rank W-1 does W times the work of rank 0: simple, unbalanced).

Without causality every step is the full non-causal block, whatever the layout.
tests/python/test_context_parallel.py checks these plans against the global mask, pair by pair.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

ALL, FRONT, BACK = "all", "front", "back"  # which rows of the local tokens a step uses (halves: zig-zag)
LAYOUTS = ("zigzag", "contiguous")


class Step(NamedTuple):
    queries: str  # ALL or BACK
    keys: str     # ALL or FRONT
    causal: bool  # the local causal mask inside the sub-block (only on the diagonal)


def ring_source(rank: int, step: int, world_size: int) -> int:
    """The rank whose K/V block `rank` holds at ring `step` (blocks travel from rank i to rank i + 1)."""
    return (rank - step) % world_size


def plan_step(rank: int, source: int, causal: bool, layout: str) -> Optional[Step]:
    """The sub-block that rank's queries attend to in source's keys, or None when none is visible."""
    if not causal:
        return Step(ALL, ALL, False)
    if source == rank:
        return Step(ALL, ALL, True)
    if layout == "zigzag":
        return Step(ALL, FRONT, False) if source < rank else Step(BACK, ALL, False)
    return Step(ALL, ALL, False) if source < rank else None
