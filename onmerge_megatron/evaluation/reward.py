"""Preference reward of a policy: implicit-reward accuracy on held-out pairs, and reward-model scores.

Implicit reward (β-free): r(y) = log π(y|x) − log π_ref(y|x), with log π the summed log-prob of
the completion tokens. A pair is won when r(y_w) − r(y_l) > 0; the accuracy is the share of pairs
won (ties, e.g. the reference model against itself, are not wins). Pairs are read with the
trainer's reader (training/data.py: ``prompt`` string or messages, ``chosen``/``rejected``
strings or conversations) and tokenized as the trainer does: the chat template when the tokenizer
has one, else ``bos + prompt`` and ``completion + eos``.

Reward model: greedy generations of the held-out prompts, each scored by a Hugging Face
sequence-classification model with one output; the score is the mean.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from onmerge_megatron.training.data import DataError, PromptCompletionTokenizer, normalize_record, read_records


@dataclass(frozen=True)
class PreferencePair:
    prompt: Any  # string or list of chat messages
    chosen: str
    rejected: str
    where: str  # file:line


def read_pairs(path: str) -> list[PreferencePair]:
    """Every pair of a JSONL/Parquet file; a malformed record is a DataError naming file and line."""
    pairs = []
    for where, record in read_records(path):
        if isinstance(record, DataError):
            raise record
        prompt, (chosen, rejected), _ = normalize_record(record, "pairs", where)
        pairs.append(PreferencePair(prompt, chosen, rejected, where))
    return pairs


@dataclass
class PairLogps:
    chosen: torch.Tensor  # [N] float64, summed completion log-probs
    rejected: torch.Tensor


def _sequence_logps(model: Any, sequences: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int) -> torch.Tensor:
    out = []
    device = next(model.parameters()).device
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start : start + batch_size]
        width = max(len(p) + len(c) for p, c in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(chunk), width), dtype=torch.long)
        scored = torch.zeros((len(chunk), width), dtype=torch.bool)  # completion tokens
        for row, (p, c) in enumerate(chunk):
            ids[row, : len(p) + len(c)] = torch.tensor(p + c)
            attention[row, : len(p) + len(c)] = 1
            scored[row, len(p) : len(p) + len(c)] = True
        ids, attention, scored = ids.to(device), attention.to(device), scored.to(device)
        logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1].float()
        token_logps = torch.gather(F.log_softmax(logits, dim=-1), 2, ids[:, 1:, None]).squeeze(2)
        out.append((token_logps.double() * scored[:, 1:]).sum(dim=1).cpu())
    return torch.cat(out)


@torch.no_grad()
def pair_logps(model: Any, tokenizer: Any, pairs: list[PreferencePair], use_chat_template: bool = True,
               batch_size: int = 16) -> PairLogps:
    """Summed completion log-probs of both sides of every pair under `model`."""
    model.eval()
    encode = PromptCompletionTokenizer(tokenizer, use_chat_template)
    chosen, rejected = [], []
    for pair in pairs:
        chosen.append(encode(pair.prompt, pair.chosen, pair.where))
        rejected.append(encode(pair.prompt, pair.rejected, pair.where))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return PairLogps(_sequence_logps(model, chosen, pad, batch_size), _sequence_logps(model, rejected, pad, batch_size))


@dataclass(frozen=True)
class ImplicitReward:
    accuracy: float  # share of pairs with margin > 0
    mean_margin: float  # mean of (log π/π_ref)(y_w) − (log π/π_ref)(y_l)
    pairs: int


def implicit_reward(policy: PairLogps, reference: PairLogps) -> ImplicitReward:
    margins = (policy.chosen - reference.chosen) - (policy.rejected - reference.rejected)
    return ImplicitReward(float((margins > 0).double().mean()), float(margins.mean()), len(margins))


# ----------------------------------------------------------------------------- reward model
@torch.no_grad()
def greedy_completions(model: Any, tokenizer: Any, prompts: list[Any], max_new_tokens: int,
                       use_chat_template: bool = True) -> list[str]:
    """Greedy completion text of every prompt (one at a time: no padding to get wrong)."""
    model.eval()
    encode = PromptCompletionTokenizer(tokenizer, use_chat_template)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    texts = []
    for i, prompt in enumerate(prompts):
        prompt_ids, _ = encode(prompt, "", f"prompt {i}")
        ids = torch.tensor([prompt_ids], device=device)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
        texts.append(tokenizer.decode(out[0, len(prompt_ids):], skip_special_tokens=True))
    return texts


def _prompt_text(prompt: Any) -> str:
    return prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)


@torch.no_grad()
def reward_model_scores(reward_model: Any, reward_tokenizer: Any, prompts: list[Any], completions: list[str]) -> list[float]:
    """One score per (prompt, completion): the chat template of the reward model's tokenizer when it
    has one, else the prompt text followed by the completion."""
    reward_model.eval()
    device = next(reward_model.parameters()).device
    scores = []
    for prompt, completion in zip(prompts, completions):
        if getattr(reward_tokenizer, "chat_template", None):
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
            ids = reward_tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": completion}], tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
        else:
            ids = reward_tokenizer(_prompt_text(prompt) + completion)["input_ids"]
        logits = reward_model(input_ids=torch.tensor([list(ids)], device=device)).logits
        scores.append(float(logits[0, 0]))
    return scores
