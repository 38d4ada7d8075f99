"""The alignment-tax study's quick mode, end to end (CPU, a few minutes).

Asserts only what must hold whatever the study's outcome: every method produced a finite point,
the SFT model's skill accuracy is well above chance, AdamW DPO raises the rule-based reward over
the SFT model, and the tables and the plot were written.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from onmerge_megatron.study.methods import method_grid
from onmerge_megatron.study.run import METRICS, Row, run_study

pytestmark = pytest.mark.slow

# Chance level of an exact answer is about 1/100 for the sums and 1/4096 for the reversals.
WELL_ABOVE_CHANCE = 0.3


@pytest.fixture(scope="module")
def quick_study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Row]]:
    output = tmp_path_factory.mktemp("study")
    return output, run_study("quick", output)


def test_every_method_produced_a_finite_point(quick_study: tuple[Path, list[Row]]) -> None:
    _, rows = quick_study
    expected = {(p.method, p.value) for p in method_grid("quick").points}
    produced = {(r.method, r.value) for r in rows}
    assert expected <= produced, f"missing points: {expected - produced}"
    for r in rows:
        for metric in METRICS:
            assert math.isfinite(getattr(r, metric)), f"{r.method}={r.value}: {metric} is {getattr(r, metric)}"


def test_sft_skill_accuracy_is_well_above_chance(quick_study: tuple[Path, list[Row]]) -> None:
    _, rows = quick_study
    (sft,) = [r for r in rows if r.method == "sft"]
    assert sft.accuracy > WELL_ABOVE_CHANCE, f"SFT accuracy {sft.accuracy:.3f}"


def test_adamw_dpo_raises_the_rule_based_reward(quick_study: tuple[Path, list[Row]]) -> None:
    _, rows = quick_study
    (sft,) = [r for r in rows if r.method == "sft"]
    adamw = [r for r in rows if r.method == "adamw"]
    assert adamw
    for r in adamw:
        assert r.reward > sft.reward + 0.1, f"AdamW (beta={r.value}) reward {r.reward:.3f} vs SFT {sft.reward:.3f}"


def test_tables_and_plot_are_written(quick_study: tuple[Path, list[Row]]) -> None:
    output, rows = quick_study
    csv_lines = (output / "results.csv").read_text().splitlines()
    assert len(csv_lines) == len(rows) + 1
    assert "| adamw |" in (output / "results.md").read_text()
    png = (output / "reward_vs_capability.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
