"""Gather and add at sparse positions of a 1-D tensor.

`index_select` and `index_add_` give the same bits as ``t[positions]`` and ``t[positions] += v``
for distinct positions (each element is read, or gets one addition, once), and on a CPU they are
2-5x faster than advanced indexing, which goes through the general multi-dimensional index
machinery. The merge reads and adds at about p of each tensor's elements every step.
"""

from __future__ import annotations

import torch


def gather(source: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``source[positions]`` for a 1-D source and 1-D integer positions."""
    return source.index_select(0, positions)


def add_at(target: torch.Tensor, positions: torch.Tensor, values: torch.Tensor) -> None:
    """``target[positions] += values`` in place, for distinct positions of a 1-D target."""
    if values.dtype == target.dtype:
        target.index_add_(0, positions, values)
    else:  # rounded once to target's dtype after an add in the wider type, as `+=` does
        target.index_copy_(0, positions, target.index_select(0, positions).add_(values))
