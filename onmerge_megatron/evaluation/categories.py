"""Which capability category each lm-eval task belongs to, as the paper groups its benchmarks.

The paper (§5.1) averages benchmark scores within a category (math, code, instruction following,
reading comprehension, knowledge, agent, code-switching). `DEFAULT_CATEGORIES` maps the lm-eval
0.4.9 tasks that stand for those benchmarks; `load_categories` adds or overrides entries from a
YAML file (``task: category``). A task missing from the table is its own category.
"""

from __future__ import annotations

from pathlib import Path

import yaml

MATH, CODE, IF, RC, KNOWLEDGE, AGENT = "math", "code", "instruction following", "reading comprehension", "knowledge", "agent"

DEFAULT_CATEGORIES: dict[str, str] = {
    "gsm8k": MATH,
    "gsm8k_cot": MATH,
    "minerva_math": MATH,
    "hendrycks_math": MATH,
    "humaneval": CODE,
    "humaneval_instruct": CODE,
    "mbpp": CODE,
    "mbpp_instruct": CODE,
    "ifeval": IF,
    "coqa": RC,
    "drop": RC,
    "mmlu": KNOWLEDGE,
    "mmlu_pro": KNOWLEDGE,
}


def load_categories(path: str | Path | None) -> dict[str, str]:
    """The default table updated with the ``task: category`` entries of a YAML file."""
    table = dict(DEFAULT_CATEGORIES)
    if path is None:
        return table
    loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    if not isinstance(loaded, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in loaded.items()):
        raise ValueError(f"{path}: expected a mapping of task name to category name (strings), got {loaded!r}")
    table.update(loaded)
    return table


def category_of(task: str, table: dict[str, str]) -> str:
    return table.get(task, task)
