"""The alignment-tax study's quick mode, end to end (CPU, a few minutes): training, checkpoints
scored through `onmerge eval`'s code on the study's local lm-eval tasks, frontiers and reports.

Asserts only what must hold whatever the study's outcome: every curve produced finite points at
every checkpoint, the SFT model's skill accuracy is well above chance, AdamW DPO raises the
rule-based reward over the SFT model, the lm-eval scores agree with the study's own exact scorer
on the SFT model, and the tables and the plot were written.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from onmerge_megatron.study.methods import method_grid
from onmerge_megatron.study.run import METRICS, MODES, Row, base_and_sft, cache_key, run_study
from onmerge_megatron.study.tasks import VOCAB, eval_problems, is_correct

pytestmark = pytest.mark.slow

# Chance level of an exact answer is about 1/100 for the sums and 1/4096 for the reversals.
WELL_ABOVE_CHANCE = 0.3


@pytest.fixture(scope="module")
def quick_study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Row]]:
    output = tmp_path_factory.mktemp("study")
    return output, run_study("quick", output)


def test_every_curve_produced_finite_points(quick_study: tuple[Path, list[Row]]) -> None:
    _, rows = quick_study
    settings = MODES["quick"]
    expected = set()
    for p in method_grid("quick").points:
        steps = [settings.dpo.steps] if p.offline else settings.dpo.checkpoints
        expected |= {(p.method, p.value, s) for s in steps}
    produced = {(r.method, r.value, r.step) for r in rows}
    assert expected <= produced, f"missing points: {expected - produced}"
    for r in rows:
        for metric in METRICS:
            assert math.isfinite(getattr(r, metric)), f"{r.method}={r.value}@{r.step}: {metric} is {getattr(r, metric)}"


def test_sft_skill_accuracy_is_well_above_chance(quick_study: tuple[Path, list[Row]]) -> None:
    _, rows = quick_study
    (sft,) = [r for r in rows if r.method == "sft"]
    assert sft.accuracy > WELL_ABOVE_CHANCE, f"SFT accuracy {sft.accuracy:.3f}"
    assert sft.tax == 0.0 and math.isnan(sft.implicit_reward_accuracy)


@torch.no_grad()
def _study_scorer(model, problems) -> tuple[float, float]:
    """The study's own exact scorer on unpadded greedy decoding, independent of lm-eval."""
    outputs = []
    for p in problems:
        ids = torch.tensor([[VOCAB.BOS] + VOCAB.encode(p.prompt)])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                             eos_token_id=VOCAB.EOS, pad_token_id=VOCAB.PAD)
        outputs.append(VOCAB.decode(out[0, ids.shape[1]:].tolist()))
    correct = {s: [is_correct(p, o) for p, o in zip(problems, outputs) if p.skill == s] for s in ("add", "rev")}
    return sum(correct["add"]) / len(correct["add"]), sum(correct["rev"]) / len(correct["rev"])


def test_lm_eval_scores_match_the_study_scorer_on_the_sft_model(quick_study: tuple[Path, list[Row]]) -> None:
    output, rows = quick_study
    (sft_row,) = [r for r in rows if r.method == "sft"]
    settings = MODES["quick"]
    _, sft = base_and_sft(settings, 0, output / "cache")  # from the study's cache
    add, rev = _study_scorer(sft, eval_problems(settings.eval_per_skill, 0))
    # One disagreement in the 50 problems of a skill is allowed: lm-eval decodes left-padded batches.
    assert abs(add - sft_row.accuracy_add) <= 1 / settings.eval_per_skill + 1e-12
    assert abs(rev - sft_row.accuracy_rev) <= 1 / settings.eval_per_skill + 1e-12


def test_adamw_dpo_raises_the_rule_based_reward(quick_study: tuple[Path, list[Row]]) -> None:
    _, rows = quick_study
    (sft,) = [r for r in rows if r.method == "sft"]
    final = max(r.step for r in rows)
    adamw = [r for r in rows if r.method == "adamw" and r.step == final]
    assert adamw
    for r in adamw:
        assert r.reward > sft.reward + 0.1, f"AdamW (beta={r.value}) reward {r.reward:.3f} vs SFT {sft.reward:.3f}"
        assert r.implicit_reward_accuracy > 0.5


def test_tables_plot_and_machine_are_written(quick_study: tuple[Path, list[Row]]) -> None:
    output, rows = quick_study
    csv_lines = (output / "results.csv").read_text().splitlines()
    assert len(csv_lines) == len(rows) + 1
    md = (output / "results.md").read_text()
    assert "| adamw β=0.1 |" in md and "tax @ reward 0.8" in md and "torch" in md
    png = (output / "reward_vs_tax.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert not (output / "work").exists()  # the checkpoints are removed once scored


def test_cache_key_covers_settings_seed_and_versions() -> None:
    quick = MODES["quick"]
    keys = {cache_key(quick, 0), cache_key(quick, 1), cache_key(MODES["full"], 0)}
    assert len(keys) == 3
