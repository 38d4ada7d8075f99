"""Tax at equal reward along a frontier, and its confidence interval, against hand computations."""

from __future__ import annotations

import math

import pytest

from onmerge_megatron.study.frontier import level_stats, seed_path, t_interval, tax_at
from onmerge_megatron.study.rows import Row


def row(seed: int, method: str, value: float, step: int, reward: float, tax: float, weight: float = -1.0) -> Row:
    knob = "weight" if method.startswith("offline") else "beta"
    return Row(seed, method, knob, value, step, weight, reward, 0.5, 0.5, 0.5, tax, 0.6, 10.0, 1.0)


def test_tax_at_interpolates_the_first_crossing() -> None:
    path = [(0.0, 0.0), (0.5, 0.1), (0.85, 0.3), (0.7, 0.2), (0.95, 0.4)]
    # 0.8 is first crossed between (0.5, 0.1) and (0.85, 0.3): 0.1 + (0.3/0.35)*0.2
    assert tax_at(path, 0.8) == pytest.approx(0.1 + 0.3 / 0.35 * 0.2, abs=1e-12)
    # 0.9 only after the dip: between (0.7, 0.2) and (0.95, 0.4)
    assert tax_at(path, 0.9) == pytest.approx(0.2 + 0.2 / 0.25 * 0.2, abs=1e-12)
    assert tax_at(path, 0.99) is None
    assert tax_at([(0.9, 0.0)], 0.8) == 0.0


def test_t_interval_of_three_values() -> None:
    mean, half = t_interval([0.1, 0.2, 0.6])
    # stdev = sqrt(((-.2)^2 + (-.1)^2 + .3^2)/2) = sqrt(0.07); t(0.975, 2) = 4.302652729911275
    assert mean == pytest.approx(0.3, abs=1e-12)
    assert half == pytest.approx(4.302652729911275 * math.sqrt(0.07) / math.sqrt(3), rel=1e-9)
    assert math.isnan(t_interval([0.4])[1])


def test_offline_paths_run_from_the_sft_model_to_the_dpo_model() -> None:
    sft = row(0, "sft", 0.0, 0, 0.0, 0.0, weight=1.0)
    merges = [row(0, "offline_linear", w, 240, reward, tax, weight=w) for w, reward, tax in
              ((0.0, 0.9, 0.3), (0.5, 0.5, 0.05), (0.25, 0.8, 0.1))]
    assert seed_path(merges, sft) == [(0.0, 0.0), (0.5, 0.05), (0.8, 0.1), (0.9, 0.3)]


def test_level_stats_pair_each_seed_with_adamw() -> None:
    rows = []
    for seed, (adamw_tax, other_tax) in enumerate([(0.2, 0.1), (0.4, 0.2)]):
        rows.append(row(seed, "sft", 0.0, 0, 0.0, 0.0, weight=1.0))
        rows.append(row(seed, "adamw", 0.1, 100, 1.0, adamw_tax))  # crosses 0.8 at 0.8 * tax
        rows.append(row(seed, "other", 0.1, 100, 1.0, other_tax))
    stats = {(s.curve[0], s.level): s for s in level_stats(rows)}
    other = stats[("other", 0.8)]
    assert other.taxes == pytest.approx({0: 0.08, 1: 0.16})
    assert other.diff_mean == pytest.approx(((0.08 - 0.16) + (0.16 - 0.32)) / 2)
    assert other.diff_n == 2
    assert stats[("adamw", 0.9)].mean == pytest.approx(0.9 * 0.3)
