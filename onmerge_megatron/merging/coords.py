"""Where the elements of a shard sit in the full, unsharded tensor.

Every framework hands the optimizer a different piece of a weight: Megatron a flat range of a
tensor-parallel block, ZeRO a flat range of the flattened weight, FSDP2 a row block. All of them
are described here the same way, so that masks and tie-breaks can be keyed by an element's
global index (its row-major position in the full tensor) whatever the layout.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch


def _strides(shape: tuple[int, ...]) -> list[int]:
    strides, acc = [], 1
    for size in reversed(shape):
        strides.append(acc)
        acc *= size
    return strides[::-1]


@dataclass(frozen=True)
class Block:
    """A row-major block of the global tensor stored contiguously in the local tensor."""

    local_start: int
    """Flat offset of the block's first element in the local tensor."""
    shape: tuple[int, ...]
    offset: tuple[int, ...]
    """Offset of the block in the global tensor, per dimension."""

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class ShardCoords:
    """Elements ``[start, end)`` of a local tensor made of ``blocks`` of a global tensor."""

    global_shape: tuple[int, ...]
    blocks: tuple[Block, ...]
    start: int
    end: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "global_shape", tuple(int(s) for s in self.global_shape))
        expected = 0
        for block in self.blocks:
            if block.local_start != expected:
                raise ValueError(f"blocks must tile the local tensor in order: expected start {expected}, got {block.local_start}")
            if len(block.shape) != len(self.global_shape) or any(
                o < 0 or o + s > g for o, s, g in zip(block.offset, block.shape, self.global_shape)
            ):
                raise ValueError(f"block {block} does not fit in global shape {self.global_shape}")
            expected += block.numel
        if not 0 <= self.start <= self.end <= expected:
            raise ValueError(f"shard range [{self.start}, {self.end}) is outside the local tensor of {expected} elements")

    # Constructors for the common layouts.
    @classmethod
    def full(cls, shape: tuple[int, ...] | torch.Size) -> "ShardCoords":
        """The whole tensor (single process, DDP)."""
        shape = tuple(shape)
        block = Block(0, shape, (0,) * len(shape))
        return cls(shape, (block,), 0, block.numel)

    @classmethod
    def flat_range(cls, shape: tuple[int, ...] | torch.Size, start: int, end: int) -> "ShardCoords":
        """Elements ``[start, end)`` of the flattened full tensor (ZeRO partitions)."""
        shape = tuple(shape)
        return cls(shape, (Block(0, shape, (0,) * len(shape)),), start, end)

    @classmethod
    def block(
        cls,
        global_shape: tuple[int, ...],
        local_shape: tuple[int, ...],
        offset: tuple[int, ...],
        start: int = 0,
        end: int | None = None,
    ) -> "ShardCoords":
        """A block of the global tensor (TP split, FSDP row shard), optionally a flat range of it."""
        block = Block(0, tuple(local_shape), tuple(offset))
        return cls(tuple(global_shape), (block,), start, block.numel if end is None else end)

    @property
    def numel(self) -> int:
        return self.end - self.start

    @property
    def global_numel(self) -> int:
        return math.prod(self.global_shape)

    @functools.cached_property
    def is_contiguous(self) -> bool:
        """True when shard position i is global index ``global_span()[0] + i``."""
        lo, hi = self.global_span()
        # Indices are distinct and increase within a block, so one block spanning exactly
        # numel indices is one run.
        return len(self.blocks) == 1 and hi - lo + 1 == self.numel

    def global_index(self, positions: torch.Tensor) -> torch.Tensor:
        """Global flat indices of shard positions (0 = element ``start`` of the local tensor)."""
        if self.is_contiguous:  # one run of global indices (a whole tensor, a flat range, a row block)
            return positions.to(torch.int64) + self.global_span()[0]
        return self._block_global_index(positions)

    def _block_global_index(self, positions: torch.Tensor) -> torch.Tensor:
        """`global_index` through each block's row-major coordinates (any layout)."""
        local = positions.to(torch.int64) + self.start
        out = torch.empty_like(local)
        gstrides = _strides(self.global_shape)
        for block in self.blocks:
            inside = (local >= block.local_start) & (local < block.local_start + block.numel)
            rem = local[inside] - block.local_start
            acc = torch.zeros_like(rem)
            for size, lstride, gstride, off in zip(block.shape, _strides(block.shape), gstrides, block.offset):
                coord = torch.div(rem, lstride, rounding_mode="floor") % size if size > 1 else torch.zeros_like(rem)
                acc += (coord + off) * gstride
            out[inside] = acc
        return out

    def global_span(self) -> tuple[int, int]:
        """Smallest and largest global index in the shard (blocks are monotone in row-major order)."""
        return self._span

    # Coordinates are immutable and asked for at every step: computed once (cached_property writes
    # the instance __dict__ directly, which a frozen dataclass allows).
    @functools.cached_property
    def _span(self) -> tuple[int, int]:
        lo, hi = None, None
        for block in self.blocks:
            first = max(self.start, block.local_start)
            last = min(self.end, block.local_start + block.numel) - 1
            if first > last:
                continue
            ends = self._block_global_index(torch.tensor([first - self.start, last - self.start]))
            lo = int(ends[0]) if lo is None else min(lo, int(ends[0]))
            hi = int(ends[1]) if hi is None else max(hi, int(ends[1]))
        if lo is None:
            return 0, -1
        return lo, hi

    def local_position(self, global_indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Map global indices to shard positions: returns (in_shard mask, positions of those inside)."""
        g = global_indices.to(torch.int64)
        in_shard = torch.zeros_like(g, dtype=torch.bool)
        pos = torch.zeros_like(g)
        gstrides = _strides(self.global_shape)
        for block in self.blocks:
            inside = torch.ones_like(g, dtype=torch.bool)
            local = torch.zeros_like(g)
            for size, lstride, gstride, gsize, off in zip(
                block.shape, _strides(block.shape), gstrides, self.global_shape, block.offset
            ):
                coord = torch.div(g, gstride, rounding_mode="floor") % gsize - off
                inside &= (coord >= 0) & (coord < size)
                local += coord * lstride
            local += block.local_start - self.start
            inside &= (local >= 0) & (local < self.numel)
            pos = torch.where(inside, local, pos)
            in_shard |= inside
        return in_shard, pos[in_shard]

    def gather(self, full: torch.Tensor) -> torch.Tensor:
        """This shard's elements of a full tensor of ``global_shape`` (used at setup only)."""
        if tuple(full.shape) != self.global_shape:
            raise ValueError(f"expected a tensor of shape {self.global_shape}, got {tuple(full.shape)}")
        flat = full.reshape(-1)
        if self.is_contiguous:
            lo, _ = self.global_span()
            return flat[lo : lo + self.numel]
        return flat[self.global_index(torch.arange(self.numel))]
