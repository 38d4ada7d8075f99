"""Tax per task and category, and the reports: results.md, results.json, reward_vs_tax.png.

Tax of a model on a task = the reference model's score minus the model's (the other way round for
lower-is-better metrics), so a positive tax is capability lost. Category tax = mean over the
category's tasks; the average tax = mean over all tasks, as the paper's "Benchmark Avg." averages
all benchmarks.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from onmerge_megatron.training.checkpoints import atomic_write_text

from .capability import TaskScore
from .categories import category_of
from .reward import ImplicitReward


@dataclass
class ModelResult:
    name: str
    source: str  # directory, or a description of an in-memory model
    scores: dict[str, TaskScore]
    reward_task_scores: dict[str, TaskScore] = field(default_factory=dict)  # rule-based rewards scored by lm-eval
    implicit_reward: ImplicitReward | None = None  # None for the reference model and without pairs
    reward_model_score: float | None = None
    task_tax: dict[str, float] = field(default_factory=dict)
    category_tax: dict[str, float] = field(default_factory=dict)
    average_tax: float = 0.0


def signed_tax(reference: TaskScore, score: TaskScore) -> float:
    if reference.metric != score.metric:
        raise ValueError(f"task {score.task}: reference scored by {reference.metric}, model by {score.metric}")
    drop = reference.value - score.value
    return drop if score.higher_is_better else -drop


def compute_taxes(results: list[ModelResult], reference: str, categories: dict[str, str]) -> None:
    """Fill every result's task, category and average tax against the model named `reference`."""
    ref = next((r for r in results if r.name == reference), None)
    if ref is None:
        raise ValueError(f"reference model {reference!r} is not among {[r.name for r in results]}")
    for r in results:
        r.task_tax = {t: signed_tax(ref.scores[t], s) for t, s in r.scores.items()}
        by_category: dict[str, list[float]] = {}
        for task, tax in r.task_tax.items():
            by_category.setdefault(category_of(task, categories), []).append(tax)
        r.category_tax = {c: statistics.fmean(v) for c, v in by_category.items()}
        r.average_tax = statistics.fmean(r.task_tax.values())


def reward_of(r: ModelResult) -> tuple[str, float] | None:
    """The reward the plot uses and its name: the first reward task's score, else implicit-reward
    accuracy (None for the reference), else the reward model's score."""
    if r.reward_task_scores:
        task, score = next(iter(r.reward_task_scores.items()))
        return f"{task} ({score.metric})", score.value
    if r.implicit_reward is not None:
        return "implicit-reward accuracy on held-out pairs", r.implicit_reward.accuracy
    if r.reward_model_score is not None:
        return "reward model score (mean)", r.reward_model_score
    return None


def results_json(results: list[ModelResult], reference: str, categories: dict[str, str], meta: dict[str, Any]) -> str:
    models = []
    for r in results:
        models.append({
            "name": r.name, "source": r.source,
            "tasks": {t: asdict(s) for t, s in r.scores.items()},
            "reward_tasks": {t: asdict(s) for t, s in r.reward_task_scores.items()},
            "task_tax": r.task_tax, "category_tax": r.category_tax, "average_tax": r.average_tax,
            "implicit_reward": asdict(r.implicit_reward) if r.implicit_reward else None,
            "reward_model_score": r.reward_model_score,
        })
    used = {t: category_of(t, categories) for r in results for t in r.scores}
    return json.dumps({"reference": reference, "categories": used, "meta": meta, "models": models}, indent=2) + "\n"


def results_markdown(results: list[ModelResult], reference: str, categories: dict[str, str], meta: dict[str, Any]) -> str:
    tasks = list(results[0].scores)
    cats = list(dict.fromkeys(category_of(t, categories) for t in tasks))
    lines = [f"Reference (tax 0): `{reference}`. Scores are each task's primary lm-eval metric; tax = reference "
             "score minus the model's (positive = capability lost); category tax = mean over its tasks; "
             "average = mean over all tasks. Reward = implicit-reward accuracy on held-out pairs "
             "(share with log π/π_ref(chosen) − log π/π_ref(rejected) > 0).", ""]
    lines += ["| model | " + " | ".join(f"{t} ({results[0].scores[t].metric})" for t in tasks) + " |",
              "|---|" + "---:|" * len(tasks)]
    for r in results:
        lines.append(f"| {r.name} | " + " | ".join(f"{r.scores[t].value:.4f}" for t in tasks) + " |")
    reward_tasks = list(results[0].reward_task_scores)
    lines += ["", "| model | " + " | ".join(f"tax: {c}" for c in cats) + " | average tax | "
              + "".join(f"reward: {t} | " for t in reward_tasks) + "reward accuracy | mean margin | reward model |",
              "|---|" + "---:|" * (len(cats) + len(reward_tasks) + 4)]
    for r in results:
        ir = r.implicit_reward
        acc = f"{ir.accuracy:.4f}" if ir else "–"
        margin = f"{ir.mean_margin:.3f}" if ir else "–"
        rm = f"{r.reward_model_score:.4f}" if r.reward_model_score is not None else "–"
        average = f"{r.average_tax:+.4f}" if r.scores else "–"  # no capability task, no tax
        lines.append(f"| {r.name} | " + " | ".join(f"{r.category_tax[c]:+.4f}" for c in cats)
                     + f" | {average} | " + "".join(f"{r.reward_task_scores[t].value:.4f} | " for t in reward_tasks)
                     + f"{acc} | {margin} | {rm} |")
    lines += ["", "Run: " + ", ".join(f"{k} {v}" for k, v in meta.items())]
    return "\n".join(lines) + "\n"


def model_colors(names: list[str]) -> dict[str, Any]:
    """One colour per model, by its position in the command line, the same in every panel."""
    from matplotlib import colormaps

    palette = colormaps["tab10"]
    return {name: palette(i % 10) for i, name in enumerate(names)}


def save_figure(fig: Any, path: Path) -> None:
    """Written to a temporary file first, so a failed save leaves no half-written PNG."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def plot_reward_vs_tax(results: list[ModelResult], reference: str, categories: dict[str, str], path: Path) -> None:
    """Left: reward against average tax, one point per model. Right: tax per category."""
    from matplotlib.figure import Figure

    colors = model_colors([r.name for r in results])
    fig = Figure(figsize=(12, 5))
    left, right = fig.subplots(1, 2)
    reward_name = "reward"
    for r in results:
        reward = reward_of(r)
        if reward is None:
            continue
        reward_name, reward = reward
        left.scatter([r.average_tax], [reward], color=colors[r.name], s=60, marker="*" if r.name == reference else "o",
                     label=r.name, zorder=3)
    left.axvline(0.0, color="grey", linewidth=0.8)
    left.set_xlabel("average tax (reference score − model score; right = more capability lost)")
    left.set_ylabel(reward_name)
    left.set_title("reward vs tax (up and left is better)")
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    cats = list(results[0].category_tax)
    width = 0.8 / len(results)
    for i, r in enumerate(results):
        right.bar([c + i * width for c in range(len(cats))], [r.category_tax[c] for c in cats], width,
                  color=colors[r.name], label=r.name)
    right.set_xticks([c + 0.4 - width / 2 for c in range(len(cats))], cats, rotation=20, fontsize=8)
    right.axhline(0.0, color="grey", linewidth=0.8)
    right.set_ylabel("tax (reference score − model score)")
    right.set_title("tax per category")
    right.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    save_figure(fig, path)


def write_reports(results: list[ModelResult], reference: str, categories: dict[str, str], meta: dict[str, Any],
                  out: Path, plot: bool = True) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(str(out / "results.json"), results_json(results, reference, categories, meta))
    atomic_write_text(str(out / "results.md"), results_markdown(results, reference, categories, meta))
    if plot and results[0].scores:  # reward against tax needs a tax
        plot_reward_vs_tax(results, reference, categories, out / "reward_vs_tax.png")
