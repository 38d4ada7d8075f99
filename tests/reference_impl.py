"""Independent dense transcriptions of the algorithm, written from the paper and docs/algorithm.md, for tests.

They share only the keep-mask generator with the engine (its bits are tested on their own), and
otherwise use the plainest tensor code: full sorts for top-k, dense masks, explicit Adam.
"""

from __future__ import annotations

import numpy as np
import torch

from onmerge_megatron.merging import rng
from onmerge_megatron.merging.coords import ShardCoords


def dare_mask(seed: int, name: str, step: int, stream: int, shape: tuple[int, ...], keep_rate: float) -> torch.Tensor:
    """Dense boolean mask of the whole tensor."""
    mask = torch.zeros(int(np.prod(shape)), dtype=torch.bool)
    mask[rng.keep_positions(seed, name, step, stream, ShardCoords.full(shape), keep_rate)] = True
    return mask


def moves_outside_dare_masks(
    before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], keep_rate: float, steps: int, seed: int = 0
) -> tuple[list[str], int]:
    """OnDARE (fixed tau mask) may change an element only where tau's mask or one of the steps'
    update masks keeps it: the tensors with an element moved elsewhere, and the count of moved elements."""
    outside, moved_total = [], 0
    for name, old in before.items():
        moved = (after[name].float() != old.float()).reshape(-1)
        allowed = dare_mask(seed, name, 0, rng.STREAM_REFERENCE, tuple(old.shape), keep_rate)
        for step in range(1, steps + 1):
            allowed |= dare_mask(seed, name, step, rng.STREAM_UPDATE, tuple(old.shape), keep_rate)
        if (moved & ~allowed).any():
            outside.append(name)
        moved_total += int(moved.sum())
    return outside, moved_total


def top_k_mask(x: torch.Tensor, keep_rate: float, global_index: torch.Tensor | None = None) -> torch.Tensor:
    """Keep floor(p n) largest |x|, ties to the lower global index, by a full lexicographic sort."""
    x = x.reshape(-1)
    n = x.numel()
    k = int(n * keep_rate)
    if k < 1 or k >= n:
        return torch.ones(n, dtype=torch.bool)
    gidx = np.arange(n) if global_index is None else global_index.numpy()
    order = np.lexsort((gidx, -x.abs().double().numpy()))  # primary: |x| desc; secondary: index asc
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.from_numpy(order[:k])] = True
    return mask


def ties_consensus(u: torch.Tensor, r: torch.Tensor, alpha: float, weighted: bool) -> torch.Tensor:
    """Element by element, as docs/algorithm.md states both rules."""
    out = torch.zeros_like(u)
    for i in range(u.numel()):
        a, b = float(u[i]), float(r[i])
        if not weighted:
            s = 1.0 if (torch.tensor(a, dtype=u.dtype) + torch.tensor(b, dtype=u.dtype)) >= 0 else -1.0
            ka = a != 0 and np.sign(a) == s
            kb = b != 0 and np.sign(b) == s
            wa = torch.tensor(a, dtype=u.dtype) * (1.0 - alpha) if ka else torch.tensor(0.0, dtype=u.dtype)
            wb = torch.tensor(b, dtype=u.dtype) * alpha if kb else torch.tensor(0.0, dtype=u.dtype)
            out[i] = wa + wb
        else:
            wa = torch.tensor(a, dtype=u.dtype) * (1.0 - alpha)
            wb = torch.tensor(b, dtype=u.dtype) * alpha
            if np.sign(float(wa)) == np.sign(float(wb)):
                out[i] = wa + wb
            else:
                out[i] = (wa if abs(wa) >= abs(wb) else 0.0) + (wb if abs(wb) >= abs(wa) else 0.0)
    return out


class Algorithm2:
    """Paper Algorithm 2 (step-K online merging on Adam) on full tensors, with reference-code
    defaults (DARE rescale, fixed tau mask, unweighted sign election; tau clamped to [-1, 1] for
    DARE only: the reference ODAdamW clamps, OTAdamW does not)."""

    def __init__(self, params: dict[str, torch.Tensor], delta: dict[str, torch.Tensor], *, method: str, keep_rate: float,
                 alpha: float, merge_every: int, lr: float, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, seed=0):
        self.params = {n: p.detach().clone() for n, p in params.items()}
        self.m = {n: torch.zeros_like(p) for n, p in self.params.items()}
        self.v = {n: torch.zeros_like(p) for n, p in self.params.items()}
        self.cache = {n: torch.zeros_like(p) for n, p in self.params.items()}
        self.method, self.p, self.alpha, self.K = method, keep_rate, alpha, merge_every
        self.lr, self.betas, self.eps, self.wd, self.seed = lr, betas, eps, weight_decay, seed
        self.t = 0
        self.tau = {}
        for n, d in delta.items():
            d = d.reshape(-1).float()
            if method == "dare":
                kept = torch.where(dare_mask(seed, n, 0, rng.STREAM_REFERENCE, tuple(d.shape), keep_rate), d, 0.0) / keep_rate
                self.tau[n] = kept.clamp(-1.0, 1.0)
            else:
                self.tau[n] = torch.where(top_k_mask(d, keep_rate), d, 0.0)

    def step(self, grads: dict[str, torch.Tensor]) -> None:
        self.t += 1
        b1, b2 = self.betas
        for n, theta in self.params.items():
            g = grads[n].reshape(-1)
            flat = theta.view(-1)
            flat.mul_(1 - self.lr * self.wd)
            m, v = self.m[n].view(-1), self.v[n].view(-1)
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            step_size = self.lr / (1 - b1**self.t)
            dtheta = (m / (v.sqrt() / (1 - b2**self.t) ** 0.5 + self.eps)) * (-step_size)
            cache = self.cache[n].view(-1)
            if self.t % self.K == 0:
                flat.sub_(cache)  # roll back
                dtheta = dtheta + cache
                cache.zero_()
                if self.method == "dare":
                    mask = dare_mask(self.seed, n, self.t, rng.STREAM_UPDATE, tuple(flat.shape), self.p)
                    flat.add_(torch.where(mask, dtheta / self.p, 0.0) * (1 - self.alpha))
                    flat.add_(self.tau[n] * self.alpha)
                else:
                    f = torch.where(top_k_mask(dtheta, self.p), dtheta, 0.0)
                    flat.add_(ties_consensus(f, self.tau[n], self.alpha, weighted=False))
            else:
                cache.add_(dtheta)
                flat.add_(dtheta)
