"""The multi-process harness: results in rank order, a failing rank's traceback in the test, a
hung run stopped with its stack."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

from distributed import RankFailed, run_distributed

pytestmark = pytest.mark.slow  # starts processes


def _sum_of_ranks(rank: int, world_size: int, offset: int) -> tuple[int, float]:
    total = torch.tensor([float(rank)])
    dist.all_reduce(total)
    return rank + offset, float(total)


def _fails_on_rank_one(rank: int, world_size: int) -> None:
    if rank == 1:
        raise ValueError("rank one's own error")
    dist.barrier()  # rank 0 waits for a rank that never comes: the harness must stop it


def _hangs_on_rank_zero(rank: int, world_size: int) -> None:
    if rank == 0:
        time.sleep(3600)


def test_results_come_back_in_rank_order() -> None:
    assert run_distributed(_sum_of_ranks, 3, 10) == [(10, 3.0), (11, 3.0), (12, 3.0)]


def test_a_failing_rank_fails_the_call_with_its_traceback() -> None:
    with pytest.raises(RankFailed) as failure:
        run_distributed(_fails_on_rank_one, 2)
    message = str(failure.value)
    assert "_fails_on_rank_one failed on rank 1 of 2" in message
    assert "ValueError: rank one's own error" in message
    assert 'raise ValueError("rank one\'s own error")' in message  # the source line, from the traceback


def test_a_hung_run_times_out_with_the_stack_of_the_hung_rank() -> None:
    # The timeout covers starting the ranks too (imports: seconds, tens on a loaded machine), so
    # it leaves rank 0 time to reach the hanging call.
    start = time.monotonic()
    with pytest.raises(TimeoutError) as hang:
        run_distributed(_hangs_on_rank_zero, 2, timeout=30)
    assert time.monotonic() - start < 90
    message = str(hang.value)
    assert "_hangs_on_rank_zero at world size 2: ranks [0" in message
    assert "in _hangs_on_rank_zero" in message  # faulthandler's dump of where rank 0 was
