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

import glob
import logging
import os
import re
from typing import Any, Iterator, Sequence

import torch

from .coords import param_coords, unwrap_model_chunk
from .reference import BaseWeightsSource, differing_dims

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

    def iter_base(self, model_chunks: Sequence[Any], params: list[torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        from mbridge.core.safetensor_io import SafeTensorIO

        bridge = self.bridge()
        hf_dir = bridge._get_actual_hf_path(self.path)
        reader = SafeTensorIO(hf_dir)
        if self.make_vocab_size_divisible_by is not None:
            bridge.make_vocab_size_divisible_by = self.make_vocab_size_divisible_by
            bridge.vocab_size = bridge.hf_config.vocab_size
            bridge.padded_vocab_size = _padded(bridge.vocab_size, self.make_vocab_size_divisible_by)
        else:
            bridge.make_vocab_size_divisible_by = None
        # Everything is checked before the first weight is read (mbridge would read the first layers
        # of a deeper base, or rows of a larger one, without complaint), for every parameter of the
        # local model, not only those this rank steps, so that data-parallel ranks refuse alike.
        self._check_config(bridge, model_chunks)
        coords = param_coords(model_chunks)
        shapes = _safetensors_shapes(hf_dir)
        hf_names = {param: self._check_tensor(bridge, shapes, where) for param, where in coords.items()}
        for param in params:
            where = coords[param]
            hf_weights = [reader.load_one_hf_weight(n).to(torch.float32) for n in hf_names[param]]
            full = bridge._weight_to_mcore_format(mcore_global_name(where.key), hf_weights)
            local = where.shard().gather(full.contiguous()).view(param.shape)
            del full, hf_weights
            yield param, local

    def _check_config(self, bridge: Any, model_chunks: Sequence[Any]) -> None:
        """Refuse a base whose config.json describes another architecture than the model's."""
        model = unwrap_model_chunk(model_chunks[0])
        config, hf = model.config, bridge.hf_config
        heads = config.num_attention_heads
        # (field of config.json, its value there, the model's field, its value in the model)
        pairs = [
            ("num_hidden_layers", hf.num_hidden_layers, "num_layers", config.num_layers),
            ("hidden_size", hf.hidden_size, "hidden_size", config.hidden_size),
            ("num_attention_heads", hf.num_attention_heads, "num_attention_heads", heads),
            ("num_key_value_heads", getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads,
             "num_query_groups", config.num_query_groups or heads),
        ]
        if not getattr(config, "num_moe_experts", None):  # MoE models name their FFN sizes differently
            pairs.append(("intermediate_size", getattr(hf, "intermediate_size", None), "ffn_hidden_size", config.ffn_hidden_size))
        vocab, divisible_by = getattr(model, "vocab_size", None), self.make_vocab_size_divisible_by
        if vocab is not None and divisible_by is None:
            pairs.append(("vocab_size", hf.vocab_size, "vocab_size", vocab))
        elif vocab is not None:
            padded = _padded(hf.vocab_size, divisible_by)
            pairs.append((f"vocab_size padded to a multiple of {divisible_by} x TP ({hf.vocab_size} ->)", padded, "vocab_size", vocab))
        wrong = [f"{hf_field}={base} in its config.json, {field}={ours} in the model"
                 for hf_field, base, field, ours in pairs if base is not None and base != ours]
        if wrong:
            hint = ""
            if vocab is not None and divisible_by is None and vocab > hf.vocab_size:
                hint = " (vocabulary padding? pass make_vocab_size_divisible_by)"
            raise ValueError(f"online merge: the Hugging Face base {self.path} is not the model's architecture: {'; '.join(wrong)}{hint}")

    def _check_tensor(self, bridge: Any, shapes: dict[str, tuple[int, ...]], where: Any) -> list[str]:
        """The HF tensors making up one Megatron tensor, refused unless they convert to its shape
        (checked on their safetensors headers: nothing is read)."""
        name = mcore_global_name(where.key)
        try:
            hf_names = bridge._weight_name_mapping_mcore_to_hf(name)
        except NotImplementedError as exc:
            raise ValueError(f"online merge: mbridge has no Hugging Face name for Megatron tensor {name!r}") from exc
        missing = [n for n in hf_names if n not in shapes]
        if missing:
            raise ValueError(f"online merge: the Hugging Face base {self.path} has no tensor {missing} (for Megatron tensor {name!r})")
        given = ", ".join(f"{n} {shapes[n]}" for n in hf_names)
        try:
            full = bridge._weight_to_mcore_format(name, [torch.empty(shapes[n], device="meta") for n in hf_names])
        except (RuntimeError, AssertionError, ValueError) as exc:
            raise ValueError(
                f"online merge: {name!r} cannot be built from {given} of the Hugging Face base {self.path} for the model's "
                f"{where.global_shape} ({exc})"
            ) from None
        have, want = tuple(full.shape), tuple(where.global_shape)
        if have != want:
            vocab = name.endswith(("embedding.word_embeddings.weight", "output_layer.weight")) and have[1:] == want[1:]
            raise ValueError(
                f"online merge: {name!r} is {have} in the Hugging Face base {self.path} (from {given}) but {want} in the model "
                f"({differing_dims(have, want)}" + ("; vocabulary padding? pass make_vocab_size_divisible_by)" if vocab else ")")
            )
        return hf_names


def _safetensors_shapes(hf_dir: str) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape in a safetensors checkpoint, from the file headers."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for path in sorted(glob.glob(os.path.join(hf_dir, "*.safetensors"))):
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                shapes[key] = tuple(f.get_slice(key).get_shape())
    return shapes


def _padded(vocab_size: int, divisible_by: int) -> int:
    from megatron.core import parallel_state

    multiple = divisible_by * parallel_state.get_tensor_model_parallel_world_size()
    return ((vocab_size + multiple - 1) // multiple) * multiple
