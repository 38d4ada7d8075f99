"""Uses of megatron-core internals that are not about running on a CPU (those are in cpu.py).

Each is looked up by name and does nothing if a release has moved it.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
from multiprocessing.managers import SyncManager

from ..processes import die_with_parent

logger = logging.getLogger(__name__)


def checkpoint_results_queue_dies_with_process() -> None:
    """Start the multiprocessing Manager through which dist_checkpointing's file writers report,
    so that its server process dies with this one.

    megatron starts it on the first save (``filesystem_async._get_write_results_queue``, 'spawn'
    context) as a separate Python process that outlives a killed rank. Started here, from the
    calling thread (call it from the main thread, before the first save), its server sets
    PR_SET_PDEATHSIG first. Collective-free; call on every rank."""
    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async
    except ImportError:
        return
    if not hasattr(filesystem_async, "_results_queue"):
        logger.debug("megatron-core has no filesystem_async._results_queue; its writers' Manager is not bound to this process")
        return
    if filesystem_async._results_queue is not None:  # already started (here, or by an earlier save)
        return
    manager = SyncManager(ctx=mp.get_context("spawn"))
    manager.start(initializer=die_with_parent)
    # The queue proxy holds the manager, which shuts its server down at exit.
    filesystem_async._results_queue = manager.Queue()
