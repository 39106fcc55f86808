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

A sliding window (dense batches only) is planned chunk pair by chunk pair (window_calls): query
chunk at global offset qo, key chunk at ko, both c tokens, D = qo - ko. Query i sees key j iff
j - i lies in the band [D - left, D + right] (right = 0 when causal; -1 = unbounded). Pairs the band
misses are skipped; a band wholly above the pair's diagonal (D - left > 0) or below it (D + right < 0)
is moved onto the diagonal by slicing rows off the pair, and what is left is the kernel's own window
on a square sub-block, so every call is an ordinary flashattn call.
tests/python/test_context_parallel.py checks these plans against the global mask, pair by pair.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

ALL, FRONT, BACK = "all", "front", "back"  # which rows of the local tokens a step uses (halves: zig-zag)
LAYOUTS = ("zigzag", "contiguous")


class Step(NamedTuple):
    """One local attention call of a ring step: which local rows meet, and the mask inside them."""
    queries: object  # ALL or BACK, or a slice of local rows (windows)
    keys: object     # ALL or FRONT, or a slice of the block's rows (windows)
    causal: bool     # the local causal mask inside the sub-block (only on the diagonal)
    window: tuple = (-1, -1)  # the kernel's (left, right) inside the sub-block; -1 = unbounded


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


def _chunks_held(rank, world_size, seqlen, layout):
    """[(local start, global start)] of the chunks `rank` holds, and the chunk size."""
    if layout == "zigzag":
        size = seqlen // 2
        return [(0, rank * size), (size, (2 * world_size - 1 - rank) * size)], size
    return [(0, rank * seqlen)], seqlen


def _kernel_bound(x, size):
    """A band bound as the kernel's window value: -1 when it leaves no key of the sub-block out."""
    return -1 if x >= size - 1 else int(x)


def window_calls(rank, source, world_size, seqlen, layout, causal, window):
    """The calls of one ring step under a sliding window, over local sequences of `seqlen` tokens."""
    inf = float("inf")
    left = inf if window[0] < 0 else window[0]
    right = 0 if causal else (inf if window[1] < 0 else window[1])
    queries, size = _chunks_held(rank, world_size, seqlen, layout)
    keys, _ = _chunks_held(source, world_size, seqlen, layout)
    calls = []
    for q_local, q_global in queries:
        for k_local, k_global in keys:
            offset = q_global - k_global
            lo, hi = offset - left, offset + right  # query i sees key j iff lo <= j - i <= hi
            if lo > size - 1 or hi < -(size - 1):
                continue
            if lo > 0:  # keys start lo past the diagonal: rows [0, size - lo) x keys [lo, size)
                rows, cols = (0, size - int(lo)), (int(lo), size)
                kernel_window = (0, _kernel_bound(hi - lo, size - lo))
            elif hi < 0:  # keys end -hi before the diagonal: rows [-hi, size) x keys [0, size + hi)
                rows, cols = (int(-hi), size), (0, size + int(hi))
                kernel_window = (_kernel_bound(hi - lo, size + hi), 0)
            else:
                rows, cols, kernel_window = (0, size), (0, size), (_kernel_bound(-lo, size), _kernel_bound(hi, size))
            calls.append(Step(slice(q_local + rows[0], q_local + rows[1]), slice(k_local + cols[0], k_local + cols[1]),
                              False, kernel_window))
    return calls


def step_calls(rank, source, world_size, seqlen, causal, layout, window):
    """Every local call of one ring step (an empty list when nothing is visible)."""
    if tuple(window) != (-1, -1):
        return window_calls(rank, source, world_size, seqlen, layout, causal, window)
    step = plan_step(rank, source, causal, layout)
    return [] if step is None else [step]
