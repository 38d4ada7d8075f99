"""The alignment-tax study in one command.

    python -m onmerge_megatron.study.run --mode quick|full --output runs/study

Per seed: pre-train a tiny Llama on raw skill lines, SFT it on the instruction format (both cached
under ``<output>/cache``), compute the reference log-probs of the preference pairs once, then run
every method of the grid (``methods.method_grid``) from the SFT model and evaluate it on held-out
problems. Writes ``results.csv`` (one row per seed and point), ``results.md`` (mean and standard
deviation over seeds) and ``reward_vs_capability.png``.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import random
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from .methods import DPOSettings, Grid, MethodPoint, method_grid, offline_merge, reference_logps, train_dpo
from .models import (Evaluation, ModelSettings, TrainSettings, build_model, evaluate, pretrain,
                     supervised_finetune)
from .tasks import (ADD_LIMIT, HELD_OUT_BUCKETS, REV_LENGTH, SKILLS, STYLE_MARK, VOCAB, CorpusSettings, PreferenceSettings, SFTSettings, eval_problems, packed_windows,
                    preference_data, sft_data)


@dataclass(frozen=True)
class StudySettings:
    seeds: tuple[int, ...]
    model: ModelSettings
    corpus: CorpusSettings
    pretrain: TrainSettings
    sft_data: SFTSettings
    sft: TrainSettings
    preference: PreferenceSettings
    dpo: DPOSettings
    eval_per_skill: int


MODES: dict[str, StudySettings] = {
    "quick": StudySettings(
        seeds=(0,),
        model=ModelSettings(),
        corpus=CorpusSettings(train_windows=6000, heldout_windows=100),
        pretrain=TrainSettings(steps=600, batch=32, lr=3e-3),
        sft_data=SFTSettings(examples=4000),
        sft=TrainSettings(steps=250, batch=32, lr=1e-3, warmup=20),
        preference=PreferenceSettings(pairs=1000),
        dpo=DPOSettings(steps=60),
        eval_per_skill=100,
    ),
    "full": StudySettings(
        seeds=(0, 1, 2),
        model=ModelSettings(),
        corpus=CorpusSettings(train_windows=20000, heldout_windows=200),
        pretrain=TrainSettings(steps=1500, batch=32, lr=3e-3),
        sft_data=SFTSettings(examples=8000),
        sft=TrainSettings(steps=400, batch=32, lr=1e-3, warmup=20),
        preference=PreferenceSettings(pairs=2000),
        dpo=DPOSettings(steps=120),
        eval_per_skill=200,
    ),
}


def log(message: str) -> None:
    print(message, flush=True)


# ----------------------------------------------------------------------------- base and SFT, cached
def _settings_key(settings: StudySettings) -> str:
    """Hash of what the base and SFT models depend on, so a changed setting never reuses a stale cache."""
    parts: dict = {k: asdict(getattr(settings, k)) for k in ("model", "corpus", "pretrain", "sft_data", "sft")}
    parts["tasks"] = [VOCAB.itos, STYLE_MARK, ADD_LIMIT, REV_LENGTH, HELD_OUT_BUCKETS]
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]


def base_and_sft(settings: StudySettings, seed: int, cache: Path):
    directory = cache / _settings_key(settings) / f"seed{seed}"
    base, sft = build_model(settings.model, seed), build_model(settings.model, seed)
    if (directory / "sft.pt").exists() and (directory / "base.pt").exists():
        base.load_state_dict(torch.load(directory / "base.pt"))
        sft.load_state_dict(torch.load(directory / "sft.pt"))
        log(f"seed {seed}: base and SFT models loaded from {directory}")
    else:
        windows = packed_windows(settings.corpus.train_windows, settings.corpus.window, random.Random(seed), held_out=False)
        pretrain(base, windows, settings.pretrain, seed, log)
        sft.load_state_dict(base.state_dict())
        supervised_finetune(sft, sft_data(settings.sft_data, random.Random(seed + 100)), settings.sft, seed, log)
        directory.mkdir(parents=True, exist_ok=True)
        torch.save(base.state_dict(), directory / "base.pt")
        torch.save(sft.state_dict(), directory / "sft.pt")
    base.eval()
    sft.eval()
    return base, sft


# ----------------------------------------------------------------------------- rows
@dataclass
class Row:
    seed: int
    method: str
    knob: str
    value: float
    reward: float
    accuracy: float
    accuracy_add: float
    accuracy_rev: float
    heldout_ppl: float
    tax_accuracy: float  # SFT accuracy minus this accuracy (positive = capability lost)
    seconds: float


def _row(seed: int, method: str, knob: str, value: float, ev: Evaluation, sft_ev: Evaluation, seconds: float) -> Row:
    return Row(seed, method, knob, value, ev.reward, ev.accuracy, ev.accuracy_by_skill["add"],
               ev.accuracy_by_skill["rev"], ev.heldout_ppl, sft_ev.accuracy - ev.accuracy, seconds)


@contextmanager
def _torch_threads(threads: int) -> Iterator[None]:
    """The study's thread count, then the caller's again: the count is process-wide, and it
    changes the bits of every matrix product the caller computes afterwards."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def run_study(mode: str, output: Path, threads: int = 1) -> list[Row]:
    if mode not in MODES:
        raise ValueError(f"--mode must be one of {sorted(MODES)}, got {mode!r}")
    with _torch_threads(threads):
        return _run_study(mode, output)


def _run_study(mode: str, output: Path) -> list[Row]:
    settings, grid = MODES[mode], method_grid(mode)
    output.mkdir(parents=True, exist_ok=True)
    (output / "settings.json").write_text(json.dumps({"mode": mode, "settings": asdict(settings),
                                                      "grid": [asdict(p) for p in grid.points]}, indent=2, default=str))
    rows: list[Row] = []
    total = len(settings.seeds) * len(grid.points)
    done, start = 0, time.monotonic()
    log(f"study ({mode}): {len(settings.seeds)} seed(s) x {len(grid.points)} points, DPO {settings.dpo.steps} steps")
    for seed in settings.seeds:
        base, sft = base_and_sft(settings, seed, output / "cache")
        problems = eval_problems(settings.eval_per_skill, seed)
        heldout = packed_windows(settings.corpus.heldout_windows, settings.corpus.window, random.Random(20_000 + seed), held_out=True)
        sft_ev = evaluate(sft, problems, heldout)
        base_ev = evaluate(base, problems, heldout)
        rows.append(_row(seed, "base", "-", 0.0, base_ev, sft_ev, 0.0))
        rows.append(_row(seed, "sft", "-", 0.0, sft_ev, sft_ev, 0.0))
        log(f"seed {seed}: SFT reward {sft_ev.reward:.3f}, accuracy {sft_ev.accuracy:.3f} "
            f"({', '.join(f'{s} {sft_ev.accuracy_by_skill[s]:.2f}' for s in SKILLS)}), held-out ppl {sft_ev.heldout_ppl:.2f}")
        data = preference_data(settings.preference, random.Random(seed + 200))
        ref = reference_logps(sft, data)
        dpo_for_offline = None  # the AdamW model at the default beta, which the offline merges start from
        for point in _ordered(grid):
            t0 = time.monotonic()
            if point.offline is None:
                model, ev = train_dpo(point, settings.dpo, sft, base, data, ref, seed, problems, heldout)
                if point.method == "adamw" and point.value == settings.dpo.beta:
                    dpo_for_offline = model
            else:
                if dpo_for_offline is None:
                    raise RuntimeError("offline merges need the AdamW run at the default DPO beta in the grid")
                merged = offline_merge(point.offline, point.value, point.density, base, dpo_for_offline, sft, seed)
                ev = evaluate(merged, problems, heldout)
            seconds = time.monotonic() - t0
            rows.append(_row(seed, point.method, point.knob, point.value, ev, sft_ev, seconds))
            done += 1
            elapsed = time.monotonic() - start
            eta = elapsed / done * (total - done)
            write_csv(rows, output / "results.csv")  # after every point, so an interrupted study keeps its rows
            log(f"[{done}/{total}] seed {seed} {point.label}: reward {ev.reward:.3f} accuracy {ev.accuracy:.3f} "
                f"ppl {ev.heldout_ppl:.2f} ({seconds:.1f}s; elapsed {elapsed / 60:.1f} min, "
                f"{done / elapsed * 60:.1f} points/min, ETA {eta / 60:.1f} min)")
        write_report(rows, output, mode, settings)  # after every seed: a partial study is still readable
    log(f"wrote {output / 'results.csv'}, {output / 'results.md'}, {output / 'reward_vs_capability.png'} "
        f"in {(time.monotonic() - start) / 60:.1f} min")
    return rows


def write_report(rows: list[Row], output: Path, mode: str, settings: StudySettings) -> None:
    write_csv(rows, output / "results.csv")
    (output / "results.md").write_text(results_markdown(rows, mode, settings))
    plot(rows, output / "reward_vs_capability.png", mode)


def read_csv(path: Path) -> list[Row]:
    with path.open() as f:
        return [Row(int(r["seed"]), r["method"], r["knob"], float(r["value"]),
                    *(float(r[k]) for k in ("reward", "accuracy", "accuracy_add", "accuracy_rev", "heldout_ppl",
                                            "tax_accuracy", "seconds")))
                for r in csv.DictReader(f)]


def _ordered(grid: Grid) -> list[MethodPoint]:
    """Trained points first (offline merges need the AdamW model), AdamW before everything."""
    return sorted(grid.points, key=lambda p: (p.offline is not None, p.method != "adamw"))


def write_csv(rows: list[Row], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        writer.writeheader()
        for r in rows:
            writer.writerow(asdict(r))


# ----------------------------------------------------------------------------- aggregation, table, plot
@dataclass
class Aggregate:
    method: str
    knob: str
    value: float
    n: int
    mean: dict[str, float] = field(default_factory=dict)
    std: dict[str, float] = field(default_factory=dict)


METRICS = ("reward", "accuracy", "tax_accuracy", "accuracy_add", "accuracy_rev", "heldout_ppl")


def aggregate(rows: list[Row]) -> list[Aggregate]:
    groups: dict[tuple[str, str, float], list[Row]] = {}
    for r in rows:
        groups.setdefault((r.method, r.knob, r.value), []).append(r)
    out = []
    for (method, knob, value), rs in groups.items():
        agg = Aggregate(method, knob, value, len(rs))
        for m in METRICS:
            values = [getattr(r, m) for r in rs]
            agg.mean[m] = statistics.fmean(values)
            agg.std[m] = statistics.stdev(values) if len(values) > 1 else 0.0
        out.append(agg)
    return out


def results_markdown(rows: list[Row], mode: str, settings: StudySettings) -> str:
    aggs = aggregate(rows)
    lines = [
        f"Mode `{mode}`, seeds {list(settings.seeds)}, DPO {settings.dpo.steps} steps x {settings.dpo.batch} pairs, "
        f"lr {settings.dpo.lr:g}, default beta {settings.dpo.beta:g}; mean ± std over seeds. "
        "reward = share of greedy outputs in the preferred format; accuracy = exact skill accuracy on held-out "
        "problems; tax = SFT accuracy minus accuracy; ppl = perplexity on held-out pre-training text.",
        "",
        "| method | knob | value | reward | accuracy | tax | add | rev | ppl | seeds |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for a in aggs:
        cell = lambda m, d=3: f"{a.mean[m]:.{d}f} ± {a.std[m]:.{d}f}"  # noqa: E731
        lines.append(f"| {a.method} | {a.knob} | {a.value:g} | {cell('reward')} | {cell('accuracy')} | "
                     f"{cell('tax_accuracy')} | {a.mean['accuracy_add']:.3f} | {a.mean['accuracy_rev']:.3f} | "
                     f"{cell('heldout_ppl', 2)} | {a.n} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[Row], path: Path, mode: str) -> None:
    # A Figure of its own rather than pyplot, whose backend (matplotlib.use) is process-wide.
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    aggs = aggregate(rows)
    curves: dict[str, list[Aggregate]] = {}
    for a in aggs:
        curves.setdefault(a.method, []).append(a)
    fig = Figure(figsize=(14, 6))
    axes = fig.subplots(1, 2)
    markers = "os^vD<>phX*P"
    # Capability is drawn as the change from each seed's own SFT model (minus the tax): the seeds' SFT
    # models differ in accuracy far more than the methods do, so raw accuracy would hide the effect.
    for a in aggs:
        a.mean["minus_tax"], a.std["minus_tax"] = -a.mean["tax_accuracy"], a.std["tax_accuracy"]
    for ax, y_metric, y_label in ((axes[0], "minus_tax", "capability: skill accuracy minus the SFT model's (= -tax)"),
                                  (axes[1], "heldout_ppl", "held-out pre-training perplexity (lower is better)")):
        for i, (method, points) in enumerate(curves.items()):
            points = sorted(points, key=lambda a: a.value)
            if method in ("sft", "base"):
                if method == "sft":
                    a = points[0]
                    ax.plot(a.mean["reward"], a.mean[y_metric], "k*", markersize=16, label="SFT (start)", zorder=5)
                continue
            ax.errorbar([a.mean["reward"] for a in points], [a.mean[y_metric] for a in points],
                        xerr=[a.std["reward"] for a in points], yerr=[a.std[y_metric] for a in points],
                        marker=markers[i % len(markers)], color=colormaps["tab20"](i % 20), capsize=3, linestyle="-" if len(points) > 1 else "none",
                        label=f"{method} ({points[0].knob})")
        ax.set_xlabel("reward: share of greedy outputs in the preferred format")
        ax.set_ylabel(y_label)
        ax.grid(alpha=0.3)
    axes[1].set_yscale("log")
    axes[0].set_title("capability vs reward (up and right is better)")
    axes[1].set_title("held-out perplexity vs reward (down and right is better)")
    axes[0].legend(fontsize=8, loc="best")
    fig.suptitle(f"Alignment-tax study ({mode} mode); error bars: std over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=sorted(MODES), default="quick")
    parser.add_argument("--output", type=Path, default=Path("runs/study"))
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (tiny models: 1 is usually fastest)")
    parser.add_argument("--report-only", action="store_true",
                        help="rebuild results.md and the plot from an existing (possibly partial) results.csv")
    args = parser.parse_args(argv)
    if args.report_only:
        rows = read_csv(args.output / "results.csv")
        seeds = sorted({r.seed for r in rows})
        settings = MODES[args.mode]
        settings = StudySettings(**{**{k: getattr(settings, k) for k in settings.__dataclass_fields__}, "seeds": tuple(seeds)})
        write_report(rows, args.output, args.mode, settings)
        return 0
    rows = run_study(args.mode, args.output, args.threads)
    bad = [r for r in rows if not all(math.isfinite(getattr(r, m)) for m in METRICS)]
    if bad:
        print(f"non-finite results: {[(r.method, r.value, r.seed) for r in bad]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
