"""Capability scores with lm-evaluation-harness: one `lm_eval.evaluator.evaluate` call per model.

lm-eval's lower-level `evaluate` (with `get_task_dict`) rather than `simple_evaluate`: the latter
also collects environment details by running pip and other tools in subprocesses on every call
(about a second each; the CPU study scores hundreds of checkpoints), and `evaluation.machine`
records the environment once per run instead. Few-shot sampling gets `simple_evaluate`'s default
seed, so the results are the same.

A model is either a directory (an exported Hugging Face model with its tokenizer) or a model
object with its tokenizer; both are wrapped in lm-eval's `HFLM`. Each task is reduced to one
number, its primary metric: the first metric of the task's `metric_list` under its first filter
(lm-eval reports ``"<metric>,<filter>"`` keys), or a group's first aggregated metric.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from lm_eval.evaluator import evaluate
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager, get_task_dict

FEWSHOT_SEED = 1234  # simple_evaluate's default fewshot_random_seed


@dataclass(frozen=True)
class TaskScore:
    task: str
    metric: str  # lm-eval's key, "<metric>,<filter>"
    value: float
    higher_is_better: bool
    samples: int


@dataclass
class CapabilityRun:
    scores: dict[str, TaskScore]
    samples: dict[str, list[dict[str, Any]]]  # lm-eval's logged samples per task (model outputs)


def task_manager(include_path: str | None, include_defaults: bool = True) -> TaskManager:
    return TaskManager(include_path=include_path, include_defaults=include_defaults)


def unknown_tasks(tasks: list[str], manager: TaskManager) -> list[str]:
    known = set(manager.all_tasks)
    return [t for t in tasks if t not in known]


def manager_for(tasks: list[str], include_path: str | None) -> tuple[TaskManager, list[str]]:
    """A task manager that knows `tasks`, and the tasks neither it nor lm-eval knows. Indexing
    lm-eval's own ~11k task files takes about 40 s on one CPU core, so when the local directory
    holds every task it is indexed alone."""
    if include_path is not None:
        local = task_manager(include_path, include_defaults=False)
        if not unknown_tasks(tasks, local):
            return local, []
    manager = task_manager(include_path)
    return manager, unknown_tasks(tasks, manager)


def make_lm(model: Any, tokenizer: Any = None, *, device: str = "cpu", batch_size: int = 16,
            dtype: str = "auto", add_bos_token: bool = False) -> HFLM:
    """`model` is a directory or a `PreTrainedModel` (then `tokenizer` is required)."""
    if isinstance(model, str):
        return HFLM(pretrained=model, tokenizer=tokenizer or model, device=device, batch_size=batch_size,
                    dtype=dtype, add_bos_token=add_bos_token)
    if tokenizer is None:
        raise ValueError("a model object needs its tokenizer")
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, add_bos_token=add_bos_token)


def run_tasks(lm: HFLM, tasks: list[str], manager: TaskManager, *, limit: int | None = None,
              allow_code_execution: bool = False) -> CapabilityRun:
    """Evaluate `lm` on `tasks` and return each task's primary metric and lm-eval's samples."""
    task_dict = get_task_dict(list(tasks), manager)
    _set_fewshot_seed(task_dict)
    out = evaluate(lm=lm, task_dict=task_dict, limit=limit, log_samples=True, bootstrap_iters=0,
                   confirm_run_unsafe_code=allow_code_execution, verbosity="ERROR")
    scores = {task: primary_score(task, out) for task in tasks}
    return CapabilityRun(scores, out.get("samples", {}))


def _set_fewshot_seed(task_dict: dict) -> None:
    """As simple_evaluate does, through groups of tasks."""
    for value in task_dict.values():
        if isinstance(value, dict):
            _set_fewshot_seed(value)
        elif hasattr(value, "set_fewshot_seed"):
            value.set_fewshot_seed(seed=FEWSHOT_SEED)


def primary_score(task: str, out: dict[str, Any]) -> TaskScore:
    """The task's first metric under its first filter (see the module docstring)."""
    table = out.get("groups", {}).get(task) or out["results"].get(task)
    if table is None:
        raise KeyError(f"lm-eval returned no results for task {task!r} (got {sorted(out['results'])})")
    keys = [k for k in table if "," in k and "_stderr" not in k and isinstance(table[k], (int, float))]
    metric_list = out.get("configs", {}).get(task, {}).get("metric_list") or []
    wanted = [m["metric"] for m in metric_list if isinstance(m.get("metric"), str)]
    for name in wanted:
        matching = [k for k in keys if k.split(",")[0] == name]
        if matching:
            keys = matching
            break
    if not keys:
        raise KeyError(f"task {task!r}: no numeric metric in lm-eval's results {sorted(table)}")
    key = keys[0]
    value = float(table[key])
    if not math.isfinite(value):
        raise ValueError(f"task {task!r}: metric {key} is {value}")
    higher = out.get("higher_is_better", {}).get(task, {}).get(key.split(",")[0], True)
    n = out.get("n-samples", {}).get(task, {}).get("effective", 0)
    return TaskScore(task, key, value, bool(higher), int(n))
