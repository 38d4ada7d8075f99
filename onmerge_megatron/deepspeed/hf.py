"""OnlineMergingAdamW in the Hugging Face Trainer and TRL trainers (DPOTrainer, KTOTrainer, ...).

    from trl import DPOTrainer
    from onmerge_megatron.deepspeed.hf import OnlineMergeArguments, with_online_merge

    Trainer = with_online_merge(DPOTrainer)
    trainer = Trainer(model=..., args=dpo_config, ..., online_merge=OnlineMergeArguments(
        merge_method="dare", merge_keep_rate=0.01, merge_alpha=1e-7, merge_base_model="path/to/base"))

Why a subclass: under DeepSpeed the Trainer discards an optimizer passed as ``optimizers=(opt, s)``
(``deepspeed_init`` resets it and builds AdamW), and TRL trainers take no
``optimizer_cls_and_kwargs``. The subclass builds OnlineMergingAdamW in ``create_optimizer``,
which every backend calls (plain, DDP, DeepSpeed, FSDP2); an instance passed in ``optimizers`` is
kept and used the same way instead of being dropped.

The reference delta is installed at the first training step, once the backend has wrapped the
model and loaded any checkpoint: on DeepSpeed through `install_online_merging` (ZeRO partitions),
otherwise on the optimizer's own parameters (whole tensors, or FSDP2 DTensor shards).
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any, Literal

import torch

from ..merging.config import OnlineMergeConfig, union_from_text
from ..optim import OnlineMergingAdamW
from .checkpoint import load_universal_merge_state
from .compat import loads_universal_checkpoint, resolve_tag
from .zero import UnsupportedDeepSpeedSetup, ZeroOnlineMerge, install_online_merging


_ENGINE_TYPES = typing.get_type_hints(OnlineMergeConfig)


def _argument_name(name: str) -> str:
    """``merge_<field>``; ``merge_every`` stays ``merge_every``."""
    return "merge_" + name.removeprefix("merge_")


def _is_union(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)


def _argument_type(annotation: Any) -> Any:
    # HfArgumentParser takes a union only as Optional[X]: a union of a number and words (reference_clamp)
    # is read as text and converted in to_config.
    return str if _is_union(annotation) else annotation


def _from_text(annotation: Any, value: Any) -> Any:
    """A union-typed setting given as text (see `merging.config.union_from_text`)."""
    if not (_is_union(annotation) and isinstance(value, str)):
        return value
    try:
        return union_from_text(annotation, value)
    except ValueError:
        return value  # the engine refuses it, naming the field and the value


class _OnlineMergeArgumentsMethods:
    """What OnlineMergeArguments does with its fields (the fields are generated below)."""

    def to_config(self) -> OnlineMergeConfig:
        values = {f.name: _from_text(_ENGINE_TYPES[f.name], getattr(self, _argument_name(f.name))) for f in dataclasses.fields(OnlineMergeConfig)}
        extra = json.loads(self.merge_options) if isinstance(self.merge_options, str) else dict(self.merge_options)
        return OnlineMergeConfig.from_dict({**values, **extra}, where="online merge arguments")


# Generated from OnlineMergeConfig's fields (type, front-end default, help), so that HfArgumentParser /
# TrlParser offer --merge_<field> for every setting with the same defaults as the other front-ends.
OnlineMergeArguments = dataclasses.make_dataclass(
    "OnlineMergeArguments",
    [
        (_argument_name(f.name), _argument_type(_ENGINE_TYPES[f.name]),
         field(default=f.metadata.get("front_end_default", f.default), metadata={"help": f.metadata["help"]}))
        for f in dataclasses.fields(OnlineMergeConfig)
    ]
    + [
        ("merge_options", str, field(default="{}", metadata={
            "help": "OnlineMergeConfig fields as JSON, e.g. '{\"dare_rescale\": false}' (overrides the merge_* arguments)"})),
        ("merge_base_model", str | None, field(default=None, metadata={"help": "local folder/file of the pre-trained (base) weights"})),
        ("merge_reference_model", str | None, field(default=None, metadata={
            "help": "local folder/file of the SFT weights; default: the policy's weights at the first step"})),
    ],
    bases=(_OnlineMergeArgumentsMethods,),
    namespace={"__module__": __name__, "__doc__": "Merge settings as command-line arguments (usable with HfArgumentParser / "
                                                  "TrlParser): merge_<field> for every OnlineMergeConfig field."},
)


def install_on_parameters(optimizer: OnlineMergingAdamW, base: Any = None, reference: Any = None) -> None:
    """Reference delta for an optimizer stepping the model's own parameters (no DeepSpeed):
    whole tensors (single process, DDP) or FSDP2 DTensor shards (each segment's block)."""
    config = optimizer.merge_config
    if not config.needs_reference:
        return
    if reference is None and optimizer.keeps_restored_reference("pass the SFT weights as reference (merge_reference_model)"):
        return  # resumed: the checkpoint restored each parameter's reference delta
    if base is None:
        raise ValueError("online merge: alpha > 0 needs the base (pre-trained) weights (merge_base_model)")
    # reference=None: tau is taken against the weights the optimizer holds now, the SFT weights.
    optimizer.set_reference_delta(reference=reference, base=base)


class OnlineMergeTrainerMixin:
    """Builds OnlineMergingAdamW in create_optimizer and installs the merge at the first step.

    Put it before the Trainer class: ``class MyDPO(OnlineMergeTrainerMixin, DPOTrainer)``, or use
    `with_online_merge`. Extra keyword argument: ``online_merge=OnlineMergeArguments(...)``.
    """

    def __init__(self, *args: Any, online_merge: OnlineMergeArguments | None = None, **kwargs: Any) -> None:
        self.online_merge_args = online_merge if online_merge is not None else OnlineMergeArguments()
        self.online_merge_config = self.online_merge_args.to_config()
        self.online_merge: ZeroOnlineMerge | OnlineMergingAdamW | None = None
        # An instance in optimizers=(opt, scheduler) would be dropped under DeepSpeed and refused
        # under FSDP; keep it and hand it over in create_optimizer instead.
        self._online_merge_given: OnlineMergingAdamW | None = None
        optimizers = kwargs.get("optimizers")
        if optimizers and isinstance(optimizers[0], OnlineMergingAdamW):
            self._online_merge_given = optimizers[0]
            kwargs["optimizers"] = (None, optimizers[1])
            if online_merge is not None and optimizers[0].merge_config != self.online_merge_config:
                raise ValueError(
                    f"online merge trainer: the optimizer passed in optimizers= merges with {optimizers[0].merge_config}, "
                    f"but online_merge= asks for {self.online_merge_config}; give the settings once"
                )
            self.online_merge_config = optimizers[0].merge_config
        elif optimizers and optimizers[0] is not None:
            raise TypeError(f"online merge trainer: optimizers[0] must be an OnlineMergingAdamW or None, got {type(optimizers[0]).__name__}")
        super().__init__(*args, **kwargs)

    def create_optimizer(self) -> torch.optim.Optimizer:
        if self.optimizer is not None:
            return self.optimizer
        if self._online_merge_given is not None:
            self.optimizer = self._online_merge_given
            return self.optimizer
        model = self.model
        decay = set(self.get_decay_parameter_names(model))
        groups = []
        for wd, keep in ((self.args.weight_decay, lambda n: n in decay), (0.0, lambda n: n not in decay)):
            named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and keep(n)]
            if named:
                # Names travel with the params: masks are keyed by them.
                groups.append({"params": [p for _, p in named], "param_names": [n for n, _ in named], "weight_decay": wd})
        self.optimizer = OnlineMergingAdamW(
            groups,
            lr=self.args.learning_rate,
            betas=(self.args.adam_beta1, self.args.adam_beta2),
            eps=self.args.adam_epsilon,
            merge=self.online_merge_config,
        )
        return self.optimizer

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        # Remembered for universal checkpoints: DeepSpeed's ZeRO-3 loader skips the merge state.
        self._online_merge_resume = resume_from_checkpoint
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def training_step(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.online_merge is None:
            self._install_online_merge()
        return super().training_step(*args, **kwargs)

    def _install_online_merge(self) -> None:
        a = self.online_merge_args
        engine = getattr(self, "deepspeed", None) if getattr(self, "is_deepspeed_enabled", False) else None
        if engine is not None:
            self.online_merge = install_online_merging(engine, base=a.merge_base_model, reference=a.merge_reference_model)
            resume = getattr(self, "_online_merge_resume", None)
            if resume and loads_universal_checkpoint(engine):
                if resume is True:
                    from transformers.trainer_utils import get_last_checkpoint

                    resume = get_last_checkpoint(self.args.output_dir)
                load_universal_merge_state(self.online_merge, resolve_tag(Path(resume), None))
            return
        wrapped = getattr(self, "model_wrapped", None)
        if type(wrapped).__name__ == "FullyShardedDataParallel":
            raise UnsupportedDeepSpeedSetup(
                "online merge: FSDP1 (flat parameters) is not supported; use FSDP2 (accelerate fsdp_version: 2) or DeepSpeed"
            )
        optimizer = self.optimizer
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer
        if not isinstance(inner, OnlineMergingAdamW):
            raise UnsupportedDeepSpeedSetup(f"online merge: the trainer steps a {type(inner).__name__}, not OnlineMergingAdamW")
        install_on_parameters(inner, base=a.merge_base_model, reference=a.merge_reference_model)
        self.online_merge = inner

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        merged = self.online_merge
        if merged is not None and "loss" in logs:
            stats = merged.merge_stats()
            optimizer = merged.optimizer if isinstance(merged, ZeroOnlineMerge) else merged
            if not optimizer.track_update_norm:
                stats.pop("update_norm", None)  # not measured: would read 0
            logs.update({f"online_merge/{k}": v for k, v in stats.items()})
        super().log(logs, *args, **kwargs)


def with_online_merge(trainer_cls: type) -> type:
    """``with_online_merge(DPOTrainer)``: the trainer class with `OnlineMergeTrainerMixin` in front."""
    return type(f"OnlineMerge{trainer_cls.__name__}", (OnlineMergeTrainerMixin, trainer_cls), {})
