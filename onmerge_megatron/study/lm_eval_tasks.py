"""The study's skills and its rule-based reward as local lm-eval tasks, and its models as HF directories.

Per seed, `write_tasks` writes three generate_until tasks over the held-out evaluation problems
(greedy, at most 8 new tokens, as the study always decoded):
- ``study_add`` / ``study_rev``: exact match of the answer after a regex filter that drops one
  trailing style mark (``64`` and ``64!`` are both correct; anything else is not);
- ``study_style`` (the reward): 1 when the output is a non-empty answer closed by exactly one ``!``.
and the held-out preference pairs (``heldout_pairs.jsonl``) for the implicit-reward accuracy.
Models are scored by `onmerge eval`'s own code (`evaluation.runner.evaluate_models`) from HF
directories that hold the model and a character-level tokenizer (`char_tokenizer`), since the
study's models have their own vocabulary.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from onmerge_megatron.evaluation.char_tokenizer import char_tokenizer
from onmerge_megatron.training.checkpoints import atomic_write_text

from .tasks import SKILLS, STYLE_MARK, VOCAB, Problem, preference_records

SKILL_TASKS = tuple(f"study_{s}" for s in SKILLS)
REWARD_TASK = "study_style"
MAX_NEW_TOKENS = 8

_TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: prompt
doc_to_target: target
generation_kwargs:
  until: ["\\n"]
  do_sample: false
  max_gen_toks: {max_new_tokens}
filter_list:
  - name: {filter_name}
    filter:
      - function: regex
        regex_pattern: "{pattern}"
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


def study_tokenizer() -> PreTrainedTokenizerFast:
    """The study vocabulary (tasks.CharVocab) as an HF tokenizer: the same ids, BOS prepended."""
    return char_tokenizer(VOCAB.itos[3:])


def _jsonl(path: Path, records: list[dict]) -> None:
    atomic_write_text(str(path), "".join(json.dumps(r) + "\n" for r in records))


def write_tasks(directory: Path, problems: list[Problem], heldout_pairs: int, content_accuracy: float, seed: int) -> Path:
    """Task YAMLs and data files for one seed's evaluation set; returns the pairs file."""
    directory.mkdir(parents=True, exist_ok=True)
    mark = STYLE_MARK
    for skill, name in zip(SKILLS, SKILL_TASKS):
        data = directory / f"{name}.jsonl"
        _jsonl(data, [{"prompt": p.prompt, "target": p.answer} for p in problems if p.skill == skill])
        atomic_write_text(str(directory / f"{name}.yaml"), _TASK.format(
            name=name, data=data, max_new_tokens=MAX_NEW_TOKENS, filter_name="strip_style",
            pattern=f"^([^{mark}]*){mark}?$"))
    data = directory / f"{REWARD_TASK}.jsonl"
    _jsonl(data, [{"prompt": p.prompt, "target": mark} for p in problems])
    atomic_write_text(str(directory / f"{REWARD_TASK}.yaml"), _TASK.format(
        name=REWARD_TASK, data=data, max_new_tokens=MAX_NEW_TOKENS, filter_name="style_mark",
        pattern=f"^[^{mark}]+({mark})$"))
    pairs = directory / "heldout_pairs.jsonl"
    records = preference_records(heldout_pairs, content_accuracy, random.Random(30_000 + seed), held_out=True)
    _jsonl(pairs, [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in records])
    return pairs


def save_hf(model: LlamaForCausalLM, directory: Path) -> str:
    model.save_pretrained(directory)
    study_tokenizer().save_pretrained(directory)
    return str(directory)
