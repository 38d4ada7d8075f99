"""Online merging optimizers (OnDARE, OnTIES, step-K) for Megatron-core, DeepSpeed and PyTorch."""

from .merging import OnlineMergeConfig, ShardCoords
from .optim import OnlineMergingAdamW, Segment

__version__ = "0.1.0"
__all__ = ["OnlineMergeConfig", "OnlineMergingAdamW", "Segment", "ShardCoords", "__version__"]
