"""The method grid, the DPO run every online method shares, and offline merges of task vectors.

Every trained method is one `OnlineMergingAdamW` configuration (the project's optimizer), trained
with the project's `dpo_loss` on precomputed reference log-probs, and is a *curve*: one run,
checkpointed at several step counts (`DPOSettings.checkpoints`), so each method is judged along
its whole reward-versus-tax frontier rather than at one step count:
- ``adamw``: method="none" (bit-identical to torch AdamW), at two DPO betas;
- ``ema``: method="none" with weight_ema, evaluated on the EMA weights;
- ``ondare`` / ``onties``: OnDARE and OnTIES at p = 0.1; ``onties_keep``: OnTIES at p = 0.5.
Offline merges (``offline_linear``; ``offline_dare`` and ``offline_ties`` are available to
`offline_merge`) merge the final AdamW DPO model (beta = the default) with the SFT model,
mergekit-style, and are traced over the merge weight w:
theta = theta_base + (1 - w) * F(tau_dpo) (+) w * F(tau_sft), tau = model - base, built from the
engine's own sparsifiers (`rng.keep_positions`, `sparsify.top_k_positions`) and sign consensus
(`consensus.sign_unweighted`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

import torch
from transformers import LlamaForCausalLM

from onmerge_megatron import OnlineMergeConfig, OnlineMergingAdamW, ShardCoords
from onmerge_megatron.merging.consensus import sign_unweighted
from onmerge_megatron.merging.rng import keep_positions
from onmerge_megatron.merging.sparsify import top_k_count, top_k_positions
from onmerge_megatron.training.losses import dpo_loss

from .models import sequence_logps
from .tasks import PreferenceData

OFFLINE_KINDS = ("linear", "dare", "ties")


@dataclass(frozen=True)
class DPOSettings:
    checkpoints: tuple[int, ...] = (20, 40, 60, 90, 120, 180, 240)  # steps evaluated along each run
    batch: int = 32  # preference pairs per step
    lr: float = 3e-5
    warmup: int = 10
    beta: float = 0.1  # default DPO beta of every method but the second AdamW curve

    @property
    def steps(self) -> int:
        return max(self.checkpoints)


@dataclass(frozen=True)
class MethodPoint:
    """One point of one curve: a method and the value of the knob its curve sweeps."""

    method: str  # curve name
    knob: str  # what the curve sweeps ("beta", "alpha", "K", "keep_rate", "weight", "ema")
    value: float
    merge: dict = field(default_factory=dict)  # OnlineMergeConfig fields (trained methods)
    beta: float | None = None  # None: DPOSettings.beta
    offline: str | None = None  # "linear" / "dare" / "ties" for offline merges
    density: float = 0.5  # offline DARE / TIES density

    @property
    def label(self) -> str:
        return f"{self.method}[{self.knob}={self.value:g}]"


@dataclass(frozen=True)
class Grid:
    points: tuple[MethodPoint, ...]


# w = 1 is the SFT model, w = 0 the AdamW DPO model; the offline curves run from one to the other.
OFFLINE_WEIGHTS = (0.75, 0.5, 0.375, 0.25, 0.125, 0.0)


def method_grid(mode: str) -> Grid:
    """The curves run per seed. Quick mode runs one curve per method family (CI); full mode adds
    AdamW's own knob (a larger DPO beta) and OnTIES at the reference code's keep rate."""
    p = 0.1
    full = mode == "full"
    points: list[MethodPoint] = []
    points += [MethodPoint("adamw", "beta", b, {"method": "none"}, beta=b) for b in ((0.1, 0.3) if full else (0.1,))]
    points += [MethodPoint("ondare", "alpha", 1e-3, {"method": "dare", "alpha": 1e-3, "keep_rate": p})]
    if full:
        points += [MethodPoint("onties", "alpha", 1e-4, {"method": "ties", "alpha": 1e-4, "keep_rate": p})]
    points += [MethodPoint("onties_keep", "keep_rate", 0.5, {"method": "ties", "alpha": 1e-4, "keep_rate": 0.5})]
    if full:
        points += [MethodPoint("ema", "ema", 5e-2, {"method": "none", "weight_ema": 5e-2})]
    weights = OFFLINE_WEIGHTS if full else (0.5, 0.25)
    points += [MethodPoint("offline_linear", "weight", w, offline="linear") for w in weights]
    return Grid(tuple(points))


# ----------------------------------------------------------------------------- DPO with the project's optimizer
@dataclass
class ReferenceLogps:
    chosen: torch.Tensor
    rejected: torch.Tensor


@torch.no_grad()
def reference_logps(sft: LlamaForCausalLM, data: PreferenceData, chunk: int = 512) -> ReferenceLogps:
    """Computed once per seed: every DPO run of the seed starts from the same SFT model."""
    sft.eval()
    def run(batch):
        return torch.cat([sequence_logps(sft, batch.select(torch.arange(i, min(i + chunk, len(batch)))))
                          for i in range(0, len(batch), chunk)])
    return ReferenceLogps(run(data.chosen), run(data.rejected))


Checkpoint = Callable[[int, LlamaForCausalLM], None]


def train_dpo(point: MethodPoint, settings: DPOSettings, sft: LlamaForCausalLM, base: LlamaForCausalLM,
              data: PreferenceData, ref: ReferenceLogps, seed: int, on_checkpoint: Checkpoint) -> LlamaForCausalLM:
    """DPO from the SFT model with one optimizer configuration; `on_checkpoint(step, model)` is called
    at every step count of `settings.checkpoints` (with the EMA weights in place for the EMA baseline).
    Returns the final model (raw weights)."""
    policy = copy.deepcopy(sft)
    policy.train()
    config = OnlineMergeConfig(seed=seed, **point.merge)
    opt = OnlineMergingAdamW(list(policy.named_parameters()), lr=settings.lr, weight_decay=0.0, merge=config)
    if config.merges and config.alpha > 0:
        opt.set_reference_delta(reference=sft, base=base)
    beta = point.beta if point.beta is not None else settings.beta
    gen = torch.Generator().manual_seed(seed + 7)  # the same batches for every method of a seed
    n = len(data.chosen)
    checkpoints = set(settings.checkpoints)
    for step in range(settings.steps):
        for group in opt.param_groups:
            group["lr"] = settings.lr * min(1.0, (step + 1) / settings.warmup)
        index = torch.randint(0, n, (settings.batch,), generator=gen)
        chosen, rejected = data.chosen.select(index), data.rejected.select(index)
        logps = sequence_logps(policy, type(chosen)(
            torch.cat([chosen.input_ids, rejected.input_ids]),
            torch.cat([chosen.attention_mask, rejected.attention_mask]),
            torch.cat([chosen.completion_mask, rejected.completion_mask]),
        ))
        loss = dpo_loss(logps[: len(index)], logps[len(index):], ref.chosen[index], ref.rejected[index], beta).losses.mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{point.label}: DPO loss became {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step + 1 in checkpoints:
            policy.eval()
            if config.weight_ema > 0:
                with opt.weight_ema_applied():
                    on_checkpoint(step + 1, policy)
            else:
                on_checkpoint(step + 1, policy)
            policy.train()
    policy.eval()
    return policy


# ----------------------------------------------------------------------------- offline merging
def _dare(tau: torch.Tensor, name: str, stream: int, density: float, seed: int) -> torch.Tensor:
    kept = keep_positions(seed, name, 0, stream, ShardCoords.full(tau.shape), density)
    out = torch.zeros_like(tau).view(-1)
    out[kept] = tau.reshape(-1)[kept] / density  # DARE rescale keeps the merge unbiased
    return out.view_as(tau)


def _trim(tau: torch.Tensor, density: float) -> torch.Tensor:
    flat = tau.reshape(-1)
    kept = top_k_positions(flat.abs(), top_k_count(flat.numel(), density), lambda pos: pos)
    out = torch.zeros_like(flat)
    out[kept] = flat[kept]
    return out.view_as(tau)


@torch.no_grad()
def offline_merge(kind: str, weight: float, density: float, base: LlamaForCausalLM, dpo: LlamaForCausalLM,
                  sft: LlamaForCausalLM, seed: int) -> LlamaForCausalLM:
    """theta_base + (1 - w) * F(tau_dpo) (+) w * F(tau_sft); w = 1 is the SFT model, w = 0 the DPO model
    (linear). TIES uses the engine's sign consensus with alpha = w on the trimmed task vectors."""
    if kind not in OFFLINE_KINDS:
        raise ValueError(f"offline merge kind must be one of {OFFLINE_KINDS}, got {kind!r}")
    merged = copy.deepcopy(sft)
    base_p, dpo_p = dict(base.named_parameters()), dict(dpo.named_parameters())
    for name, param in merged.named_parameters():
        tau_dpo, tau_sft = dpo_p[name] - base_p[name], param - base_p[name]
        if kind == "linear":
            delta = (1 - weight) * tau_dpo + weight * tau_sft
        elif kind == "dare":
            delta = (1 - weight) * _dare(tau_dpo, name, 0, density, seed) + weight * _dare(tau_sft, name, 1, density, seed)
        else:
            delta = sign_unweighted(_trim(tau_dpo, density), _trim(tau_sft, density), weight)
        param.copy_(base_p[name] + delta)
    return merged
