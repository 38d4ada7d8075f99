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

import torch

from .coords import ShardCoords

BLOCK = 1 << 16
_MASK32 = 0xFFFFFFFF
_PHILOX_M0, _PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
_PHILOX_W0, _PHILOX_W1 = 0x9E3779B9, 0xBB67AE85

# Streams keep the update's masks and the reference delta's masks independent.
STREAM_UPDATE = 0
STREAM_REFERENCE = 1


def philox4x32(counter: list[torch.Tensor], key: tuple[int, int], rounds: int = 10) -> list[torch.Tensor]:
    """Philox-4x32 on int64 tensors holding 32-bit words; returns the four output words."""
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


def _block_positions(key: tuple[int, int], step: int, stream: int, blocks: torch.Tensor, keep_rate: float) -> torch.Tensor:
    """Sorted global indices kept in the given blocks (int64)."""
    device = blocks.device
    expected = keep_rate * BLOCK
    # Philox calls per block and round: enough that a second round is needed about once in 10^5 blocks.
    calls = int((expected + 4.5 * math.sqrt(expected) + 8) / 4) + 1
    found = []
    active = blocks
    cursor = torch.full_like(blocks, -1)  # last kept position inside each block so far
    first_call = 0
    while active.numel():
        rows = active.numel()
        ctr = [
            torch.arange(first_call, first_call + calls, device=device, dtype=torch.int64).expand(rows, calls),
            active[:, None].expand(rows, calls),
            torch.full((rows, calls), step, dtype=torch.int64, device=device),
            torch.full((rows, calls), stream, dtype=torch.int64, device=device),
        ]
        # Each Philox call gives four 32-bit words: four consecutive gaps.
        words = torch.stack(philox4x32(ctr, key), dim=-1).reshape(rows, 4 * calls)
        pos = cursor[:, None] + torch.cumsum(_gaps(words, keep_rate), dim=1)
        inside = pos < BLOCK
        found.append(pos[inside] + (active * BLOCK).repeat_interleave(inside.sum(dim=1)))
        more = inside[:, -1]  # the block's end was not reached: draw the next gaps
        cursor = pos[more, -1]
        active = active[more]
        first_call += calls
    if len(found) == 1:  # rows are blocks in ascending order, each row ascending
        return found[0]
    return torch.sort(torch.cat(found)).values


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
    blocks = torch.arange(lo // BLOCK, hi // BLOCK + 1, dtype=torch.int64, device=device)
    kept = _block_positions(mask_key(seed, name), step, stream, blocks, keep_rate)
    kept = kept[(kept >= lo) & (kept <= hi)]
    if coords.is_contiguous:
        return kept - lo
    _, positions = coords.local_position(kept)
    return positions
