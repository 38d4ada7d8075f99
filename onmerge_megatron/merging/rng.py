"""Counter-based keep-masks: whether element i of tensor T is kept at step t is a pure function of
(seed, t, T's name, i's global index). No RNG stream state, so every sharding of a run draws the
same masks and a resume needs nothing but the step number.

Bits come from Philox-4x32-10 (Salmon et al., SC'11; the generator of cuRAND and Triton), written
with int64 tensor ops so it runs on any device and gives the same bits on each.

A Bernoulli(p) mask is drawn sparsely: the global index space is cut into blocks of
``BLOCK`` elements and, inside each block, the gaps between kept elements are i.i.d. geometric(p)
(which is exactly an i.i.d. Bernoulli(p) mask). Philox call j of block b, counter
(j, b, step, stream), gives the block's gaps 4j .. 4j+3, one per 32-bit output word. A shard draws the blocks its indices touch and keeps the positions it owns,
so a step costs O(p * n), not O(n), and the result does not depend on how the tensor is cut.
A gap is read off integer thresholds of the geometric CDF on the 32-bit word, built once on the
CPU, so no transcendental function whose last bit could differ between devices is involved.
"""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass
from typing import Sequence

import torch

from .coords import ShardCoords

BLOCK = 1 << 16
_MASK32 = 0xFFFFFFFF
_PHILOX_M0, _PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
_PHILOX_W0, _PHILOX_W1 = 0x9E3779B9, 0xBB67AE85

# Streams keep the update's masks and the reference delta's masks independent.
STREAM_UPDATE = 0
STREAM_REFERENCE = 1


def philox4x32(counter: list[torch.Tensor], key: tuple[int | torch.Tensor, int | torch.Tensor], rounds: int = 10) -> list[torch.Tensor]:
    """Philox-4x32 on int64 tensors holding 32-bit words; returns the four output words. The key
    words may be tensors broadcasting against the counter (a different key per row)."""
    c0, c1, c2, c3 = (c.to(torch.int64) & _MASK32 for c in counter)
    k0, k1 = key[0] & _MASK32, key[1] & _MASK32
    for r in range(rounds):
        if r:
            k0, k1 = (k0 + _PHILOX_W0) & _MASK32, (k1 + _PHILOX_W1) & _MASK32
        # Products of two 32-bit words wrap in int64; the masks recover the exact high/low words.
        lo0 = c0 * _PHILOX_M0
        lo1 = c2 * _PHILOX_M1
        hi0 = (lo0 >> 32).bitwise_and_(_MASK32).bitwise_xor_(c3).bitwise_xor_(k1)
        hi1 = (lo1 >> 32).bitwise_and_(_MASK32).bitwise_xor_(c1).bitwise_xor_(k0)
        c0, c1, c2, c3 = hi1, lo1.bitwise_and_(_MASK32), hi0, lo0.bitwise_and_(_MASK32)
    return [c0, c1, c2, c3]


def mask_key(seed: int, name: str) -> tuple[int, int]:
    """Philox key for a tensor: a stable hash of (seed, name), never Python's salted hash()."""
    digest = hashlib.blake2b(f"{seed}\x00{name}".encode(), digest_size=8).digest()
    word = int.from_bytes(digest, "little")
    return word & _MASK32, word >> 32


@functools.lru_cache(maxsize=16)
def gap_tables(keep_rate: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer thresholds of the geometric(p) gap on a 32-bit word, and a lookup by the top 16 bits
    (CPU, int64). Public because a fused kernel drawing the same masks must read the same tables.

    gap(w) = 1 + #{g : thresholds[g] <= w}, thresholds[g - 1] = ceil((1 - (1 - p)^g) * 2^32), which is
    P(gap <= g) to within 2^-32. A word's top 16 bits pin its gap down unless a threshold falls
    inside its bucket; such buckets are marked -1 and searched.
    """
    # Past (1 - p)^g < 2^-33 no word lies above the table; gaps past a block are all alike.
    reach = math.ceil(33 * math.log(2) / -math.log1p(-keep_rate)) + 1
    g = torch.arange(1, min(BLOCK, reach) + 1, dtype=torch.float64)
    thresholds = torch.ceil(-torch.expm1(g * math.log1p(-keep_rate)) * 2.0**32).to(torch.int64)
    bucket_lo = torch.arange(1 << 16, dtype=torch.int64) << 16
    gap_lo = torch.searchsorted(thresholds, bucket_lo, right=True) + 1
    gap_hi = torch.searchsorted(thresholds, bucket_lo + 0xFFFF, right=True) + 1
    return thresholds, torch.where(gap_lo == gap_hi, gap_lo, -1)


@functools.lru_cache(maxsize=16)
def _gap_tables_on(keep_rate: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(t.to(device) for t in gap_tables(keep_rate))


def _gaps(words: torch.Tensor, keep_rate: float) -> torch.Tensor:
    thresholds, lookup = _gap_tables_on(keep_rate, words.device)
    gaps = lookup[words >> 16]
    unresolved = gaps < 0
    if unresolved.any():
        gaps[unresolved] = torch.searchsorted(thresholds, words[unresolved], right=True) + 1
    return gaps


@dataclass(frozen=True)
class MaskDraw:
    """One keep-mask to draw: the positions of a shard (``coords``) kept at ``step`` in ``stream``
    by the mask of tensor ``name``."""

    seed: int
    name: str
    step: int
    stream: int
    coords: ShardCoords


def _calls_per_block(keep_rate: float) -> int:
    """Philox calls per block and round: enough that a second round is needed about once in 10^5 blocks."""
    expected = keep_rate * BLOCK
    return int((expected + 4.5 * math.sqrt(expected) + 8) / 4) + 1


def _block_positions(rows: _Rows, keep_rate: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Global indices kept in each row's block, sorted by (row, index), and the row of each (int64)."""
    device = rows.block.device
    calls = _calls_per_block(keep_rate)
    found, found_rows = [], []
    active = torch.arange(rows.block.numel(), device=device)
    cursor = torch.full_like(rows.block, -1)  # last kept position inside each block so far
    first_call = 0
    while active.numel():
        n = active.numel()
        block = rows.block[active, None]
        ctr = [
            torch.arange(first_call, first_call + calls, device=device, dtype=torch.int64).expand(n, calls),
            block.expand(n, calls),
            rows.step[active, None].expand(n, calls),
            rows.stream[active, None].expand(n, calls),
        ]
        # Each Philox call gives four 32-bit words: four consecutive gaps.
        words = philox4x32(ctr, (rows.key0[active, None], rows.key1[active, None]))
        words = torch.stack(words, dim=-1).reshape(n, 4 * calls)
        pos = cursor[:, None] + torch.cumsum(_gaps(words, keep_rate), dim=1)
        inside = pos < BLOCK
        per_row = inside.sum(dim=1)
        found.append(pos[inside] + (block[:, 0] * BLOCK).repeat_interleave(per_row))
        found_rows.append(active.repeat_interleave(per_row))
        more = inside[:, -1]  # the block's end was not reached: draw the next gaps
        cursor = pos[more, -1]
        active = active[more]
        first_call += calls
    if len(found) == 1:  # rows in order, each row ascending
        return found[0], found_rows[0]
    kept, row = torch.cat(found), torch.cat(found_rows)
    order = torch.sort(kept, stable=True).indices
    order = order[torch.sort(row[order], stable=True).indices]
    return kept[order], row[order]


@dataclass
class _Rows:
    """The 2^16-index blocks that some draws touch, one row per (draw, block)."""

    block: torch.Tensor
    key0: torch.Tensor
    key1: torch.Tensor
    step: torch.Tensor
    stream: torch.Tensor


ROWS_PER_BATCH_WORDS = 1 << 21
"""Philox output words per batch of draws (times ~10 int64 temporaries: tens of MiB), so that batching
the draws of a step never needs more memory than drawing its largest segment alone."""


def keep_positions_many(draws: Sequence[MaskDraw], keep_rate: float, device: torch.device | str | None = None) -> list[torch.Tensor]:
    """`keep_positions` of several draws, equal to drawing each alone bit for bit, in few Philox
    evaluations: a step of many small tensors is then not dominated by the overhead of a hundred
    small tensor operations per tensor."""
    if keep_rate >= 1.0:
        return [keep_positions(d.seed, d.name, d.step, d.stream, d.coords, keep_rate, device) for d in draws]
    spans = [d.coords.global_span() for d in draws]
    counts = [hi // BLOCK - lo // BLOCK + 1 if hi >= lo else 0 for lo, hi in spans]
    words_per_row = 4 * _calls_per_block(keep_rate)
    result: list[torch.Tensor] = []
    start = 0
    while start < len(draws):
        stop, rows = start + 1, counts[start]
        while stop < len(draws) and (rows + counts[stop]) * words_per_row <= ROWS_PER_BATCH_WORDS:
            rows += counts[stop]
            stop += 1
        result += _draw_batch(draws[start:stop], spans[start:stop], counts[start:stop], keep_rate, device)
        start = stop
    return result


def _draw_batch(
    draws: Sequence[MaskDraw], spans: list[tuple[int, int]], counts: list[int], keep_rate: float, device: torch.device | str | None
) -> list[torch.Tensor]:
    if not sum(counts):
        return [torch.empty(0, dtype=torch.int64, device=device) for _ in draws]
    per_draw = lambda values: torch.tensor(values, dtype=torch.int64).repeat_interleave(torch.tensor(counts)).to(device)  # noqa: E731
    keys = [mask_key(d.seed, d.name) for d in draws]
    rows = _Rows(
        block=torch.cat([torch.arange(lo // BLOCK, lo // BLOCK + c, dtype=torch.int64) for (lo, _), c in zip(spans, counts)]).to(device),
        key0=per_draw([k[0] for k in keys]),
        key1=per_draw([k[1] for k in keys]),
        step=per_draw([d.step for d in draws]),
        stream=per_draw([d.stream for d in draws]),
    )
    kept, row = _block_positions(rows, keep_rate)
    # Keep each draw's indices inside its own span; rows are grouped by draw, so what is left is
    # one run per draw, in draw order.
    inside = (kept >= per_draw([lo for lo, _ in spans])[row]) & (kept <= per_draw([hi for _, hi in spans])[row])
    kept, row = kept[inside], row[inside]
    sizes = torch.bincount(per_draw(list(range(len(draws))))[row], minlength=len(draws)).tolist()
    return [_local_positions(part, d.coords, lo) for part, d, (lo, _) in zip(torch.split(kept, sizes), draws, spans)]


def _local_positions(kept: torch.Tensor, coords: ShardCoords, lo: int) -> torch.Tensor:
    """The shard positions of kept global indices inside the shard's span (starting at ``lo``)."""
    if coords.is_contiguous:
        return kept - lo
    _, positions = coords.local_position(kept)
    return positions


def keep_positions(
    seed: int,
    name: str,
    step: int,
    stream: int,
    coords: ShardCoords,
    keep_rate: float,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Shard positions (sorted by global index) kept by the Bernoulli(keep_rate) mask, on ``device``."""
    if keep_rate >= 1.0:
        return torch.arange(coords.numel, dtype=torch.int64, device=device)
    lo, hi = coords.global_span()
    if hi < lo:
        return torch.empty(0, dtype=torch.int64, device=device)
    return keep_positions_many([MaskDraw(seed, name, step, stream, coords)], keep_rate, device)[0]
