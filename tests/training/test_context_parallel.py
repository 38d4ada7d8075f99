"""Context parallelism: the load-balanced split of a row over CP ranks, and the per-sequence
log-prob sums completed over the CP group (real gloo processes) against the unsplit sums.

CP attention itself needs Transformer Engine on GPUs; the split and the reduction of the sums
do not, and are what the losses see."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from distributed import init_single_process_group, run_distributed
from onmerge_megatron.training.config import ConfigError, config_from_dict, validate
from onmerge_megatron.training.context_parallel import (
    context_parallel_positions,
    sequence_logps,
    split_for_context_parallel,
)
from onmerge_megatron.training.data import Batch, sequence_sums


@pytest.mark.parametrize("cp_size", [2, 4])
def test_positions_match_megatrons_split(cp_size):
    """The same positions as megatron-core's get_batch_on_this_cp_rank, and every position on
    exactly one rank."""
    from megatron.core.utils import get_batch_on_this_cp_rank

    init_single_process_group()  # megatron reads a group's size only with torch.distributed up
    width = 8 * cp_size
    row = torch.arange(width).unsqueeze(0)
    seen = []
    for rank in range(cp_size):
        ours = context_parallel_positions(width, cp_size, rank)
        theirs = get_batch_on_this_cp_rank({"tokens": row.clone()}, _FakeGroup(cp_size, rank))["tokens"][0]
        assert ours.tolist() == theirs.tolist()
        seen += ours.tolist()
    assert sorted(seen) == list(range(width))


class _FakeGroup:
    """Size and rank, which is all get_batch_on_this_cp_rank asks a group (no collective)."""

    def __init__(self, size: int, rank: int):
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank


def test_a_row_that_does_not_split_evenly_is_refused():
    with pytest.raises(ValueError, match=r"10 positions does not split into 2 x context_parallel = 4"):
        context_parallel_positions(10, 2, 0)


def thd_partition(cu_seqlens_padded: torch.Tensor, cp_size: int, cp_rank: int) -> torch.Tensor:
    """What Transformer Engine's thd_get_partitioned_indices returns, written out: every padded
    THD segment cut into 2 x CP chunks, rank r taking chunks r and 2 x CP - 1 - r of each."""
    out = []
    for start, end in zip(cu_seqlens_padded[:-1].tolist(), cu_seqlens_padded[1:].tolist()):
        out.append(start + context_parallel_positions(end - start, cp_size, cp_rank))
    return torch.cat(out)


@pytest.mark.skipif(importlib.util.find_spec("transformer_engine_torch") is None or not torch.cuda.is_available(),
                    reason="Transformer Engine's thd_get_partitioned_indices needs transformer_engine and a GPU")
def test_thd_partition_is_transformer_engines():
    from onmerge_megatron.megatron.compat import thd_partitioned_indices

    padded = torch.tensor([0, 8, 12, 28, 32], dtype=torch.int32, device="cuda")
    for rank in range(2):
        ours = thd_partition(padded.cpu(), 2, rank)
        assert thd_partitioned_indices(padded, 32, 2, rank).cpu().tolist() == ours.tolist()


def _batch(seed: int, packed: bool | str) -> tuple[Batch, torch.Tensor]:
    """A micro-batch of 3 sequences (one a row, or packed in 2 rows) of width 16, or ("thd") 8
    pairs packed with slots of 4 positions and laid end to end as one THD row; and per-position
    log-probs for it."""
    if packed == "thd":
        from onmerge_megatron.training.data import Example, collate_packed
        from onmerge_megatron.training.forward_backward import flatten_rows

        g = torch.Generator().manual_seed(seed)
        sizes = torch.randint(2, 30, (8, 3), generator=g).tolist()
        examples = [Example(i, [5] * p, [[6] * c, [7] * r]) for i, (p, c, r) in enumerate(sizes)]
        batch = flatten_rows(collate_packed(examples, list(range(8)), "pairs", 0, 80, 120, multiple=4, sequence_multiple=4))
        return batch, -torch.rand(batch.input_ids.shape, generator=g, dtype=torch.float64) * 5
    g = torch.Generator().manual_seed(seed)
    rows, width = (2, 16) if packed else (3, 16)
    mask = (torch.rand(rows, width, generator=g) > 0.3).float()
    index = None
    if packed:
        index = torch.tensor([[0] * 7 + [1] * 6 + [-1] * 3, [2] * 11 + [-1] * 5])
        mask = mask * (index >= 0)
    ids = torch.zeros(rows, width, dtype=torch.long)
    batch = Batch(ids, ids.clone(), mask, torch.arange(width).expand(rows, width).clone(), torch.arange(3),
                  sequence_index=index, packed_sequences=3 if packed else 0)
    logps = -torch.rand(rows, width, generator=g, dtype=torch.float64) * 5
    return batch, logps


def _reduce_over_cp(rank: int, world_size: int, packed: bool) -> dict:
    from onmerge_megatron.megatron.cpu import initialize_cpu_model_parallel
    from onmerge_megatron.training.context_parallel import context_parallel_group

    initialize_cpu_model_parallel(context_parallel_size=world_size)
    group = context_parallel_group()
    batch, logps = _batch(0, packed)
    if packed == "thd":
        from onmerge_megatron.training.forward_backward import thd_boundaries

        index = thd_partition(thd_boundaries(batch.segments)[1], world_size, rank)
        local = split_for_context_parallel(batch, world_size, rank, index)
    else:
        index = context_parallel_positions(logps.shape[1], world_size, rank)
        local = split_for_context_parallel(batch, world_size, rank)
    local_logps = logps.index_select(1, index).requires_grad_(True)
    sums, lengths = sequence_logps(local_logps, local, group)
    # A loss that is not linear in the sums, like DPO's: its gradient must reach this rank's
    # positions as the unsplit loss's gradient at those positions.
    loss = torch.nn.functional.logsigmoid(0.1 * (sums[0] - sums[1] + sums[-1])).neg()
    loss.backward()
    return {"sums": sums.detach(), "lengths": lengths, "grad": local_logps.grad, "index": index, "loss": loss.item()}


@pytest.mark.slow
@pytest.mark.parametrize("packed", [False, True, "thd"])
def test_sums_over_two_context_parallel_ranks_equal_the_unsplit_sums(packed):
    results = run_distributed(_reduce_over_cp, 2, packed)
    batch, logps = _batch(0, packed)
    logps.requires_grad_(True)
    expected = sequence_sums(logps * batch.loss_mask, batch)
    loss = torch.nn.functional.logsigmoid(0.1 * (expected[0] - expected[1] + expected[-1])).neg()
    loss.backward()
    lengths = sequence_sums(batch.loss_mask, batch)
    grad = torch.zeros_like(logps)
    for out in results:
        torch.testing.assert_close(out["sums"], expected.detach(), rtol=1e-12, atol=0)
        torch.testing.assert_close(out["lengths"], lengths, rtol=0, atol=0)
        assert out["loss"] == pytest.approx(loss.item(), rel=1e-12)
        grad[:, out["index"]] += out["grad"]
    # Each rank's gradient covers its own positions; together they are the unsplit gradient.
    torch.testing.assert_close(grad, logps.grad, rtol=1e-12, atol=0)
    assert (logps.grad != 0).any()


def _cfg(**sections):
    tree = {"model": {"hf_path": "m"}, "data": {"train_files": ["t.jsonl"]}, "parallel": {"global_batch_size": 8}}
    for key, value in sections.items():
        tree.setdefault(key, {}).update(value)
    return config_from_dict(tree)


def test_context_parallel_needs_transformer_engine_attention():
    with pytest.raises(ConfigError, match=r"'parallel.context_parallel' is 2 but model.transformer_impl is 'local'"):
        validate(_cfg(parallel={"context_parallel": 2}, model={"transformer_impl": "local"}), check_paths=False)
    with pytest.raises(ConfigError, match=r"'parallel.context_parallel' must be >= 1, got 0"):
        validate(_cfg(parallel={"context_parallel": 0}), check_paths=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_context_parallel_refused_where_auto_builds_the_local_spec():
    with pytest.raises(ConfigError, match=r"'parallel.context_parallel' is 2 but this machine builds megatron-core's local"):
        validate(_cfg(parallel={"context_parallel": 2}), world_size=2, check_paths=False, check_devices=True)


def test_world_size_must_divide_by_tp_pp_cp():
    cfg = _cfg(parallel={"context_parallel": 2, "tensor_parallel": 2}, model={"transformer_impl": "transformer_engine"})
    with pytest.raises(ConfigError, match=r"2 x 1 x 2 = 4 does not divide the world size 6"):
        validate(cfg, world_size=6, check_paths=False)
    validate(cfg, world_size=8, check_paths=False)  # data parallel 2: global batch 8 = 1 x 4 x 2
    with pytest.raises(ConfigError, match=r"multiple of parallel.micro_batch_size x data-parallel size \(1 x 3\)"):
        validate(cfg, world_size=12, check_paths=False)
