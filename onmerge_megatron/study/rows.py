"""One scored point of the study: a seed, a curve (method, knob, value) and a step or merge weight."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Row:
    seed: int
    method: str
    knob: str
    value: float
    step: int  # DPO steps (offline merges: those of the AdamW model they merge; SFT: 0)
    weight: float  # offline merge weight w (1 = the SFT model); -1 for trained points
    reward: float  # share of greedy outputs in the preferred style (lm-eval task study_style)
    accuracy: float  # mean of the skills' exact accuracies
    accuracy_add: float
    accuracy_rev: float
    tax: float  # SFT accuracy minus accuracy (mean over the skills; positive = capability lost)
    implicit_reward_accuracy: float  # held-out pairs; NaN for the SFT model itself
    heldout_ppl: float
    seconds: float


METRICS = ("reward", "accuracy", "tax", "accuracy_add", "accuracy_rev", "heldout_ppl")
