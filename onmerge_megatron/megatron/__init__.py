"""Online merging for megatron-core: wrap ``get_megatron_optimizer``'s result.

    from onmerge_megatron.megatron import install_online_merging, MegatronCheckpointBase
    optimizer = install_online_merging(optimizer, model, OnlineMergeConfig(method="dare"),
                                       reference_delta_source=MegatronCheckpointBase(base_dir))

megatron-core is imported lazily, so this package imports without it.
"""

from .compat import MegatronVersionError, OnlineMergeUnsupportedError
from .hf import HuggingFaceBase
from .optimizer import FROM_CHECKPOINT, MainShard, OnlineMergingOptimizer, install_online_merging
from .reference import BaseWeightsSource, MegatronCheckpointBase

__all__ = [
    "FROM_CHECKPOINT",
    "BaseWeightsSource",
    "HuggingFaceBase",
    "MainShard",
    "MegatronCheckpointBase",
    "MegatronVersionError",
    "OnlineMergeUnsupportedError",
    "OnlineMergingOptimizer",
    "install_online_merging",
]
