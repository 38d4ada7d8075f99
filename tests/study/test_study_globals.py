"""The study's library calls leave the caller's process-wide torch state as they found it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from onmerge_megatron.study.models import ModelSettings, build_model
from onmerge_megatron.study.run import run_study


def test_run_study_restores_the_thread_count(tmp_path: Path) -> None:
    """Also when the study fails: here its output folder cannot be made, which it finds out only
    after taking its own thread count."""
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    before = torch.get_num_threads()
    with pytest.raises(OSError):
        run_study("quick", blocked / "study", threads=before + 1)
    assert torch.get_num_threads() == before


def test_build_model_leaves_the_global_generator_alone() -> None:
    state = torch.get_rng_state()
    first = build_model(ModelSettings(), seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    # Still seeded: the same seed gives the same weights, another seed others.
    again, other = build_model(ModelSettings(), seed=3), build_model(ModelSettings(), seed=4)
    for (name, a), b, c in zip(first.named_parameters(), again.parameters(), other.parameters()):
        assert torch.equal(a, b), name
    assert any(not torch.equal(a, c) for a, c in zip(first.parameters(), other.parameters()))
