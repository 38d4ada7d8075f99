"""`onmerge eval`: capability tasks with lm-eval, preference reward, tax against a reference model.

Everything that can be checked is checked before the first model is loaded: model directories,
names, the reference, task names (against lm-eval's task index), the pairs file (every record
parsed), the reward model, and that all models share the reference's tokenizer vocabulary when
their log-probs are compared.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .capability import TaskManager, make_lm, manager_for, run_tasks
from .categories import load_categories
from .machine import machine_description
from .report import ModelResult, compute_taxes, write_reports
from .reward import PairLogps, PreferencePair, greedy_completions, implicit_reward, pair_logps, read_pairs, reward_model_scores

Progress = Callable[[str], None]


class EvalInputError(ValueError):
    """An input of `onmerge eval` is unusable; nothing was evaluated or written."""


@dataclass
class EvalRequest:
    models: dict[str, str]  # name -> HF model directory, in command-line order
    tasks: list[str]
    out: Path
    reward_tasks: list[str] = field(default_factory=list)  # lm-eval tasks that score the reward (e.g. a rule), no tax
    reference: str = "sft"
    include_path: str | None = None
    reward_pairs: str | None = None
    reward_model: str | None = None
    categories_file: str | None = None
    device: str = "cpu"
    dtype: str = "auto"
    batch_size: int = 16
    limit: int | None = None
    add_bos_token: bool = False
    use_chat_template: bool = True
    max_new_tokens: int = 256
    allow_code_execution: bool = False
    plot: bool = True  # reward_vs_tax.png next to the tables


def parse_model_specs(specs: list[str]) -> dict[str, str]:
    """``NAME=PATH`` strings to an ordered mapping; names must be distinct."""
    models: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise EvalInputError(f"--model expects NAME=PATH, got {spec!r}")
        if name in models:
            raise EvalInputError(f"model name {name!r} is given twice")
        models[name] = path
    return models


def _check_model_dir(name: str, path: str) -> None:
    if not Path(path, "config.json").is_file():
        raise EvalInputError(f"model {name!r}: expected a Hugging Face model directory with config.json, got {path!r}")


@dataclass
class Validated:
    pairs: list[PreferencePair]
    categories: dict[str, str]
    manager: TaskManager | None  # None without tasks


def validate(request: EvalRequest) -> Validated:
    """Check every input (see the module docstring)."""
    if not request.models:
        raise EvalInputError("no --model given")
    if request.reference not in request.models:
        raise EvalInputError(f"--reference {request.reference!r} is not one of the models {list(request.models)}")
    for name, path in request.models.items():
        _check_model_dir(name, path)
    if not request.tasks and not request.reward_tasks and not request.reward_pairs:
        raise EvalInputError("nothing to evaluate: give --tasks, --reward-tasks and/or --reward-pairs")
    if request.include_path is not None and not Path(request.include_path).is_dir():
        raise EvalInputError(f"--include-path must be a directory of task YAML files, got {request.include_path!r}")
    if request.out.exists() and not request.out.is_dir():
        raise EvalInputError(f"--out must be a directory, got the file {request.out}")
    try:
        categories = load_categories(request.categories_file)
    except (OSError, ValueError) as exc:
        raise EvalInputError(f"--categories: {exc}") from None
    overlap = set(request.tasks) & set(request.reward_tasks)
    if overlap:
        raise EvalInputError(f"task(s) {sorted(overlap)} are given both as capability and as reward tasks")
    manager = None
    if request.tasks or request.reward_tasks:
        manager, unknown = manager_for(request.tasks + request.reward_tasks, request.include_path)
        if unknown:
            raise EvalInputError(f"unknown lm-eval task(s) {unknown}" + ("" if request.include_path else
                                 " (local YAML tasks need --include-path)"))
    pairs: list[PreferencePair] = []
    if request.reward_model is not None:
        if request.reward_pairs is None:
            raise EvalInputError("--reward-model scores generations of the held-out prompts: give --reward-pairs too")
        _check_model_dir("reward model", request.reward_model)
        from transformers import AutoConfig

        labels = AutoConfig.from_pretrained(request.reward_model).num_labels
        if labels != 1:
            raise EvalInputError(f"--reward-model must have one output (num_labels 1), got {labels}")
    if request.reward_pairs is not None:
        if not Path(request.reward_pairs).is_file():
            raise EvalInputError(f"--reward-pairs: no such file {request.reward_pairs!r}")
        try:
            pairs = read_pairs(request.reward_pairs)
        except ValueError as exc:
            raise EvalInputError(f"--reward-pairs: {exc}") from None
        _check_same_vocabulary(request)
    return Validated(pairs, categories, manager)


def _check_same_vocabulary(request: EvalRequest) -> None:
    """Implicit rewards compare log-probs of the same token ids under two models."""
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(request.models[request.reference]).get_vocab()
    for name, path in request.models.items():
        if AutoTokenizer.from_pretrained(path).get_vocab() != reference:
            raise EvalInputError(f"model {name!r} has another tokenizer vocabulary than the reference "
                                 f"{request.reference!r}; implicit rewards need the same one")


def _load(path: str, request: EvalRequest):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = "auto" if request.dtype == "auto" else getattr(torch, request.dtype)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(request.device)
    model.eval()
    return model, AutoTokenizer.from_pretrained(path)


def evaluate_models(request: EvalRequest, progress: Progress = print) -> list[ModelResult]:
    """Validate, evaluate every model (the reference first) and write the reports to `request.out`."""
    checked = validate(request)
    pairs, categories, manager = checked.pairs, checked.categories, checked.manager
    order = [request.reference] + [n for n in request.models if n != request.reference]
    reward_model = _load_reward_model(request) if request.reward_model is not None else None
    reference_logps: PairLogps | None = None
    results: dict[str, ModelResult] = {}
    start = time.monotonic()
    for done, name in enumerate(order):
        path = request.models[name]
        model, tokenizer = _load(path, request)
        result = ModelResult(name, path, {})
        if request.tasks or request.reward_tasks:
            lm = make_lm(model, tokenizer, batch_size=request.batch_size, add_bos_token=request.add_bos_token)
            scores = run_tasks(lm, request.tasks + request.reward_tasks, manager, limit=request.limit,
                               allow_code_execution=request.allow_code_execution).scores
            result.scores = {t: scores[t] for t in request.tasks}
            result.reward_task_scores = {t: scores[t] for t in request.reward_tasks}
        if pairs:
            logps = pair_logps(model, tokenizer, pairs, request.use_chat_template, request.batch_size)
            if name == request.reference:
                reference_logps = logps
            else:
                result.implicit_reward = implicit_reward(logps, reference_logps)
        if reward_model is not None:
            result.reward_model_score = _reward_model_mean(model, tokenizer, pairs, reward_model, request)
        results[name] = result
        del model
        gc.collect()
        elapsed = time.monotonic() - start
        eta = elapsed / (done + 1) * (len(order) - done - 1)
        summary = ", ".join(f"{t} {s.value:.4f}" for t, s in {**result.scores, **result.reward_task_scores}.items())
        if result.implicit_reward is not None:
            summary += f"; reward accuracy {result.implicit_reward.accuracy:.4f}"
        progress(f"[{done + 1}/{len(order)}] {name}: {summary} ({elapsed:.0f}s elapsed, ETA {eta:.0f}s)")
    ordered = [results[n] for n in request.models]
    if request.tasks:
        compute_taxes(ordered, request.reference, categories)
    meta = {"tasks": ",".join(request.tasks), "reward tasks": ",".join(request.reward_tasks), "reference": request.reference, "limit": request.limit,
            "pairs": len(pairs), **machine_description()}
    write_reports(ordered, request.reference, categories, meta, request.out, plot=request.plot)
    progress(f"wrote {request.out / 'results.md'}, results.json" + (" and reward_vs_tax.png" if request.plot else ""))
    return ordered


def _load_reward_model(request: EvalRequest):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(request.reward_model).to(request.device)
    return model, AutoTokenizer.from_pretrained(request.reward_model)


def _reward_model_mean(model, tokenizer, pairs: list[PreferencePair], reward_model, request: EvalRequest) -> float:
    """Mean reward-model score of the policy's greedy completions of the held-out prompts."""
    prompts = [p.prompt for p in pairs]
    completions = greedy_completions(model, tokenizer, prompts, request.max_new_tokens, request.use_chat_template)
    scores = reward_model_scores(*reward_model, prompts, completions)
    return sum(scores) / len(scores)
