"""Online merging for megatron-core: install on ``get_megatron_optimizer``'s result.

    from onmerge_megatron.megatron import install_online_merging, MegatronCheckpointBase
    merging = install_online_merging(optimizer, model, OnlineMergeConfig(method="dare"),
                                     reference_delta_source=MegatronCheckpointBase(base_dir))

megatron-core is imported lazily, so this package imports without it.
"""

from .optimizer import FROM_CHECKPOINT, MainShard, OnlineMergeUnsupportedError, OnlineMergingHandle, install_online_merging
from .hf import HuggingFaceBase
from .reference import BaseWeightsSource, MegatronCheckpointBase, build_reference_deltas

__all__ = [
    "FROM_CHECKPOINT",
    "HuggingFaceBase",
    "BaseWeightsSource",
    "MainShard",
    "MegatronCheckpointBase",
    "OnlineMergeUnsupportedError",
    "OnlineMergingHandle",
    "build_reference_deltas",
    "install_online_merging",
]
