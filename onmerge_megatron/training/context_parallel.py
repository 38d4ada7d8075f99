"""Per-sequence log-prob sums under context parallelism, and the batch split it needs.

With context parallelism (CP) every sequence is split over the CP ranks along its positions, in
megatron's load-balanced layout: the row is cut into 2 x CP equal chunks and rank r holds chunks
r and 2 x CP - 1 - r (causal attention makes late chunks costlier; pairing an early with a late
one balances the work). Packed THD rows are split so sequence by sequence, as Transformer
Engine's thd_get_partitioned_indices does. Each rank then has the token log-probs of its own
positions only, so the per-sequence sums the preference losses need are partial: they are
all-reduced over the CP group before the loss. The loss is then the same on every CP rank; megatron's schedule multiplies it
by the CP size and DDP averages the gradients over data x context parallel ranks, so the reduce's
backward passes each rank's gradient through unchanged (each rank backpropagates into its own
positions; attention's backward carries the rest across ranks).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from .data import Batch, sequence_sums

# Batch fields that hold one value per position ([rows, positions]) and are split over CP ranks.
PER_POSITION = ("input_ids", "labels", "loss_mask", "position_ids", "sequence_index")


def context_parallel_positions(width: int, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Indices of the positions of a row of `width` that CP rank `cp_rank` of `cp_size` holds
    (chunks cp_rank and 2 x cp_size - 1 - cp_rank of 2 x cp_size equal chunks)."""
    chunks = 2 * cp_size
    if width % chunks:
        raise ValueError(f"a row of {width} positions does not split into 2 x context_parallel = {chunks} equal chunks")
    size = width // chunks
    first, second = cp_rank * size, (chunks - 1 - cp_rank) * size
    return torch.cat([torch.arange(first, first + size), torch.arange(second, second + size)])


def split_for_context_parallel(batch: Batch, cp_size: int, cp_rank: int, index: torch.Tensor | None = None) -> Batch:
    """This CP rank's positions of every per-position tensor of `batch`: `index`, by default
    `context_parallel_positions` of its rows (padded to a multiple of 2 x cp_size); per-example
    fields are kept whole."""
    if cp_size == 1:
        return batch
    if index is None:
        index = context_parallel_positions(batch.input_ids.shape[1], cp_size, cp_rank)
    index = index.to(batch.input_ids.device)
    return dataclasses.replace(batch, **{name: getattr(batch, name).index_select(1, index)
                                         for name in PER_POSITION if getattr(batch, name) is not None})


class _SumOverGroup(torch.autograd.Function):
    """All-reduce (sum) whose backward is the identity: every rank's loss is the same function
    of the reduced sums, and each rank's gradient flows into its own positions only."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        out = tensor.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def sum_over_context_parallel(local: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Sum per-sequence partial sums over the CP group (unchanged without one, or of size 1)."""
    if group is None or dist.get_world_size(group) == 1:
        return local
    return _SumOverGroup.apply(local, group)


def context_parallel_group() -> dist.ProcessGroup | None:
    """megatron's CP group, None when CP is off."""
    from megatron.core import parallel_state as ps

    return ps.get_context_parallel_group() if ps.get_context_parallel_world_size() > 1 else None


def sequence_logps(token_logps: torch.Tensor, batch: Batch, group: dist.ProcessGroup | None) -> tuple[torch.Tensor, torch.Tensor]:
    """([S] summed completion log-probs, [S] completion lengths) of every sequence of `batch`,
    from per-position log-probs [R, T] of this rank's positions: packed rows are told apart by
    `batch.sequence_index`, and partial sums are completed over the CP `group`."""
    logps = sum_over_context_parallel(sequence_sums(token_logps * batch.loss_mask, batch), group)
    lengths = sequence_sums(batch.loss_mask, batch)
    if group is not None and dist.get_world_size(group) > 1:
        lengths = lengths.clone()
        dist.all_reduce(lengths, group=group)
    return logps, lengths
