"""Reward-versus-tax frontiers and the tax at equal reward, with confidence intervals over seeds.

A method's frontier for one seed is the path of its points in the (reward, tax) plane, starting at
the SFT model (tax 0): a trained method's checkpoints in step order, an offline merge's points from
w = 1 (the SFT model) to w = 0 (the AdamW DPO model). The tax at reward r is read off that path at
its first crossing of r, by linear interpolation between the two points around it; a path that
never reaches r has no value there. Over seeds we report the mean and a 95% confidence interval
(Student t over the seeds that reached r), and the paired difference to AdamW (β = 0.1) on the
same seeds, which removes the seed-to-seed spread of the SFT models that dominates raw taxes.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from onmerge_megatron.evaluation.report import save_figure

from .methods import DPOSettings
from .rows import Row

LEVELS = (0.8, 0.9)
BASELINE = ("adamw", 0.1)
FAMILIES = (("OnDARE", ("ondare",)), ("OnTIES", ("onties", "onties_keep")), ("EMA of the weights", ("ema",)),
            ("offline merging of the final AdamW model", ("offline_linear", "offline_ties")))
KNOB_SYMBOL = {"beta": "β", "alpha": "α", "keep_rate": "p", "ema": "ema", "weight": "w"}

Curve = tuple[str, str, float]  # method, knob, value


def curve_of(row: Row) -> Curve:
    """An offline merge's curve runs over its weight, so its points share one key."""
    return (row.method, row.knob, 0.0 if row.method.startswith("offline_") else row.value)


def curve_label(curve: Curve) -> str:
    method, knob, value = curve
    if method.startswith("offline_"):
        return f"{method} (w swept)"
    return f"{method} {KNOB_SYMBOL.get(knob, knob)}={value:g}"


def seed_path(rows: list[Row], sft: Row) -> list[tuple[float, float]]:
    """(reward, tax) points from the SFT model along one curve of one seed."""
    if rows[0].method.startswith("offline_"):
        ordered = sorted(rows, key=lambda r: -r.weight)
    else:
        ordered = sorted(rows, key=lambda r: r.step)
    return [(sft.reward, 0.0)] + [(r.reward, r.tax) for r in ordered]


def tax_at(path: list[tuple[float, float]], level: float) -> float | None:
    """Tax where the path first reaches `level` reward, linearly interpolated; None if it never does."""
    if path[0][0] >= level:
        return path[0][1]
    for (r0, t0), (r1, t1) in zip(path, path[1:]):
        if r1 >= level > r0:
            return t0 + (level - r0) / (r1 - r0) * (t1 - t0)
    return None


def t_interval(values: list[float]) -> tuple[float, float]:
    """Mean and half-width of the 95% Student-t confidence interval (NaN half-width below 2 values)."""
    from scipy.stats import t

    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan
    return mean, t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))


@dataclass
class LevelStat:
    curve: Curve
    level: float
    taxes: dict[int, float]  # seed -> tax at the level (seeds that reached it)
    seeds: int  # seeds run
    mean: float
    half_width: float
    diff_mean: float  # paired difference to AdamW beta 0.1 (negative = less tax)
    diff_half_width: float
    diff_n: int


def curves_by_seed(rows: list[Row]) -> tuple[dict[Curve, dict[int, list[Row]]], dict[int, Row]]:
    sft = {r.seed: r for r in rows if r.method == "sft"}
    curves: dict[Curve, dict[int, list[Row]]] = {}
    for r in rows:
        if r.method != "sft":
            curves.setdefault(curve_of(r), {}).setdefault(r.seed, []).append(r)
    return curves, sft


def level_stats(rows: list[Row], levels: tuple[float, ...] = LEVELS) -> list[LevelStat]:
    curves, sft = curves_by_seed(rows)
    taxes = {(c, level): {s: tax_at(seed_path(rs, sft[s]), level) for s, rs in by_seed.items()}
             for c, by_seed in curves.items() for level in levels}
    baseline = next((c for c in curves if (c[0], c[2]) == BASELINE), None)
    stats = []
    for (curve, level), by_seed in taxes.items():
        reached = {s: t for s, t in by_seed.items() if t is not None}
        mean, half = t_interval(list(reached.values())) if reached else (math.nan, math.nan)
        base = taxes.get((baseline, level), {}) if baseline else {}
        diffs = [t - base[s] for s, t in reached.items() if base.get(s) is not None]
        d_mean, d_half = t_interval(diffs) if diffs else (math.nan, math.nan)
        stats.append(LevelStat(curve, level, reached, len(by_seed), mean, half, d_mean, d_half, len(diffs)))
    return stats


def _interval(mean: float, half: float) -> str:
    if math.isnan(mean):
        return "–"
    return f"{mean:+.3f}" if math.isnan(half) else f"{mean:+.3f} [{mean - half:+.3f}, {mean + half:+.3f}]"


def frontier_markdown(rows: list[Row], mode: str, dpo: DPOSettings, machine: dict[str, str]) -> str:
    seeds = sorted({r.seed for r in rows})
    sft = [r for r in rows if r.method == "sft"]
    acc_mean, acc_half = t_interval([r.accuracy for r in sft])
    lines = [
        f"Mode `{mode}`, seeds {seeds}; DPO {dpo.batch} pairs a step, lr {dpo.lr:g}, default β "
        f"{dpo.beta:g}, checkpoints at steps {list(dpo.checkpoints)}. Machine: {machine['cpu']} "
        f"({machine['cpu_count']} CPUs), torch {machine['torch']}, transformers {machine['transformers']}, "
        f"lm-eval {machine['lm_eval']}.",
        "",
        f"SFT models: skill accuracy {acc_mean:.3f} (95% CI ±{acc_half:.3f} over seeds; per seed "
        f"{', '.join(f'{r.accuracy:.3f}' for r in sorted(sft, key=lambda r: r.seed))}), reward "
        f"{statistics.fmean(r.reward for r in sft):.3f}.",
        "",
        "Tax at equal reward: each seed's frontier (SFT model, then the checkpoints in step order; offline merges "
        "from w = 1 to w = 0) read at its first crossing of the reward level, linearly interpolated. Mean over the "
        "seeds that reach the level [95% Student-t CI]; Δ vs AdamW β=0.1 is the paired difference on the same "
        "seeds (negative = less tax than AdamW).",
        "",
        "| curve | " + " | ".join(f"tax @ reward {lv:g} | reached | Δ vs AdamW β=0.1 @ {lv:g}" for lv in LEVELS) + " |",
        "|---|" + "---:|---:|---:|" * len(LEVELS),
    ]
    stats = {(s.curve, s.level): s for s in level_stats(rows)}
    for curve in dict.fromkeys(s.curve for s in stats.values()):
        cells = []
        for lv in LEVELS:
            s = stats[(curve, lv)]
            diff = "–" if (curve[0], curve[2]) == BASELINE else _interval(s.diff_mean, s.diff_half_width)
            cells.append(f"{_interval(s.mean, s.half_width)} | {len(s.taxes)}/{s.seeds} | {diff}")
        lines.append(f"| {curve_label(curve)} | " + " | ".join(cells) + " |")
    lines += ["", "Every point, mean over seeds (reward = share of greedy outputs in the preferred style; "
              "implicit = implicit-reward accuracy on held-out pairs; tax = SFT accuracy − accuracy):", "",
              "| curve | step | w | reward | tax | add | rev | implicit | held-out ppl |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    groups: dict[tuple, list[Row]] = {}
    for r in rows:
        groups.setdefault((curve_of(r), r.step, r.weight), []).append(r)
    for (curve, step, weight), rs in groups.items():
        mean = lambda name: statistics.fmean(getattr(r, name) for r in rs)  # noqa: E731
        label = "SFT" if curve[0] == "sft" else curve_label(curve)
        implicit = "–" if curve[0] == "sft" else f"{mean('implicit_reward_accuracy'):.3f}"
        lines.append(f"| {label} | {step} | {weight if weight >= 0 else '–'} | {mean('reward'):.3f} | {mean('tax'):+.3f} | "
                     f"{mean('accuracy_add'):.3f} | {mean('accuracy_rev'):.3f} | {implicit} | {mean('heldout_ppl'):.1f} |")
    return "\n".join(lines) + "\n"


def _median_path(by_seed: dict[int, list[Row]], sft: dict[int, Row]) -> list[tuple[float, float]]:
    """The frontier's median over seeds, point by point (every seed has the same steps / weights). A
    median rather than a mean: one seed whose DPO collapses would pull a mean path away from all of them."""
    paths = [seed_path(rs, sft[s]) for s, rs in by_seed.items()]
    return [(statistics.median(p[i][0] for p in paths), statistics.median(p[i][1] for p in paths)) for i in range(len(paths[0]))]


def plot_frontiers(rows: list[Row], path: Path, mode: str, machine: dict[str, str]) -> None:
    """One panel per method family against AdamW: reward (y) against tax (x), median over seeds; the
    marks on the dotted reward levels are the tax at equal reward with its 95% CI."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    curves, sft = curves_by_seed(rows)
    stats = {(s.curve, s.level): s for s in level_stats(rows)}
    palette = colormaps["tab10"]
    others = [c for c in curves if c[0] != "adamw"]
    colors: dict[Curve, Any] = {c: palette(i % 10) for i, c in enumerate(others)}
    for c in curves:
        if c[0] == "adamw":
            colors[c] = "black" if (c[0], c[2]) == BASELINE else "dimgrey"
    fig = Figure(figsize=(13, 10))
    axes = fig.subplots(2, 2, sharex=True, sharey=True).ravel()
    for ax, (title, methods) in zip(axes, FAMILIES):
        shown = [c for c in curves if c[0] == "adamw" or c[0] in methods]
        for c in shown:
            xs_ys = _median_path(curves[c], sft)
            style = "--" if c[0] == "adamw" and (c[0], c[2]) != BASELINE else "-"
            ax.plot([t for _, t in xs_ys], [r for r, _ in xs_ys], style, marker="o", markersize=3,
                    color=colors[c], label=curve_label(c))
            for level in LEVELS:
                s = stats[(c, level)]
                if s.taxes:
                    ax.errorbar([s.mean], [level], xerr=None if math.isnan(s.half_width) else [[s.half_width], [s.half_width]],
                                fmt="D", color=colors[c], capsize=4, markersize=6)
        for level in LEVELS:
            ax.axhline(level, color="grey", linestyle=":", linewidth=0.8)
        ax.axvline(0.0, color="grey", linewidth=0.8)
        ax.set_title(f"{title} vs AdamW")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    for ax in axes[2:]:
        ax.set_xlabel("tax: SFT skill accuracy − accuracy (left is better)")
    for ax in axes[::2]:
        ax.set_ylabel("reward: share of greedy outputs in the preferred style")
    seeds = sorted({r.seed for r in rows})
    fig.suptitle(f"Reward-vs-tax frontiers ({mode} mode, {len(seeds)} seeds, {machine['cpu']})\nlines: median over seeds "
                 "from the SFT model along the checkpoints; diamonds: mean tax at reward 0.8 / 0.9 over the seeds that "
                 "reach it, with its 95% CI")
    fig.tight_layout()
    save_figure(fig, path)
