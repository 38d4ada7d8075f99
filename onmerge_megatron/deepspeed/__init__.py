"""Online merging under DeepSpeed: ZeRO-1/2/3 and BF16_Optimizer partitions, checkpoints, HF Trainer/TRL.

    optimizer = OnlineMergingAdamW(model.named_parameters(), lr=..., merge=OnlineMergeConfig(...))
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    install_online_merging(engine, base="path/to/base-model")   # before the first step / load_checkpoint

Importing this package does not import DeepSpeed or transformers. See docs/deepspeed.md.
"""

from .checkpoint import add_merge_state_to_universal, load_checkpoint, load_universal_merge_state, to_universal
from .hf import OnlineMergeArguments, OnlineMergeTrainerMixin, install_on_parameters, with_online_merge
from ..merging.sources import WeightSource, weight_source
from .zero import FlatPartition, Fragment, UnsupportedDeepSpeedSetup, ZeroOnlineMerge, check_engine, flat_partitions, install_online_merging

__all__ = [
    "FlatPartition",
    "Fragment",
    "OnlineMergeArguments",
    "OnlineMergeTrainerMixin",
    "UnsupportedDeepSpeedSetup",
    "WeightSource",
    "ZeroOnlineMerge",
    "add_merge_state_to_universal",
    "check_engine",
    "flat_partitions",
    "install_on_parameters",
    "install_online_merging",
    "load_checkpoint",
    "load_universal_merge_state",
    "to_universal",
    "weight_source",
    "with_online_merge",
]
