"""The tiny model, its pre-training and SFT, sequence log-probs and held-out perplexity (the skills and
the reward are scored with lm-eval: lm_eval_tasks.py)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from .tasks import VOCAB, CompletionBatch

Progress = Callable[[str], None]


@dataclass(frozen=True)
class ModelSettings:
    hidden: int = 96
    layers: int = 2
    heads: int = 4
    intermediate: int = 256
    max_positions: int = 64


def build_model(settings: ModelSettings, seed: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=settings.hidden,
        intermediate_size=settings.intermediate,
        num_hidden_layers=settings.layers,
        num_attention_heads=settings.heads,
        num_key_value_heads=settings.heads,
        max_position_embeddings=settings.max_positions,
        pad_token_id=VOCAB.PAD,
        bos_token_id=VOCAB.BOS,
        eos_token_id=VOCAB.EOS,
        tie_word_embeddings=False,
        attn_implementation="eager",  # fastest for sequences this short on CPU
    )
    # Seeded on a fork of the global generator, which the caller may be drawing from.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


@dataclass(frozen=True)
class TrainSettings:
    steps: int
    batch: int
    lr: float
    warmup: int = 50
    weight_decay: float = 0.0


def _cosine_lr(step: int, settings: TrainSettings) -> float:
    if step < settings.warmup:
        return settings.lr * (step + 1) / settings.warmup
    progress = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
    return settings.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _train(model: LlamaForCausalLM, settings: TrainSettings, loss_of: Callable[[torch.Tensor], torch.Tensor],
           n_examples: int, generator: torch.Generator, label: str, progress: Progress) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    model.train()
    start = time.monotonic()
    for step in range(settings.steps):
        for group in opt.param_groups:
            group["lr"] = _cosine_lr(step, settings)
        index = torch.randint(0, n_examples, (settings.batch,), generator=generator)
        loss = loss_of(index)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % max(1, settings.steps // 5) == 0 or step + 1 == settings.steps:
            elapsed = time.monotonic() - start
            eta = elapsed / (step + 1) * (settings.steps - step - 1)
            progress(f"  {label}: step {step + 1}/{settings.steps} loss {loss.item():.3f} "
                     f"({(step + 1) / elapsed:.1f} it/s, ETA {eta:.0f}s)")
    model.eval()


def pretrain(model: LlamaForCausalLM, windows: torch.Tensor, settings: TrainSettings, seed: int,
             progress: Progress) -> None:
    """Next-token pre-training on packed raw skill lines."""
    gen = torch.Generator().manual_seed(seed)

    def loss_of(index: torch.Tensor) -> torch.Tensor:
        ids = windows[index]
        return model(input_ids=ids, labels=ids).loss

    _train(model, settings, loss_of, windows.shape[0], gen, "pre-train", progress)


def completion_nll(model: LlamaForCausalLM, batch: CompletionBatch) -> torch.Tensor:
    """Mean negative log-likelihood per completion token."""
    logps = token_logps(model, batch)
    mask = batch.completion_mask[:, 1:].float()
    return -(logps * mask).sum() / mask.sum()


def supervised_finetune(model: LlamaForCausalLM, data: CompletionBatch, settings: TrainSettings, seed: int,
                        progress: Progress) -> None:
    """SFT: loss on completion tokens only."""
    gen = torch.Generator().manual_seed(seed + 1)
    _train(model, settings, lambda index: completion_nll(model, data.select(index)), len(data), gen, "SFT", progress)


def token_logps(model: LlamaForCausalLM, batch: CompletionBatch) -> torch.Tensor:
    """[N, T-1] log-prob of token t+1 given the prefix up to t."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    return torch.gather(F.log_softmax(logits.float(), dim=-1), 2, batch.input_ids[:, 1:, None]).squeeze(2)


def sequence_logps(model: LlamaForCausalLM, batch: CompletionBatch) -> torch.Tensor:
    """Summed completion log-probs per sequence, as the preference losses expect."""
    return (token_logps(model, batch) * batch.completion_mask[:, 1:]).sum(dim=1)


@torch.no_grad()
def heldout_perplexity(model: LlamaForCausalLM, heldout_windows: torch.Tensor) -> float:
    """Perplexity on held-out pre-training windows: a second, softer tax measure."""
    model.eval()
    return math.exp(model(input_ids=heldout_windows, labels=heldout_windows).loss.item())
