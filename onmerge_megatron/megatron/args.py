"""Megatron-style command-line flags and the same settings as a dataclass.

In a Megatron-LM training script (see docs/megatron.md for the exact lines)::

    from onmerge_megatron.megatron.args import add_online_merge_args, enable_online_merging_in_megatron_lm

    enable_online_merging_in_megatron_lm()
    pretrain(..., extra_args_provider=add_online_merge_args)

In a script that builds the optimizer itself (NeMo-RL / verl / ms-swift style)::

    settings = OnlineMergeSettings.from_args(args)          # or OnlineMergeSettings(method="dare", ...)
    optimizer = get_megatron_optimizer(opt_config, model)
    merging = settings.install(optimizer, model)
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

from ..merging.config import OnlineMergeConfig

logger = logging.getLogger(__name__)

_DEFAULTS = OnlineMergeConfig()


def _clamp(value: str) -> float | Literal["auto"] | None:
    if value.lower() == "auto":
        return "auto"
    return None if value.lower() in ("none", "off", "0") else float(value)


def add_online_merge_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--online-merge*`` flags; usable as Megatron-LM's ``extra_args_provider``."""
    group = parser.add_argument_group(title="online merging (OnDARE / OnTIES, arXiv 2405.17931)")
    group.add_argument("--online-merge", choices=("dare", "ties", "none"), default="none",
                       help="Merge every optimizer step with the reference delta (SFT minus base): "
                            "OnDARE (random keep-mask) or OnTIES (top-p and sign consensus). Default: none.")
    group.add_argument("--online-merge-keep-rate", type=float, default=_DEFAULTS.keep_rate,
                       help="p: fraction of update/delta elements kept (paper script: 0.01).")
    group.add_argument("--online-merge-alpha", type=float, default=_DEFAULTS.alpha,
                       help="Weight of the reference delta; the update gets 1 - alpha (paper: 1e-7 .. 1e-6).")
    group.add_argument("--online-merge-every", type=int, default=_DEFAULTS.merge_every,
                       help="K: merge every K-th step, accumulating plain updates in between.")
    group.add_argument("--online-merge-base", type=str, default=None,
                       help="Base (pre-trained) weights as a Megatron dist checkpoint directory; the "
                            "reference delta is the policy's initial (SFT) weights minus these.")
    group.add_argument("--online-merge-base-hf", type=str, default=None,
                       help="Base weights as a Hugging Face checkpoint (directory or hub id), converted with mbridge.")
    group.add_argument("--online-merge-base-key-prefix", type=str, default="",
                       help="Prefix of the model's keys in --online-merge-base (default: none, as Megatron-LM saves).")
    group.add_argument("--online-merge-seed", type=int, default=_DEFAULTS.seed,
                       help="Key of the counter-based keep-masks (layout independent).")
    group.add_argument("--online-merge-ties-scope", choices=("shard", "tensor"), default=_DEFAULTS.ties_scope,
                       help="OnTIES top-p over each rank's shard (no collective) or the whole tensor (TP only).")
    group.add_argument("--online-merge-sign-election", choices=("unweighted", "weighted"), default=_DEFAULTS.sign_election)
    group.add_argument("--online-merge-reference-mask", choices=("fixed", "resampled"), default=_DEFAULTS.reference_mask)
    group.add_argument("--online-merge-reference-clamp", type=_clamp, default=_DEFAULTS.reference_clamp,
                       help="Clamp the sparsified reference delta to [-c, c]; 'none' disables; 'auto' (default) "
                            "follows the reference code: 1.0 for OnDARE, none for OnTIES.")
    group.add_argument("--online-merge-no-dare-rescale", action="store_true",
                       help="Do not scale kept OnDARE elements by 1/p.")
    group.add_argument("--online-merge-l1-rescale", action="store_true",
                       help="Rescale the sparsified update to the dense update's L1 norm.")
    group.add_argument("--online-merge-weight-ema", type=float, default=_DEFAULTS.weight_ema,
                       help="Baseline instead of merging: EMA of the weights with this rate (0 = off).")
    return parser


def combine_extra_args_providers(*providers: Callable[[argparse.ArgumentParser], argparse.ArgumentParser]) -> Callable:
    """One ``extra_args_provider`` from several (a script that already has its own)."""

    def provider(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        for add in providers:
            parser = add(parser) or parser
        return parser

    return provider


@dataclass(frozen=True)
class OnlineMergeSettings:
    """The ``--online-merge*`` flags as a dataclass (for YAML/Python configs instead of argparse)."""

    method: Literal["dare", "ties", "none"] = "none"
    keep_rate: float = _DEFAULTS.keep_rate
    alpha: float = _DEFAULTS.alpha
    merge_every: int = _DEFAULTS.merge_every
    base: str | None = None
    """Megatron dist checkpoint of the base model."""
    base_hf: str | None = None
    """Hugging Face base checkpoint (converted with mbridge)."""
    base_key_prefix: str = ""
    seed: int = _DEFAULTS.seed
    ties_scope: Literal["shard", "tensor"] = _DEFAULTS.ties_scope
    sign_election: Literal["unweighted", "weighted"] = _DEFAULTS.sign_election
    reference_mask: Literal["fixed", "resampled"] = _DEFAULTS.reference_mask
    reference_clamp: float | Literal["auto"] | None = _DEFAULTS.reference_clamp
    dare_rescale: bool = _DEFAULTS.dare_rescale
    l1_rescale: bool = _DEFAULTS.l1_rescale
    weight_ema: float = _DEFAULTS.weight_ema

    def __post_init__(self) -> None:
        if self.base and self.base_hf:
            raise ValueError("online merge: give the base weights once: --online-merge-base or --online-merge-base-hf, not both")
        self.merge_config()  # validate now, naming the bad value

    @property
    def enabled(self) -> bool:
        return self.method != "none" or self.weight_ema > 0

    def merge_config(self) -> OnlineMergeConfig:
        return OnlineMergeConfig(
            method=self.method, keep_rate=self.keep_rate, alpha=self.alpha, merge_every=self.merge_every,
            dare_rescale=self.dare_rescale, l1_rescale=self.l1_rescale, reference_clamp=self.reference_clamp,
            reference_mask=self.reference_mask, sign_election=self.sign_election, ties_scope=self.ties_scope,
            seed=self.seed, weight_ema=self.weight_ema,
        )

    def reference_source(self) -> Any:
        """Where the reference delta comes from (None if no base was given)."""
        if self.base:
            from .reference import MegatronCheckpointBase

            return MegatronCheckpointBase(self.base, key_prefix=self.base_key_prefix)
        if self.base_hf:
            from .hf import HuggingFaceBase

            return HuggingFaceBase(self.base_hf)
        return None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "OnlineMergeSettings":
        """From parsed ``--online-merge*`` flags (Megatron-LM's ``get_args()`` or argparse)."""
        get = functools.partial(getattr, args)
        return cls(
            method=get("online_merge", "none"),
            keep_rate=get("online_merge_keep_rate", _DEFAULTS.keep_rate),
            alpha=get("online_merge_alpha", _DEFAULTS.alpha),
            merge_every=get("online_merge_every", _DEFAULTS.merge_every),
            base=get("online_merge_base", None),
            base_hf=get("online_merge_base_hf", None),
            base_key_prefix=get("online_merge_base_key_prefix", ""),
            seed=get("online_merge_seed", _DEFAULTS.seed),
            ties_scope=get("online_merge_ties_scope", _DEFAULTS.ties_scope),
            sign_election=get("online_merge_sign_election", _DEFAULTS.sign_election),
            reference_mask=get("online_merge_reference_mask", _DEFAULTS.reference_mask),
            reference_clamp=get("online_merge_reference_clamp", _DEFAULTS.reference_clamp),
            dare_rescale=not get("online_merge_no_dare_rescale", False),
            l1_rescale=get("online_merge_l1_rescale", False),
            weight_ema=get("online_merge_weight_ema", _DEFAULTS.weight_ema),
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def install(self, megatron_optimizer: Any, model_chunks: Sequence[Any] | Any, *, defer_reference: bool = False, progress: bool = True) -> Any:
        """``install_online_merging`` with these settings; returns the handle (None when disabled).

        ``defer_reference``: build the reference delta at the first ``step()`` instead of now,
        for scripts that load the SFT weights after creating the optimizer (Megatron-LM's
        ``pretrain``); skipped when a checkpoint with merge state was loaded by then.
        """
        if not self.enabled:
            return None
        from .optimizer import FROM_CHECKPOINT, install_online_merging

        config = self.merge_config()
        source = self.reference_source()
        if config.needs_reference and source is None:
            if not defer_reference:
                raise ValueError(
                    "online merge: alpha > 0 needs the base weights: --online-merge-base (Megatron dist "
                    "checkpoint) or --online-merge-base-hf (Hugging Face)"
                )
            source = FROM_CHECKPOINT
        return install_online_merging(megatron_optimizer, model_chunks, config, source, progress=progress, defer_reference=defer_reference)


def wrap_optimizer_factory(factory: Callable[..., Any], settings: Callable[[], OnlineMergeSettings]) -> Callable[..., Any]:
    """A ``get_megatron_optimizer`` that installs online merging on what ``factory`` returns.

    ``settings`` is called at optimizer creation (e.g. reading Megatron-LM's parsed args then).
    The model chunks are ``factory``'s second positional argument or its ``model_chunks`` keyword.
    """

    @functools.wraps(factory)
    def get_megatron_optimizer(*args: Any, **kwargs: Any) -> Any:
        optimizer = factory(*args, **kwargs)
        chunks = kwargs.get("model_chunks", args[1] if len(args) > 1 else None)
        if chunks is None:
            raise TypeError("online merge: could not find the model chunks among get_megatron_optimizer's arguments")
        current = settings()
        handle = current.install(optimizer, chunks, defer_reference=True)
        if handle is not None:
            logger.info("online merge: %s installed on %s", current.merge_config(), type(optimizer).__name__)
        return optimizer

    get_megatron_optimizer.__wrapped_by_online_merge__ = True  # type: ignore[attr-defined]
    return get_megatron_optimizer


def enable_online_merging_in_megatron_lm() -> None:
    """Make Megatron-LM's ``pretrain`` build online-merging optimizers from the ``--online-merge*`` flags.

    Replaces ``megatron.training.training.get_megatron_optimizer`` (looked up by name) with
    ``wrap_optimizer_factory(original, lambda: OnlineMergeSettings.from_args(get_args()))``.
    Checkpoints written by ``pretrain`` then hold the merge state (see checkpoint.py). The
    reference delta is built at the first step, after ``pretrain`` has loaded the SFT weights.
    """
    try:
        import megatron.training.training as training
        from megatron.training import get_args
    except ImportError as exc:
        raise ImportError(
            "online merge: megatron.training (Megatron-LM's training package) is not importable; it is not "
            "part of the megatron-core wheel. Without it, call install_online_merging after get_megatron_optimizer."
        ) from exc
    original = getattr(training, "get_megatron_optimizer", None)
    if original is None:
        raise RuntimeError("online merge: megatron.training.training has no get_megatron_optimizer to wrap (renamed?)")
    if getattr(original, "__wrapped_by_online_merge__", False):
        return
    training.get_megatron_optimizer = wrap_optimizer_factory(original, lambda: OnlineMergeSettings.from_args(get_args()))
