"""Megatron tests run real megatron-core on CPU with 1-4 gloo processes (see mcore_harness.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

megatron_core = pytest.importorskip("megatron.core", reason="megatron-core is not installed")

# Spawned ranks import the jobs from here.
HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:
    sys.path.insert(0, HERE)


@pytest.fixture(scope="session")
def megatron_workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shared by the Megatron tests: the policy's initial weights (``init``) and a base model
    (``base``) as dist checkpoints, and the single-process reference runs ``ref_<config>``."""
    import mcore_harness as h
    import mcore_jobs as jobs

    tmp = tmp_path_factory.mktemp("megatron")
    h.spawn(jobs.make_checkpoints, 1, tmp)
    h.spawn(jobs.reference_run, 1, tmp, names=["none", "dare", "stepk", "ties"])
    return tmp
