"""A helper process that dies is an error within seconds, not a hang (the pattern of megatron's
checkpoint writer: forked workers, and a JoinableQueue the parent joins)."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time

import pytest

from onmerge_megatron.processes import HelperProcessError, run_watching_children


def _worker(queue, die: bool) -> None:
    queue.get()
    if die:
        os.kill(os.getpid(), signal.SIGKILL)  # killed before it reports: the parent's join never returns
    queue.task_done()


def _write_with_workers(die: bool) -> str:
    ctx = mp.get_context("fork")
    queue = ctx.JoinableQueue()
    workers = [ctx.Process(target=_worker, args=(queue, die and i == 1)) for i in range(2)]
    for i, worker in enumerate(workers):
        queue.put(i)
        worker.start()
    queue.join()
    for worker in workers:
        worker.join()
    return "written"


def test_a_clean_operation_returns_its_result():
    assert run_watching_children(lambda: _write_with_workers(die=False), "writing") == "written"


def test_a_killed_worker_is_an_error_within_seconds():
    start = time.monotonic()
    with pytest.raises(HelperProcessError, match=r"writing: helper process \d+ was killed by SIGKILL"):
        run_watching_children(lambda: _write_with_workers(die=True), "writing")
    assert time.monotonic() - start < 10
    # The other workers of the failed operation were stopped: nothing is left to wait for.
    deadline = time.monotonic() + 5
    while mp.active_children() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not mp.active_children()


def test_an_error_in_the_operation_is_raised_as_is():
    def fail() -> None:
        raise ValueError("disk full")

    with pytest.raises(ValueError, match="disk full"):
        run_watching_children(fail, "writing")
