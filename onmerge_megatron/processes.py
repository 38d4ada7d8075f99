"""Helper processes that never outlive the process that made them, and never hang it.

A training rank starts helper processes it does not manage itself: dist_checkpointing forks file
writers for every save and starts a multiprocessing Manager server. If a writer is killed, the
rank would wait for it forever; if the rank is killed, the helpers would live on (a Manager
server holds ~270 MB). ``run_watching_children`` turns the first into an error within a second;
``die_with_parent`` (Linux ``PR_SET_PDEATHSIG``) ends the second.
"""

from __future__ import annotations

import ctypes
import os
import signal
import threading
from typing import Any, Callable, TypeVar

T = TypeVar("T")

_PR_SET_PDEATHSIG = 1
_at_fork_installed = False


class HelperProcessError(RuntimeError):
    """A helper process died while the operation waiting on it was running."""


def die_with_parent() -> None:
    """Have the kernel SIGKILL the calling process when the thread that created it ends (Linux;
    elsewhere nothing happens). Meant to run first thing in a child process."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
        pass


def forked_children_die_with_parent() -> None:
    """Every process forked from now on dies when the thread that forked it ends. Idempotent.

    Only for processes that fork their helpers from threads living as long as the helpers do (as
    dist_checkpointing's writers, forked for one save and joined by it)."""
    global _at_fork_installed
    if _at_fork_installed or not hasattr(os, "register_at_fork") or os.uname().sysname != "Linux":
        return
    os.register_at_fork(after_in_child=die_with_parent)
    _at_fork_installed = True


def _children() -> set[int]:
    """Direct children of this process (from /proc; empty where /proc is unavailable)."""
    pids: set[int] = set()
    try:
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{tid}/children") as f:
                pids.update(int(p) for p in f.read().split())
    except OSError:
        pass
    return pids


def _died_abnormally(pid: int) -> str | None:
    """How child ``pid`` ended if it ended abnormally, without reaping it (its owner still joins
    it); None while it runs or after a clean exit."""
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return None
    if info is None:
        return None
    if info.si_code == os.CLD_EXITED:
        return None if info.si_status == 0 else f"exited with status {info.si_status}"
    try:
        name = signal.Signals(info.si_status).name
    except ValueError:
        name = f"signal {info.si_status}"
    return f"was killed by {name}"


def run_watching_children(fn: Callable[[], T], what: str, poll_seconds: float = 0.2) -> T:
    """Run ``fn()``, which may start helper processes and wait for them, and raise
    HelperProcessError within ``poll_seconds`` if one of them dies abnormally, instead of waiting
    for it forever.

    ``fn`` runs in a daemon thread. On a dead helper the other helpers it started are killed (the
    operation has failed; they would only keep the process from exiting) and the thread, blocked
    on the dead helper, is abandoned: the caller is expected to let the error end the process.
    """
    before = _children()
    result: list[Any] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(fn())
        except BaseException as exc:  # re-raised in the calling thread
            error.append(exc)

    thread = threading.Thread(target=target, name=f"watched: {what}", daemon=True)
    thread.start()
    while True:
        thread.join(poll_seconds)
        if not thread.is_alive():
            break
        started = _children() - before
        for pid in sorted(started):
            how = _died_abnormally(pid)
            if how is None:
                continue
            for other in started - {pid}:
                try:
                    os.kill(other, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            raise HelperProcessError(f"{what}: helper process {pid} {how}; the operation cannot complete")
    if error:
        raise error[0]
    return result[0]
