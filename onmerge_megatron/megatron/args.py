"""Megatron-style command-line flags and the same settings as a dataclass, both generated from
OnlineMergeConfig's fields (name, type, default, help): ``--online-merge-<field>``.

In a Megatron-LM training script (see docs/megatron.md for the exact lines)::

    from onmerge_megatron.megatron.args import add_online_merge_args, enable_online_merging_in_megatron_lm

    enable_online_merging_in_megatron_lm()
    pretrain(..., extra_args_provider=add_online_merge_args)

In a script that builds the optimizer itself (NeMo-RL / verl / ms-swift style)::

    settings = OnlineMergeSettings.from_args(args)          # or OnlineMergeSettings(method="dare", ...)
    optimizer = get_megatron_optimizer(opt_config, model)
    optimizer = settings.install(optimizer, model) or optimizer
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import typing
from typing import Any, Callable, Literal, Sequence

from ..merging.config import OnlineMergeConfig, union_from_text

logger = logging.getLogger(__name__)

# Every flag and settings field below is generated from OnlineMergeConfig's fields: name, type,
# default ("front_end_default" where the front-ends differ from the engine) and help.
_ENGINE_FIELDS = dataclasses.fields(OnlineMergeConfig)
_ENGINE_TYPES = typing.get_type_hints(OnlineMergeConfig)


def _front_end_default(f: dataclasses.Field) -> Any:
    return f.metadata.get("front_end_default", f.default)


def _flag(name: str) -> str:
    """``--online-merge-<field>``; ``merge_every`` is ``--online-merge-every``, not ``...-merge-merge-every``."""
    return "--online-merge-" + name.removeprefix("merge_").replace("_", "-")


def _dest(name: str) -> str:
    # The method keeps the attribute name scripts read (``args.online_merge``), as its short flag does.
    return "online_merge" if name == "method" else _flag(name)[2:].replace("-", "_")


def _words_or_number(annotation: Any) -> Callable[[str], Any]:
    """Parser of a flag whose type is a union such as ``float | Literal['auto'] | None``."""
    members = typing.get_args(annotation)
    words = [w for m in members if typing.get_origin(m) is Literal for w in typing.get_args(m)]
    number = next(m for m in members if m in (int, float))

    def parse(text: str) -> Any:
        return union_from_text(annotation, text)

    parse.__name__ = " or ".join([number.__name__, *map(repr, words), *(["none"] if type(None) in members else [])])
    return parse


def _add_engine_flag(group: argparse._ArgumentGroup, f: dataclasses.Field) -> None:
    """The flag of one OnlineMergeConfig field: its type, front-end default and help."""
    annotation, dest, default = _ENGINE_TYPES[f.name], _dest(f.name), _front_end_default(f)
    flags = (_flag(f.name), "--online-merge") if f.name == "method" else (_flag(f.name),)
    text = f.metadata["help"].replace("%", "%%") + " (default: %(default)s)"
    if annotation is bool:  # --online-merge-x and --online-merge-no-x, as Megatron-LM spells switches
        group.add_argument(*flags, dest=dest, action="store_true", default=default, help=text)
        group.add_argument(_flag("no_" + f.name), dest=dest, action="store_false", default=default, help=f"The opposite of {flags[0]}.")
    elif typing.get_origin(annotation) is Literal:
        group.add_argument(*flags, dest=dest, choices=typing.get_args(annotation), default=default, help=text)
    else:
        parse = annotation if annotation in (int, float, str) else _words_or_number(annotation)
        group.add_argument(*flags, dest=dest, type=parse, default=default, help=text)


def add_online_merge_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--online-merge-<field>`` flags, one per OnlineMergeConfig field, plus where the base
    weights are; usable as Megatron-LM's ``extra_args_provider``. ``--online-merge METHOD`` is the
    short form of ``--online-merge-method``."""
    group = parser.add_argument_group(title="online merging (OnDARE / OnTIES, arXiv 2405.17931)")
    for f in _ENGINE_FIELDS:
        _add_engine_flag(group, f)
    for f in _BASE_FIELDS:
        group.add_argument(_flag(f.name), dest=_dest(f.name), type=str, default=f.default, help=f.metadata["help"])
    return parser


def combine_extra_args_providers(*providers: Callable[[argparse.ArgumentParser], argparse.ArgumentParser]) -> Callable:
    """One ``extra_args_provider`` from several (a script that already has its own)."""

    def provider(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        for add in providers:
            parser = add(parser) or parser
        return parser

    return provider


class _OnlineMergeSettingsMethods:
    """What OnlineMergeSettings does with its fields (the fields are generated below)."""

    def __post_init__(self) -> None:
        if self.base and self.base_hf:
            raise ValueError("online merge: give the base weights once: --online-merge-base or --online-merge-base-hf, not both")
        self.merge_config()  # validate now, naming the bad value

    @property
    def enabled(self) -> bool:
        return self.method != "none" or self.weight_ema > 0

    def merge_config(self) -> OnlineMergeConfig:
        return OnlineMergeConfig(**{f.name: getattr(self, f.name) for f in _ENGINE_FIELDS})

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
        """From parsed ``--online-merge*`` flags (Megatron-LM's ``get_args()`` or argparse); a flag
        the namespace lacks keeps its default."""
        names = [f.name for f in dataclasses.fields(cls)]
        return cls(**{name: getattr(args, _dest(name)) for name in names if hasattr(args, _dest(name))})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def install(self, megatron_optimizer: Any, model_chunks: Sequence[Any] | Any, *, defer_reference: bool = False, progress: bool = True) -> Any:
        """``install_online_merging`` with these settings; returns the optimizer to use from now on
        (an ``OnlineMergingOptimizer``), or None when disabled.

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


@dataclasses.dataclass(frozen=True)
class _BaseWeights:
    """Where the base (pre-trained) weights are: the settings beyond the engine's."""

    base: str | None = dataclasses.field(default=None, metadata={
        "help": "Base (pre-trained) weights as a Megatron dist checkpoint directory; the reference delta is the "
                "policy's initial (SFT) weights minus these."})
    base_hf: str | None = dataclasses.field(default=None, metadata={
        "help": "Base weights as a Hugging Face checkpoint (directory or hub id), converted with mbridge."})
    base_key_prefix: str = dataclasses.field(default="", metadata={
        "help": "Prefix of the model's keys in --online-merge-base (default: none, as Megatron-LM saves)."})


_BASE_FIELDS = dataclasses.fields(_BaseWeights)

OnlineMergeSettings = dataclasses.make_dataclass(
    "OnlineMergeSettings",
    [(f.name, _ENGINE_TYPES[f.name], dataclasses.field(default=_front_end_default(f), metadata=f.metadata)) for f in _ENGINE_FIELDS]
    + [(f.name, typing.get_type_hints(_BaseWeights)[f.name], dataclasses.field(default=f.default, metadata=f.metadata))
       for f in _BASE_FIELDS],
    bases=(_OnlineMergeSettingsMethods,),
    namespace={"__module__": __name__, "__doc__": "The ``--online-merge*`` flags as a dataclass (for YAML/Python configs instead of argparse): "
                          "OnlineMergeConfig's fields with the front-ends' defaults, plus base, base_hf, base_key_prefix."},
    frozen=True,
)


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
        merging = current.install(optimizer, chunks, defer_reference=True)
        if merging is None:
            return optimizer
        logger.info("online merge: %s installed on %s", current.merge_config(), type(optimizer).__name__)
        return merging

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
