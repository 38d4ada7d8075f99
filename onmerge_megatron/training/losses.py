"""Preference losses on sequence log-probabilities, each named after its paper.

Every function takes *summed* completion log-probabilities (log pi(y|x) over the response
tokens only) of the policy and of the reference model, one value per sequence, and returns
per-sequence losses plus the implicit rewards. The definitions follow TRL's DPOTrainer /
KTOTrainer so that numbers are comparable with runs made there:

- DPO, sigmoid (Rafailov et al. 2023, arXiv 2305.18290), with the conservative-DPO label
  smoothing eps (Mitchell 2023): -(1-eps) log s(b*d) - eps log s(-b*d), d = chosen minus
  rejected log-ratio.
- IPO (Azar et al. 2023, arXiv 2310.12036, Eq. 17): (d_avg - 1/(2b))^2 where d_avg uses
  per-token *average* log-probs (TRL normalises by completion length; the IPO authors confirmed
  their results use that form).
- hinge (SLiC, Zhao et al. 2023, arXiv 2305.10425): relu(1 - b*d).
- KTO (Ethayarajh et al. 2024, arXiv 2402.01306, Eq. 7): unpaired; desirable examples get
  lambda_D (1 - s(b(r - z0))), undesirable ones lambda_U (1 - s(b(z0 - r))), r the log-ratio
  and z0 a detached, non-negative KL estimate from mismatched (prompt, completion) pairs.
- SFT term: mean negative log-likelihood of the chosen tokens (TRL's loss_type "sft"), added
  with a weight to any of the above (RPO-style regularisation).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

PAIRED_LOSSES = ("dpo", "ipo", "hinge")
LOSS_TYPES = PAIRED_LOSSES + ("kto", "sft")


@dataclass
class PairLoss:
    """Per-pair losses and the implicit rewards beta * (log pi - log pi_ref)."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> PairLoss:
    """DPO sigmoid loss with conservative label smoothing (0 = plain DPO)."""
    chosen_logratios = policy_chosen_logps - reference_chosen_logps
    rejected_logratios = policy_rejected_logps - reference_rejected_logps
    logits = chosen_logratios - rejected_logratios
    losses = (
        -F.logsigmoid(beta * logits) * (1.0 - label_smoothing)
        - F.logsigmoid(-beta * logits) * label_smoothing
    )
    return PairLoss(losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach())


def ipo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    beta: float,
) -> PairLoss:
    """IPO loss on length-normalised log-ratios; beta is the paper's tau."""
    chosen_logratios = policy_chosen_logps - reference_chosen_logps
    rejected_logratios = policy_rejected_logps - reference_rejected_logps
    # Sums over completions make the squared loss scale with length; TRL averages per token.
    delta = chosen_logratios / chosen_lengths.clamp(min=1) - rejected_logratios / rejected_lengths.clamp(min=1)
    losses = (delta - 1.0 / (2.0 * beta)) ** 2
    return PairLoss(losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach())


def hinge_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
) -> PairLoss:
    """SLiC hinge loss on the DPO logit."""
    chosen_logratios = policy_chosen_logps - reference_chosen_logps
    rejected_logratios = policy_rejected_logps - reference_rejected_logps
    losses = torch.relu(1.0 - beta * (chosen_logratios - rejected_logratios))
    return PairLoss(losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach())


@dataclass
class UnpairedLoss:
    """Per-example KTO losses (desirable and undesirable mixed, in input order)."""

    losses: torch.Tensor
    rewards: torch.Tensor
    kl: torch.Tensor


def kto_kl_estimate(policy_mismatched_logps: torch.Tensor, reference_mismatched_logps: torch.Tensor) -> torch.Tensor:
    """z0: detached mean log-ratio on mismatched (prompt, completion) pairs, clamped at 0 (TRL)."""
    if policy_mismatched_logps.numel() == 0:
        return torch.zeros((), dtype=policy_mismatched_logps.dtype, device=policy_mismatched_logps.device)
    return (policy_mismatched_logps - reference_mismatched_logps).mean().detach().clamp(min=0)


def kto_loss(
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> UnpairedLoss:
    """KTO loss for a mixed batch; `desirable` is a bool tensor (label True = chosen)."""
    logratios = policy_logps - reference_logps
    kl = kl.detach()
    desirable_losses = desirable_weight * (1.0 - torch.sigmoid(beta * (logratios - kl)))
    undesirable_losses = undesirable_weight * (1.0 - torch.sigmoid(beta * (kl - logratios)))
    losses = torch.where(desirable.bool(), desirable_losses, undesirable_losses)
    return UnpairedLoss(losses, beta * logratios.detach(), kl)


def sft_loss(chosen_logps: torch.Tensor, chosen_lengths: torch.Tensor) -> torch.Tensor:
    """Mean NLL per chosen token over the batch (TRL 'sft'): -sum(log p) / number of tokens."""
    return -chosen_logps.sum() / chosen_lengths.sum().clamp(min=1)


def paired_loss(
    loss_type: str,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> PairLoss:
    """Dispatch on the loss name used in configs: 'dpo', 'ipo' or 'hinge'."""
    args = (policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    if loss_type == "dpo":
        return dpo_loss(*args, beta=beta, label_smoothing=label_smoothing)
    if loss_type == "ipo":
        return ipo_loss(*args, chosen_lengths, rejected_lengths, beta=beta)
    if loss_type == "hinge":
        return hinge_loss(*args, beta=beta)
    raise ValueError(f"unknown paired loss {loss_type!r}; expected one of {PAIRED_LOSSES}")
