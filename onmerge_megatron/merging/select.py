"""Exact per-tensor top-k thresholds for many tensors split over the ranks of one process group.

OnTIES keeps, per tensor, the k largest |x| with ties going to the lower global index
(`sparsify.top_k_threshold`). Under a sharded optimizer a rank may hold none, one or several
pieces of a tensor, and replicas of it; the threshold is then found here by a radix select run for
all tensors at once. In each round every rank counts, per tensor, the next 8-bit digit of the keys
still in the running, one all-reduce sums the [tensors, 256] counts, and every rank reads the same
digit off the same sums, so all ranks keep taking the same branches and calling the same
collectives.

Non-negative float32 values order like their int32 bit patterns, so four rounds over the 31
significant bits pin each tensor's k-th largest magnitude exactly (bf16 and fp16 widen to float32
exactly). Among elements equal to it, the `need` lowest global indices are kept: the same select
over int64 global indices, ceil(log2(numel) / 8) rounds, replaced by one max-reduction when every
tensor keeps all its ties. The collectives of a call are at most 4 + that, whatever the number of
tensors or their layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from .sparsify import IndexMap, TopKThreshold

RADIX_BITS = 8
"""Digit width of a round: a round reduces [tensors, 2**RADIX_BITS] int64 counts."""
_BINS = 1 << RADIX_BITS
_MAGNITUDE_BITS = 31
"""A non-negative float32's bit pattern: the sign bit is clear."""

AllReduce = Callable[..., Any]
"""``torch.distributed.all_reduce``'s signature: (tensor, op=..., group=...), in place."""


@dataclass(frozen=True)
class Piece:
    """One rank's piece of one tensor."""

    tensor: int
    """Index of the tensor in the list every rank of the group agrees on."""
    magnitude: Callable[[], torch.Tensor]
    """This rank's 1-D non-negative magnitudes of the piece (float32, bf16 or fp16). Called once
    per round, so it may recompute them into a reused buffer: pieces are never all held at once."""
    global_index: IndexMap
    """Positions in the piece -> global indices in the tensor (`ShardCoords.global_index`)."""
    counted: bool = True
    """False on a replica whose elements another rank counts (a TP-replicated tensor on TP rank > 0)."""


def _digit_rounds(bits: int) -> list[tuple[int, int]]:
    """(low, high) bit range of each round's digit, most significant first."""
    rounds, high = [], bits
    while high > 0:
        low = max(0, high - RADIX_BITS)
        rounds.append((low, high))
        high = low
    return rounds


def _magnitude_bits(magnitude: torch.Tensor) -> torch.Tensor:
    if magnitude.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"tensor_thresholds: magnitudes must be float32, bfloat16 or float16, got {magnitude.dtype}")
    return magnitude.float().view(torch.int32)


Keys = Callable[[Piece, int], torch.Tensor]
"""The keys a piece offers to the select of its tensor (given the tensor's row)."""


def _histogram(
    keys_of: Keys, pieces: Sequence[Piece], rows: dict[int, int], prefix: list[int], low: int, high: int, device: Any
) -> torch.Tensor:
    """This rank's counts, per tensor row, of the digit [low, high) of keys whose bits above it equal the prefix."""
    bins = 1 << (high - low)
    counts = torch.zeros(len(prefix), _BINS, dtype=torch.int64, device=device)
    for piece in pieces:
        row = rows[piece.tensor]
        # key >> low is (bits above high, digit); minus the prefix's, a key matching the prefix
        # lands on its digit in [0, bins), a smaller key below 0 and a larger one at bins or above.
        # Shifted by one and clamped, those two fall in the end bins, which are dropped: no masked
        # copy is made. (A negative magnitude's key is smaller than any: it is dropped, and the
        # coverage check refuses the call.)
        digits = keys_of(piece, row) >> low
        digits.sub_((prefix[row] >> low) - 1).clamp_(0, bins + 1)
        counts[row, :bins] += torch.bincount(digits, minlength=bins + 2)[1 : bins + 1].to(device)
    return counts


def _radix_select(
    keys_of: Keys,
    pieces: Sequence[Piece],
    rows: dict[int, int],
    ranks: torch.Tensor,
    totals: torch.Tensor,
    bits: int,
    what: str,
    group: Any,
    all_reduce: AllReduce,
    device: Any,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row, the ranks[row]-th smallest key over all ranks' pieces (1-based).

    Returns the keys, their rank among the keys equal to them, how many keys equal them, and which
    rows no rank offered any key for (absent from this call: an optimizer stepping its tensors in
    sub-groups, one call each). ``totals`` (keys per row over the group) is checked on the first
    round's sums: a row is offered whole or not at all.
    """
    prefix = torch.zeros_like(ranks)
    absent = torch.zeros_like(ranks, dtype=torch.bool)
    for round_number, (low, high) in enumerate(_digit_rounds(bits)):
        counts = _histogram(keys_of, pieces, rows, prefix.tolist(), low, high, device)
        all_reduce(counts, group=group)
        counts = counts.cpu()
        if round_number == 0:
            absent = counts.sum(1) == 0
        # An absent row's answer is never read: its keys are taken as all 0 so the arithmetic runs.
        counts[absent, 0] = totals[absent]
        if round_number == 0 and not torch.equal(counts.sum(1), totals):
            row = int(torch.nonzero(counts.sum(1) != totals)[0])
            tensor = next(t for t, r in rows.items() if r == row)
            raise ValueError(
                f"tensor_thresholds: tensor {tensor}: the counted pieces hold {int(counts[row].sum())} {what}, "
                f"expected {int(totals[row])} (counted pieces must cover each tensor exactly once, magnitudes non-negative)"
            )
        cumulative = counts.cumsum(1)
        digit = (cumulative < ranks[:, None]).sum(1)  # the first digit whose cumulative count reaches the rank
        below = torch.where(digit > 0, cumulative.gather(1, (digit - 1).clamp(min=0)[:, None]).squeeze(1), 0)
        ranks = ranks - below
        prefix = prefix | (digit << low)
        equal = counts.gather(1, digit[:, None]).squeeze(1)
    return prefix, ranks, equal, absent


def _max_key(
    keys_of: Keys, pieces: Sequence[Piece], rows: dict[int, int], group: Any, all_reduce: AllReduce, device: Any
) -> torch.Tensor:
    """Per row, the largest key over all ranks' pieces (-1 where there is none)."""
    largest = torch.full((len(rows),), -1, dtype=torch.int64, device=device)
    for piece in pieces:
        keys = keys_of(piece, rows[piece.tensor])
        if keys.numel():
            row = rows[piece.tensor]
            largest[row] = torch.maximum(largest[row], keys.max().to(device))
    all_reduce(largest, op=dist.ReduceOp.MAX, group=group)
    return largest.cpu()


def tensor_thresholds(
    pieces: Sequence[Piece],
    ks: Sequence[int],
    numels: Sequence[int],
    group: Any = None,
    *,
    all_reduce: AllReduce | None = None,
    device: Any = "cpu",
) -> list[TopKThreshold | None]:
    """Per tensor, the threshold `top_k_threshold` returns on the whole tensor in one process.

    Every rank of ``group`` calls this with the same ``ks`` and ``numels`` (k and element count of
    every tensor) and its own pieces, zero or more per tensor; the counted pieces of a tensor must
    cover it exactly once. ``above_threshold(piece.magnitude(), result[piece.tensor],
    piece.global_index)`` is then this rank's share of the tensor's top k (a replica's share too).
    None where every element is kept (k < 1 or k >= numel), and for a tensor no rank offers a
    piece of in this call (an optimizer stepping its tensors in sub-groups, one call each). ``device`` holds the reduced counts (a
    CUDA device under NCCL). Collectives: none if no tensor has 1 <= k < numel, else at most
    4 + ceil(log2(max numel) / 8), each of at most 8 * 256 bytes per such tensor. Pieces of tensors
    with k < 1 or k >= numel are not read. Magnitudes of another dtype raise TypeError on the ranks
    holding them, before their first collective (a caller's bug: the other ranks are left waiting).
    """
    if len(ks) != len(numels):
        raise ValueError(f"tensor_thresholds: expected one k per tensor ({len(numels)} tensors), got {len(ks)}")
    selected = [t for t, (k, n) in enumerate(zip(ks, numels)) if 1 <= k < n]
    thresholds: list[TopKThreshold | None] = [None] * len(ks)
    if not selected:
        return thresholds
    rows = {t: row for row, t in enumerate(selected)}
    counted = [piece for piece in pieces if piece.counted and piece.tensor in rows]
    k = torch.tensor([ks[t] for t in selected], dtype=torch.int64)
    numel = torch.tensor([numels[t] for t in selected], dtype=torch.int64)
    # Looked up at call time, so that a caller counting torch.distributed's collectives sees these.
    common = dict(group=group, all_reduce=all_reduce if all_reduce is not None else dist.all_reduce, device=device)

    # The k-th largest magnitude is the (n - k + 1)-th smallest.
    magnitude_keys = lambda piece, row: _magnitude_bits(piece.magnitude())  # noqa: E731
    value_bits, rank_among_equal, equal, absent = _radix_select(
        magnitude_keys, counted, rows, numel - k + 1, numel, _MAGNITUDE_BITS, "elements", **common
    )
    # How many of the elements equal to the k-th are kept (all, for a tensor absent from this call).
    need = torch.where(absent, equal, equal + 1 - rank_among_equal)
    value_bits_list = value_bits.tolist()

    def tie_indices(piece: Piece, row: int) -> torch.Tensor:
        bits = _magnitude_bits(piece.magnitude())
        return piece.global_index(torch.nonzero(bits == value_bits_list[row]).squeeze(1)).to(torch.int64)

    if torch.equal(need, equal):  # every tie kept: the threshold index is the largest tie's
        index = _max_key(tie_indices, counted, rows, **common)
    else:
        index_bits = max(1, (int(numel.max()) - 1).bit_length())
        index, _, _, _ = _radix_select(tie_indices, counted, rows, need, equal, index_bits, "tied elements", **common)
    values = value_bits.to(torch.int32).view(torch.float32)
    for t, row in rows.items():
        if not absent[row]:
            thresholds[t] = TopKThreshold(float(values[row]), int(index[row]))
    return thresholds
