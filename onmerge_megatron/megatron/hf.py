"""Base weights from a Hugging Face checkpoint, mapped to Megatron layout by mbridge.

Why mbridge (0.15.x): of the maintained HF<->Megatron mapping libraries, it is the one that
installs and runs on CPU test machines and on the clusters users have: Python >= 3.8, megatron-core >= 0.12
(covers 0.14-0.19), no Transformer Engine requirement for the conversion helpers, and it is what
verl uses. megatron-bridge is more complete but 0.6.x needs Python 3.12 and pulls Transformer
Engine (0.3.1 hard-requires TE); mcore-bridge pulls modelscope and peft and hard-codes 'cuda'.
mbridge's own ``load_weights`` writes into a model; streaming a second checkpoint (the base) uses
its per-tensor helpers instead: name mapping (``_weight_name_mapping_mcore_to_hf``), HF-to-mcore
format (``_weight_to_mcore_format``: QKV interleaved per query group, gate/up fused in fc1, vocab
padding) and ``SafeTensorIO.load_one_hf_weight``. They are private, so the version is pinned
(``TESTED_MBRIDGE``) and the result is cross-checked in the tests against ``load_weights``.

The TP split is not taken from mbridge: each parameter's elements are gathered from the whole
mcore-format tensor with the parameter's checkpoint coordinates (coords.ParamCoords), the same
coordinates the keep-masks use. Names come from the checkpoint keys, which are the Transformer
Engine names for both layer specs (the local spec saves ``input_layernorm`` under
``linear_qkv.layer_norm_weight``), so no per-spec name table is needed.

One HF tensor (or the two or three fused into one mcore tensor) is read at a time, and no
collective is used: every rank reads what its parameters need.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Any, Iterator

import torch

from .reference import BaseWeightsSource

if TYPE_CHECKING:
    from .optimizer import OnlineMergingHandle

logger = logging.getLogger(__name__)

TESTED_MBRIDGE: tuple[str, ...] = ("0.15.1",)

_STACKED = re.compile(r"^(?P<prefix>.*?decoder\.layers)\.(?P<rest>.*)\[(?P<index>[\d,]+)\]$")


def mcore_global_name(tensor_name: str) -> str:
    """``decoder.layers.self_attention.linear_qkv.weight[3]`` -> ``decoder.layers.3.self_attention.linear_qkv.weight``."""
    match = _STACKED.match(tensor_name)
    if match is None:
        return tensor_name
    layer = match.group("index").split(",")[0]
    return f"{match.group('prefix')}.{layer}.{match.group('rest')}"


class HuggingFaceBase(BaseWeightsSource):
    """Base weights from a Hugging Face checkpoint (safetensors), streamed tensor by tensor.

    Args:
        path: local directory of the HF checkpoint (config.json + safetensors).
        bridge: an mbridge ``Bridge`` for this model; by default ``AutoBridge.from_pretrained(path)``
            with fp32 conversion (the delta is taken in fp32).
        make_vocab_size_divisible_by: as the model was built with (pads embedding/output rows);
            None when the model's vocabulary is the HF one.
    """

    def __init__(self, path: str, bridge: Any = None, make_vocab_size_divisible_by: int | None = None) -> None:
        self.path = str(path)
        self.description = f"Hugging Face checkpoint {self.path}"
        self._bridge = bridge
        self.make_vocab_size_divisible_by = make_vocab_size_divisible_by

    def bridge(self) -> Any:
        if self._bridge is None:
            try:
                import mbridge
                from mbridge import AutoBridge
            except ImportError as exc:
                raise ImportError("online merge: HuggingFaceBase needs mbridge (pip install mbridge==0.15.1)") from exc
            version = getattr(mbridge, "__version__", "unknown")
            if version not in TESTED_MBRIDGE:
                logger.warning("online merge: mbridge %s is untested (tested: %s); its private conversion helpers may differ", version, TESTED_MBRIDGE)
            self._bridge = AutoBridge.from_pretrained(self.path, dtype=torch.float32)
        return self._bridge

    def iter_base(self, handle: "OnlineMergingHandle", params: list[torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        from mbridge.core.safetensor_io import SafeTensorIO

        from .coords import param_coords

        bridge = self.bridge()
        coords = param_coords(handle.model_chunks, params)
        reader = SafeTensorIO(bridge._get_actual_hf_path(self.path))
        if self.make_vocab_size_divisible_by is not None:
            bridge.make_vocab_size_divisible_by = self.make_vocab_size_divisible_by
            bridge.vocab_size = bridge.hf_config.vocab_size
            bridge.padded_vocab_size = _padded(bridge.vocab_size, self.make_vocab_size_divisible_by)
        else:
            bridge.make_vocab_size_divisible_by = None
        for param in params:
            where = coords[param]
            name = mcore_global_name(where.key)
            try:
                hf_names = bridge._weight_name_mapping_mcore_to_hf(name)
            except NotImplementedError as exc:
                raise ValueError(f"online merge: mbridge has no Hugging Face name for Megatron tensor {name!r}") from exc
            hf_weights = [reader.load_one_hf_weight(n).to(torch.float32) for n in hf_names]
            full = bridge._weight_to_mcore_format(name, hf_weights)
            if tuple(full.shape) != where.global_shape:
                raise ValueError(
                    f"online merge: {name!r} is {tuple(full.shape)} in the Hugging Face base (after conversion) but "
                    f"{where.global_shape} in the model (vocabulary padding? pass make_vocab_size_divisible_by)"
                )
            local = where.shard().gather(full.contiguous()).view(param.shape)
            del full, hf_weights
            yield param, local


def _padded(vocab_size: int, divisible_by: int) -> int:
    from megatron.core import parallel_state

    multiple = divisible_by * parallel_state.get_tensor_model_parallel_world_size()
    return ((vocab_size + multiple - 1) // multiple) * multiple
