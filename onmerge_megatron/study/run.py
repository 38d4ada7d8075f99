"""The alignment-tax study in one command.

    python -m onmerge_megatron.study.run --mode quick|full --output runs/study [--seeds N]

Per seed: pre-train a tiny Llama on raw skill lines, SFT it on the instruction format (both cached
under ``<output>/cache/<key>``, the key covering every setting and the package versions), compute
the reference log-probs of the preference pairs once, then run every curve of the grid
(``methods.method_grid``) from the SFT model. Each run is checkpointed at several step counts
(offline merges at several merge weights), and the checkpoints of a curve are scored together by
`onmerge eval`'s code (`evaluation.runner.evaluate_models`) on the study's local lm-eval tasks
(``lm_eval_tasks.py``), against the seed's SFT model. Writes ``results.csv`` (one row per seed
and point), ``results.md`` (the frontier table: tax at equal reward; frontier.py) and
``reward_vs_tax.png``, and ``settings.json`` with the machine.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import random
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterator

import torch

from onmerge_megatron.evaluation.machine import machine_description, package_versions
from onmerge_megatron.evaluation.runner import EvalRequest, evaluate_models
from onmerge_megatron.training.checkpoints import atomic_write_text

from .frontier import frontier_markdown, plot_frontiers
from .lm_eval_tasks import REWARD_TASK, SKILL_TASKS, save_hf, write_tasks
from .methods import DPOSettings, MethodPoint, method_grid, offline_merge, reference_logps, train_dpo
from .models import ModelSettings, TrainSettings, build_model, heldout_perplexity, pretrain, supervised_finetune
from .rows import METRICS, Row
from .tasks import (ADD_LIMIT, HELD_OUT_BUCKETS, REV_LENGTH, STYLE_MARK, VOCAB, CorpusSettings,
                    PreferenceSettings, SFTSettings, eval_problems, packed_windows, preference_data, sft_data)


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
    heldout_pairs: int  # held-out preference pairs for the implicit-reward accuracy


MODES: dict[str, StudySettings] = {
    "quick": StudySettings(
        seeds=(0,),
        model=ModelSettings(),
        corpus=CorpusSettings(train_windows=6000, heldout_windows=100),
        pretrain=TrainSettings(steps=600, batch=32, lr=3e-3),
        sft_data=SFTSettings(examples=4000),
        sft=TrainSettings(steps=250, batch=32, lr=1e-3, warmup=20),
        preference=PreferenceSettings(pairs=1000),
        dpo=DPOSettings(checkpoints=(30, 60)),
        eval_per_skill=50,
        heldout_pairs=50,
    ),
    "full": StudySettings(
        seeds=(0, 1, 2, 3, 4, 5, 6, 7),
        model=ModelSettings(),
        corpus=CorpusSettings(train_windows=20000, heldout_windows=200),
        pretrain=TrainSettings(steps=1500, batch=32, lr=3e-3),
        sft_data=SFTSettings(examples=8000),
        sft=TrainSettings(steps=400, batch=32, lr=1e-3, warmup=20),
        preference=PreferenceSettings(pairs=2000),
        dpo=DPOSettings(),
        eval_per_skill=200,
        heldout_pairs=200,
    ),
}


def log(message: str) -> None:
    print(message, flush=True)


# ----------------------------------------------------------------------------- base and SFT, cached
def cache_key(settings: StudySettings, seed: int) -> str:
    """Hash of everything the base and SFT models depend on: every study setting, the task
    constants, the seed and the versions of the packages that compute them."""
    parts: dict = {k: asdict(getattr(settings, k)) for k in ("model", "corpus", "pretrain", "sft_data", "sft")}
    parts["tasks"] = [VOCAB.itos, STYLE_MARK, ADD_LIMIT, REV_LENGTH, HELD_OUT_BUCKETS]
    parts["seed"] = seed
    parts["versions"] = package_versions(("torch", "transformers"))
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def base_and_sft(settings: StudySettings, seed: int, cache: Path):
    directory = cache / cache_key(settings, seed)
    base, sft = build_model(settings.model, seed), build_model(settings.model, seed)
    if (directory / "sft.pt").exists() and (directory / "base.pt").exists():
        base.load_state_dict(torch.load(directory / "base.pt"))
        sft.load_state_dict(torch.load(directory / "sft.pt"))
        log(f"seed {seed}: base and SFT models loaded from the cache {directory} (key: settings, seed, versions)")
    else:
        windows = packed_windows(settings.corpus.train_windows, settings.corpus.window, random.Random(seed), held_out=False)
        pretrain(base, windows, settings.pretrain, seed, log)
        sft.load_state_dict(base.state_dict())
        supervised_finetune(sft, sft_data(settings.sft_data, random.Random(seed + 100)), settings.sft, seed, log)
        directory.mkdir(parents=True, exist_ok=True)
        torch.save(base.state_dict(), directory / "base.pt")
        torch.save(sft.state_dict(), directory / "sft.pt")
        log(f"seed {seed}: base and SFT models cached in {directory}")
    base.eval()
    sft.eval()
    return base, sft




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


def run_study(mode: str, output: Path, threads: int = 1, seeds: tuple[int, ...] | None = None) -> list[Row]:
    """`seeds`: a subset of the mode's seeds (processes running disjoint subsets can be merged by
    ``--report-only --merge``)."""
    if mode not in MODES:
        raise ValueError(f"--mode must be one of {sorted(MODES)}, got {mode!r}")
    settings = MODES[mode]
    if seeds is not None:
        unknown = [s for s in seeds if s not in settings.seeds]
        if not seeds or unknown:
            raise ValueError(f"--seeds must be a non-empty subset of mode {mode}'s seeds {list(settings.seeds)}, got {list(seeds)}")
        settings = replace(settings, seeds=tuple(seeds))
    with _torch_threads(threads):
        return _run_study(mode, settings, output)


@dataclass
class _Curve:
    """The checkpoints of one curve of one seed, saved as HF directories, scored together."""

    point_of: dict[str, tuple[MethodPoint, int, float]]  # model name -> (point, step, weight)
    dirs: dict[str, str]
    ppl: dict[str, float]


def _evaluate_curve(curve: _Curve, sft_dir: str, tasks_dir: Path, pairs: Path, out: Path, seed: int,
                    sft_ppl: float, seconds: float) -> list[Row]:
    request = EvalRequest(models={"sft": sft_dir, **curve.dirs}, tasks=list(SKILL_TASKS), reward_tasks=[REWARD_TASK],
                          out=out, include_path=str(tasks_dir), reward_pairs=str(pairs), add_bos_token=True,
                          use_chat_template=False, batch_size=64, plot=False)
    results = evaluate_models(request, progress=lambda _: None)
    rows = []
    for r in results:
        point, step, weight = curve.point_of.get(r.name, (None, 0, 1.0))
        skills = [r.scores[t].value for t in SKILL_TASKS]
        rows.append(Row(
            seed, point.method if point else "sft", point.knob if point else "-", point.value if point else 0.0,
            step, weight,
            r.reward_task_scores[REWARD_TASK].value, sum(skills) / len(skills), skills[0], skills[1], r.average_tax,
            r.implicit_reward.accuracy if r.implicit_reward else math.nan,
            curve.ppl.get(r.name, sft_ppl), seconds))
    return rows


def _run_study(mode: str, settings: StudySettings, output: Path) -> list[Row]:
    grid = method_grid(mode)
    output.mkdir(parents=True, exist_ok=True)
    machine = machine_description()
    atomic_write_text(str(output / "settings.json"), json.dumps(
        {"mode": mode, "settings": asdict(settings), "grid": [asdict(p) for p in grid.points], "machine": machine},
        indent=2, default=str))
    log(f"machine: {machine['cpu']}, torch {machine['torch']}, transformers {machine['transformers']}, "
        f"lm-eval {machine['lm_eval']}")
    log(f"study ({mode}): {len(settings.seeds)} seed(s) x {len(grid.points)} curve points, DPO checkpoints "
        f"{list(settings.dpo.checkpoints)}")
    rows: list[Row] = []
    progress = _Progress(len(settings.seeds) * len(grid.points))
    for seed in settings.seeds:
        work = output / "work" / f"seed{seed}"
        if work.exists():
            shutil.rmtree(work)  # checkpoints of an interrupted run: never scored as this run's
        rows += _run_seed(settings, grid.points, seed, output / "cache", work, progress)
        shutil.rmtree(work)
        if not any(work.parent.iterdir()):
            work.parent.rmdir()
        write_report(rows, output, mode, settings, machine)  # after every seed: a partial study is still readable
    log(f"wrote {output / 'results.csv'}, {output / 'results.md'}, {output / 'reward_vs_tax.png'} "
        f"in {(time.monotonic() - progress.start) / 60:.1f} min")
    return rows


def _run_seed(settings: StudySettings, points: tuple[MethodPoint, ...], seed: int, cache: Path, work: Path,
              progress: "_Progress") -> list[Row]:
    """Base and SFT models, then every curve of the grid from the SFT model; one row per scored point
    (the SFT model's once)."""
    base, sft = base_and_sft(settings, seed, cache)
    tasks_dir = work / "tasks"
    pairs = write_tasks(tasks_dir, eval_problems(settings.eval_per_skill, seed), settings.heldout_pairs,
                        settings.preference.content_accuracy, seed)
    heldout = packed_windows(settings.corpus.heldout_windows, settings.corpus.window, random.Random(20_000 + seed), held_out=True)
    sft_dir = save_hf(sft, work / "sft")
    sft_ppl = heldout_perplexity(sft, heldout)
    data = preference_data(settings.preference, random.Random(seed + 200))
    ref = reference_logps(sft, data)

    def score(curve: _Curve, folder: Path, t0: float) -> list[Row]:
        return _evaluate_curve(curve, sft_dir, tasks_dir, pairs, folder / "eval", seed, sft_ppl, time.monotonic() - t0)

    adamw_final = None  # the AdamW model at the default beta, which the offline merges start from
    rows: list[Row] = []
    for point in sorted((p for p in points if p.offline is None), key=lambda p: p.method != "adamw"):
        t0 = time.monotonic()
        curve, curve_dir = _Curve({}, {}, {}), work / point.label

        def checkpoint(step: int, model, point=point, curve=curve, curve_dir=curve_dir) -> None:
            name = f"step{step}"
            curve.point_of[name] = (point, step, -1.0)
            curve.dirs[name] = save_hf(model, curve_dir / name)
            curve.ppl[name] = heldout_perplexity(model, heldout)

        final = train_dpo(point, settings.dpo, sft, base, data, ref, seed, checkpoint)
        if point.method == "adamw" and point.value == settings.dpo.beta:
            adamw_final = final
        new = score(curve, curve_dir, t0)
        rows += [r for r in new if r.method != "sft" or not rows]  # every curve re-scores SFT: keep one row
        shutil.rmtree(curve_dir)
        progress.advance(1, seed, point, new)
    offline = [p for p in points if p.offline is not None]
    if offline:
        if adamw_final is None:
            raise RuntimeError("offline merges need the AdamW run at the default DPO beta in the grid")
        t0 = time.monotonic()
        curve = _Curve({}, {}, {})
        for point in offline:
            merged = offline_merge(point.offline, point.value, point.density, base, adamw_final, sft, seed)
            name = f"{point.method}_w{point.value:g}"
            curve.point_of[name] = (point, settings.dpo.steps, point.value)
            curve.dirs[name] = save_hf(merged, work / "offline" / name)
            curve.ppl[name] = heldout_perplexity(merged, heldout)
        rows += [r for r in score(curve, work / "offline", t0) if r.method != "sft"]
        progress.advance(len(offline), seed, offline[-1], rows)
    return rows


class _Progress:
    """Points done out of the study's total, with the rate and an ETA."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.start = total, 0, time.monotonic()

    def advance(self, points: int, seed: int, point: MethodPoint, rows: list[Row]) -> None:
        self.done += points
        elapsed = time.monotonic() - self.start
        eta = elapsed / self.done * (self.total - self.done)
        last = [r for r in rows if r.method != "sft"][-1]
        log(f"[{self.done}/{self.total}] seed {seed} {point.method}[{point.knob}={point.value:g}]: last point reward "
            f"{last.reward:.3f} tax {last.tax:+.3f} (elapsed {elapsed / 60:.1f} min, "
            f"{self.done / elapsed * 60:.2f} points/min, ETA {eta / 60:.1f} min)")


def write_report(rows: list[Row], output: Path, mode: str, settings: StudySettings, machine: dict[str, str]) -> None:
    write_csv(rows, output / "results.csv")
    atomic_write_text(str(output / "results.md"), frontier_markdown(rows, mode, settings.dpo, machine))
    plot_frontiers(rows, output / "reward_vs_tax.png", mode, machine)


def read_csv(path: Path) -> list[Row]:
    with path.open() as f:
        return [Row(int(r["seed"]), r["method"], r["knob"], float(r["value"]), int(r["step"]), float(r["weight"]),
                    *(float(r[k]) for k in ("reward", "accuracy", "accuracy_add", "accuracy_rev", "tax",
                                            "implicit_reward_accuracy", "heldout_ppl", "seconds")))
                for r in csv.DictReader(f)]


def write_csv(rows: list[Row], path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        writer.writeheader()
        for r in rows:
            writer.writerow(asdict(r))
    tmp.replace(path)


def _report_only(mode: str, output: Path, merge: list[Path]) -> int:
    """Rebuild the report from results.csv files (the seeds of several processes) run on one machine."""
    rows, machines = [], []
    for folder in [output] + merge:
        rows += read_csv(folder / "results.csv")
        machines.append(json.loads((folder / "settings.json").read_text())["machine"])
    if any(m != machines[0] for m in machines):
        print(f"refusing to merge results computed on different machines or versions: {machines}", file=sys.stderr)
        return 2
    seeds = [r.seed for r in rows if r.method == "sft"]
    if len(seeds) != len(set(seeds)):
        print(f"refusing to merge: seed(s) {sorted({s for s in seeds if seeds.count(s) > 1})} appear twice", file=sys.stderr)
        return 2
    settings = replace(MODES[mode], seeds=tuple(sorted(seeds)))
    write_report(rows, output, mode, settings, machines[0])
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=sorted(MODES), default="quick")
    parser.add_argument("--output", type=Path, default=Path("runs/study"))
    parser.add_argument("--seeds", default=None, help="comma-separated subset of the mode's seeds to run (default: all)")
    parser.add_argument("--merge", type=Path, action="append", default=[],
                        help="with --report-only: also read the results.csv of this output folder (repeatable)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (tiny models: 1 is usually fastest)")
    parser.add_argument("--report-only", action="store_true",
                        help="rebuild results.md and the plot from an existing (possibly partial) results.csv")
    args = parser.parse_args(argv)
    if args.report_only:
        return _report_only(args.mode, args.output, args.merge)
    seeds = None if args.seeds is None else tuple(int(s) for s in args.seeds.split(","))
    rows = run_study(args.mode, args.output, args.threads, seeds)
    bad = [r for r in rows if not all(math.isfinite(getattr(r, m)) for m in METRICS)]
    if bad:
        print(f"non-finite results: {[(r.method, r.value, r.step, r.seed) for r in bad]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
