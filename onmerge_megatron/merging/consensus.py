"""Consensus: how the sparsified update u and the sparsified reference delta r become one step.

Sign consensus acts on the union of the two kept sets (a term not kept there is 0) and gives one
vector added to the weights. Linear consensus (DARE) is two separate additions, done in merger.
"""

from __future__ import annotations

import torch


def sign_unweighted(update: torch.Tensor, reference: torch.Tensor, alpha: float) -> torch.Tensor:
    """TIES as the reference code does it: elect the sign of u + r (unweighted, 0 counts as +),
    drop every term of the other sign (and zeros), then weight what is left."""
    elected = torch.where(update + reference >= 0, 1.0, -1.0).to(update.dtype)
    keep_update = torch.sign(update) == elected
    keep_reference = torch.sign(reference) == elected
    return torch.where(keep_update, update * (1.0 - alpha), 0.0) + torch.where(keep_reference, reference * alpha, 0.0)


def sign_weighted(update: torch.Tensor, reference: torch.Tensor, alpha: float) -> torch.Tensor:
    """TIES as the paper's Eq. 7 reads: on a = (1 - alpha) u and b = alpha r, a + b where the signs
    agree, else the larger magnitude (both when equal, which sums to 0)."""
    a = update * (1.0 - alpha)
    b = reference * alpha
    agree = torch.sign(a) == torch.sign(b)
    disagree_sum = torch.where(a.abs() >= b.abs(), a, 0.0) + torch.where(b.abs() >= a.abs(), b, 0.0)
    return torch.where(agree, a + b, disagree_sum)


def reference_alone(reference: torch.Tensor, alpha: float) -> torch.Tensor:
    """Either election where the update is not kept (0): alpha r, with +0 where that is zero
    (the elections add +0 there, which turns -0 into +0), in one pass instead of a dozen."""
    return (reference * alpha).add_(0.0)


def sign_conflicts(update: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Positions where both terms are kept and their signs differ (a logged statistic, 0-d tensor)."""
    return ((update * reference) < 0).sum()
