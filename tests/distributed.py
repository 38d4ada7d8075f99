"""The one way the tests start several processes: N gloo ranks on CPU (real torch.distributed).

``run_distributed(fn, world_size, *args)`` calls ``fn(rank, world_size, *args)`` on every rank and
returns each rank's result. The DeepSpeed and Megatron harnesses run their scenarios and jobs
through it. Ranks meet through a ``file://`` store in a fresh directory, so no port is chosen and
no two runs can collide. A rank that raises fails the call with that rank's traceback; a run that
outlives its timeout is killed and fails with every live rank's stack (a hung collective shows
where it hung) instead of hanging the test session.

Runs that must be started the way users start them go through ``torchrun_command`` (torchrun
``--standalone`` picks its own free port) or ``single_rank_env`` (one rank, port 0: the store
binds any free port, and no other rank needs to find it).
"""

from __future__ import annotations

import datetime
import faulthandler
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# A matrix product's summation order, and so its bits, depends on the intra-op thread count: ranks
# compared bit for bit with a single-process reference run with this many, and the reference too
# (torch_threads), whatever count the test process was left with.
THREADS = 1
# Seconds a multi-process run may take before it counts as hung. Generous: on a loaded 2-core
# machine a DeepSpeed or megatron-core start-up alone takes tens of seconds.
TIMEOUT = 600.0
# How long after a rank's stack dump the parent kills it: time to write the dump.
_DUMP_GRACE = 10.0


class RankFailed(RuntimeError):
    """A rank of a multi-process run raised or died; the message holds its traceback."""


@contextmanager
def torch_threads(threads: int = THREADS) -> Iterator[None]:
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def init_single_process_group() -> None:
    """A one-rank gloo group in this process (for readers that insist on one), with an in-memory
    store: nothing to rendezvous with, so no port and no file."""
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


def single_rank_env() -> dict[str, str]:
    """Environment for one process that initializes torch.distributed from env:// (the Hugging
    Face Trainer does). MASTER_PORT 0: rank 0's store binds a free port; nobody else connects."""
    return dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="0", OMP_NUM_THREADS=str(THREADS))


def torchrun_command(nproc: int, args: list[str]) -> tuple[list[str], dict[str, str]]:
    """Command and environment to run ``args`` under torchrun, as users launch a run."""
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS), PYTHONWARNINGS="ignore")
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *args], env


def _rank_main(rank: int, fn: Callable, world_size: int, args: tuple, run_dir: str, timeout: float, deadline: float) -> None:
    run = Path(run_dir)
    # Where this rank is, written if it crashes in native code or is still running at the deadline
    # (a wall-clock time: starting a rank, imports included, already took part of the timeout).
    stacks = open(run / f"rank{rank}.stack", "w")
    faulthandler.enable(file=stacks, all_threads=True)
    faulthandler.dump_traceback_later(max(1.0, deadline - time.time()), file=stacks)
    # Libraries read their rank from the environment (DeepSpeed's engine reads LOCAL_RANK).
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(THREADS)
    # Collectives time out after the harness's deadline, so that a hang is reported with every
    # live rank's stack rather than as the timeout of the rank that waited for the hung one.
    collective_timeout = datetime.timedelta(seconds=timeout + 3 * _DUMP_GRACE)
    dist.init_process_group("gloo", init_method=(run / "store").as_uri(), rank=rank, world_size=world_size, timeout=collective_timeout)
    result = fn(rank, world_size, *args)
    torch.save(result, run / f"rank{rank}.pt")
    # Leave together: a rank that exits while another is still inside a gloo collective aborts it.
    dist.barrier()
    dist.destroy_process_group()
    faulthandler.cancel_dump_traceback_later()


def _stack(run: Path, rank: int) -> str:
    path = run / f"rank{rank}.stack"
    return path.read_text() if path.is_file() else ""


def run_distributed(fn: Callable, world_size: int, *args: Any, timeout: float = TIMEOUT, description: str | None = None) -> list[Any]:
    """Call ``fn(rank, world_size, *args)`` in ``world_size`` gloo processes; return each rank's
    result, in rank order. ``fn`` must be importable by name (a module-level function) and its
    arguments and result picklable. Raises ``RankFailed`` with the failing rank's traceback, or
    ``TimeoutError`` with the live ranks' stacks when the run takes longer than ``timeout`` s."""
    what = description or getattr(fn, "__qualname__", repr(fn))
    run = Path(tempfile.mkdtemp(prefix="ranks-"))
    rank_args = (fn, world_size, args, str(run), timeout, time.time() + timeout)
    context = mp.start_processes(_rank_main, args=rank_args, nprocs=world_size, join=False)
    deadline = time.monotonic() + timeout + _DUMP_GRACE
    try:
        while not context.join(timeout=max(0.0, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                hung = [rank for rank, process in enumerate(context.processes) if process.is_alive()]
                stacks = "\n".join(f"-- rank {rank}:\n{_stack(run, rank)}" for rank in hung)
                raise TimeoutError(f"{what} at world size {world_size}: ranks {hung} still running after {timeout:.0f} s:\n{stacks}")
        return [torch.load(run / f"rank{rank}.pt", weights_only=False) for rank in range(world_size)]
    except mp.ProcessRaisedException as exc:
        raise RankFailed(f"{what} failed on rank {exc.error_index} of {world_size}:{exc}") from None
    except mp.ProcessExitedException as exc:
        raise RankFailed(f"{what}: rank {exc.error_index} of {world_size} died ({exc}):\n{_stack(run, exc.error_index)}") from None
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
            process.join()
        shutil.rmtree(run, ignore_errors=True)
