"""Settings of the online merge, validated when they are built, and which of them saved merge state depends on."""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

Method = Literal["dare", "ties", "none"]

_CHOICES = {
    "method": ("dare", "ties", "none"),
    "reference_mask": ("fixed", "resampled"),
    "sign_election": ("unweighted", "weighted"),
    "ties_scope": ("shard", "tensor"),
}


@dataclass(frozen=True)
class OnlineMergeConfig:
    """How each optimizer step is merged with the reference delta (SFT minus base).

    Defaults reproduce the public reference implementation; the paper's readings are options.
    See docs/algorithm.md for every field.
    """

    # One default per setting: the Megatron-LM flags, the Hugging Face/TRL arguments and the trainer's
    # YAML keys are generated from these fields, their defaults and their "help".
    method: Method = field(default="dare", metadata={
        "help": "dare (OnDARE: random keep-mask), ties (OnTIES: top-p and sign consensus) or none (plain AdamW). "
                "The front-ends (Megatron-LM flags, Hugging Face arguments, trainer YAML) default to none, so that "
                "adding them to a training script changes nothing until a method is chosen.",
        # Read by the front-ends instead of `default`; the engine itself merges when it is built.
        "front_end_default": "none",
    })
    keep_rate: float = field(default=0.01, metadata={
        "help": "p: fraction of elements kept by the sparsifier (Bernoulli rate for DARE, top-p for TIES)."})
    alpha: float = field(default=1e-7, metadata={
        "help": "Merge weight of the reference delta; the update is weighted 1 - alpha. 0 = gradient dropout."})
    merge_every: int = field(default=1, metadata={
        "help": "K of the paper's Algorithm 2: plain steps are accumulated and merged every K-th step."})
    dare_rescale: bool = field(default=True, metadata={
        "help": "Scale kept DARE elements by 1/p (reference code), making the sparsifier unbiased."})
    l1_rescale: bool = field(default=False, metadata={
        "help": "Scale the sparsified update to the L1 norm of the dense one, then clamp to [-1, 1]."})
    reference_clamp: float | Literal["auto"] | None = field(default="auto", metadata={
        "help": "Clamp the sparsified reference delta to [-c, c]; None disables it. 'auto' follows the reference "
                "code: 1.0 for OnDARE (its ODAdamW clamps), None for OnTIES (its OTAdamW does not)."})
    reference_mask: Literal["fixed", "resampled"] = field(default="fixed", metadata={
        "help": "'fixed': the reference delta's mask is drawn once (reference code); 'resampled': every merge."})
    sign_election: Literal["unweighted", "weighted"] = field(default="unweighted", metadata={
        "help": "TIES consensus on raw sparsified terms (reference code) or on alpha-weighted ones (paper Eq. 7)."})
    ties_scope: Literal["shard", "tensor"] = field(default="shard", metadata={
        "help": "TIES top-p over the piece a rank owns (no collective) or over the whole tensor (exact)."})
    seed: int = field(default=0, metadata={
        "help": "Key of the counter-based keep-masks; masks never depend on RNG stream state."})
    weight_ema: float = field(default=0.0, metadata={
        "help": "Baseline, not a merge: keep an exponential moving average of the weights (paper: 1e-3)."})

    def __post_init__(self) -> None:
        for key, allowed in _CHOICES.items():
            value = getattr(self, key)
            if value not in allowed:
                raise ValueError(f"online merge: {key} must be one of {allowed}, got {value!r}")
        if not (isinstance(self.keep_rate, (int, float)) and 0.0 < self.keep_rate <= 1.0):
            raise ValueError(f"online merge: keep_rate must be in (0, 1], got {self.keep_rate!r}")
        if not (isinstance(self.alpha, (int, float)) and 0.0 <= self.alpha <= 1.0):
            raise ValueError(f"online merge: alpha must be in [0, 1], got {self.alpha!r}")
        if isinstance(self.merge_every, bool) or not isinstance(self.merge_every, int) or self.merge_every < 1:
            raise ValueError(f"online merge: merge_every must be an integer >= 1, got {self.merge_every!r}")
        if self.reference_clamp not in (None, "auto") and not (
            isinstance(self.reference_clamp, (int, float))
            and not isinstance(self.reference_clamp, bool)
            and self.reference_clamp > 0
            and math.isfinite(self.reference_clamp)
        ):
            raise ValueError(f"online merge: reference_clamp must be a positive number, 'auto' or None, got {self.reference_clamp!r}")
        if not (isinstance(self.weight_ema, (int, float)) and 0.0 <= self.weight_ema < 1.0):
            raise ValueError(f"online merge: weight_ema must be in [0, 1), got {self.weight_ema!r}")
        if self.method == "ties" and self.reference_mask == "resampled":
            raise ValueError("online merge: reference_mask='resampled' has no meaning with method='ties' (the top-p of a fixed delta is fixed)")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"online merge: seed must be a non-negative integer, got {self.seed!r}")

    @property
    def merges(self) -> bool:
        """True when steps are sparsified/merged at all (method is not 'none')."""
        return self.method != "none"

    @property
    def resolved_reference_clamp(self) -> float | None:
        """The clamp applied to the sparsified reference delta, 'auto' resolved for this method.

        Resolved here rather than stored, so that ``dataclasses.replace(config, method=...)`` and
        to_dict/from_dict round trips keep following the method."""
        if self.reference_clamp == "auto":
            return 1.0 if self.method == "dare" else None
        return self.reference_clamp

    @property
    def needs_reference(self) -> bool:
        """A reference delta is needed unless nothing is merged or alpha is 0 (gradient dropout)."""
        return self.merges and self.alpha > 0.0

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], where: str = "online merge config") -> "OnlineMergeConfig":
        """Build from a mapping (YAML, CLI), naming any unknown key."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; expected some of {sorted(known)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def union_from_text(annotation: Any, text: str) -> Any:
    """A setting of a union type (``reference_clamp``: a number, 'auto' or None) given as text on a
    command line: one of its words, 'none' (or 'off', '0': a bound of 0 is refused anyway) for
    None, else a number. ValueError when it is none of these."""
    members = typing.get_args(annotation)
    word = text.lower()
    if any(typing.get_origin(m) is Literal and word in typing.get_args(m) for m in members):
        return word
    if type(None) in members and word in ("none", "off", "0"):
        return None
    number = next(m for m in members if m in (int, float))
    return number(text)


class MergeCheckpointError(RuntimeError):
    """Saved merge state cannot be used with this run's settings."""


def reference_settings(config: OnlineMergeConfig) -> dict[str, Any]:
    """The settings a stored reference delta depends on (resolved): which elements it holds and how
    its values were made. Empty when the config uses no reference delta.

    A fixed DARE mask is not stored but redrawn from (seed, keep_rate), and the kept values are
    stored rescaled and clamped; TIES stores the top-p positions it chose (per keep_rate and
    ties_scope) and the clamped values; a resampled mask stores the raw, dense delta, from which
    every merge draws, rescales and clamps anew.
    """
    if not config.needs_reference:
        return {}
    settings: dict[str, Any] = {"method": config.method, "reference_mask": config.reference_mask}
    if config.reference_mask == "resampled":
        return settings
    settings.update(keep_rate=config.keep_rate, reference_clamp=config.resolved_reference_clamp)
    if config.method == "dare":
        settings.update(seed=config.seed, dare_rescale=config.dare_rescale)
    else:
        settings.update(ties_scope=config.ties_scope)
    return settings


def check_compatible(saved: OnlineMergeConfig, current: OnlineMergeConfig) -> None:
    """Refuse to resume state saved under ``saved`` with ``current`` where the saved reference delta
    would be read at the wrong elements or with the wrong values. Everything else may change on a
    resume (alpha, sign_election, l1_rescale, merge_every, weight_ema; any setting when either
    config uses no reference delta: there is none to misread, or it is not used)."""
    before, now = reference_settings(saved), reference_settings(current)
    if not before or not now:
        return
    # A setting only one side depends on differs only when method or reference_mask does, and those are named.
    changed = [key for key in before if key in now and before[key] != now[key]]
    if changed:
        values = ", ".join(f"{key}: {before[key]!r} saved, {now[key]!r} now" for key in changed)
        raise MergeCheckpointError(
            f"online merge: the saved reference delta was built with other settings ({values}); resume with the "
            "saved settings, or set the reference delta again from the base weights (set_reference_delta)"
        )
