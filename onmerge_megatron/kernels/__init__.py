"""Fused GPU kernels for the online merging optimizers (Triton; optional).

`FusedOnlineMergingAdamW` is a drop-in for `OnlineMergingAdamW` (same hyper-parameters, same state
keys, same results bit for bit where the kernel's rounding matches, see docs/kernels.md). It plugs
into the engine through its hooks (`OnlineMergingAdamW._dense_pass`, `merging.merger.MergeHooks`),
runs the fused kernel on CUDA tensors when Triton can be imported and leaves everything to the
engine otherwise, so importing this package never requires Triton.
"""

from .adamw_merge import FusedOnlineMergingAdamW, triton_available

__all__ = ["FusedOnlineMergingAdamW", "triton_available"]
