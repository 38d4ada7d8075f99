"""Training configuration: dataclasses, YAML loading, `--set key=value` overrides, validation.

Everything that can be checked without touching data or weights is checked here, before any
process group is created: unknown keys, wrong types, missing files, and parallel sizes that do
not divide the world size. Errors name the dotted key (e.g. `parallel.tensor_parallel`), what was
expected and what was given, and for a value in the YAML file its line.

Types are checked by pydantic v2 in strict mode, against models generated from these dataclasses:
it is already installed with DeepSpeed, it refuses '3' for an int, true for a number and nan, and
it validates Literal and union types, which OmegaConf's structured configs do not support.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Callable, Literal, Mapping

import pydantic
import yaml

from onmerge_megatron.merging.config import OnlineMergeConfig


class ConfigError(ValueError):
    """A configuration problem found before any work starts."""


def _path(default: Any = None, must_exist: bool = True) -> Any:
    """A field holding a filesystem path; existing inputs are checked at validation."""
    return field(default=default, metadata={"path": True, "must_exist": must_exist})


@dataclass
class ModelConfig:
    hf_path: str | None = _path()
    """Hugging Face model directory (config.json, safetensors): architecture and, with load_format 'hf', weights."""
    load_format: Literal["hf", "megatron"] = "hf"
    """Initial weights: 'hf' reads hf_path's safetensors through mbridge; 'megatron' reads `megatron_load`."""
    megatron_load: str | None = _path()
    """A dist_checkpointing directory saved by this trainer (model weights only are read)."""
    tokenizer_path: str | None = _path()
    """Hugging Face tokenizer directory; defaults to hf_path."""
    dtype: Literal["fp32", "bf16"] = "fp32"
    """Parameter dtype. bf16 is for GPUs: megatron keeps fp32 main weights in the optimizer."""
    transformer_impl: Literal["auto", "transformer_engine", "local"] = "auto"
    """Layer implementation: 'transformer_engine' (TE layer spec, fused attention and fusions; needs TE and a GPU),
    'local' (megatron-core's PyTorch layers; runs anywhere), 'auto' (TE when it imports and a GPU is present)."""
    recompute: Literal["none", "selective", "full"] = "none"
    """Activation recomputation: 'selective' recomputes the attention core, 'full' whole layers (see recompute_layers)."""
    recompute_layers: int = 0
    """With recompute 'full': layers per pipeline stage that are recomputed (0 = all of them)."""


@dataclass
class DataConfig:
    train_files: list[str] = field(default_factory=list, metadata={"path": True, "must_exist": True})
    """JSONL (.jsonl/.json) or Parquet (.parquet) files of training records."""
    eval_files: list[str] = field(default_factory=list, metadata={"path": True, "must_exist": True})
    """Held-out records; if empty, `eval_fraction` of the training records is held out."""
    eval_fraction: float = 0.0
    """Fraction of training records held out for evaluation when eval_files is empty (seeded by run.seed)."""
    format: Literal["pairs", "unpaired", "sft"] = "pairs"
    """'pairs': prompt/chosen/rejected; 'unpaired': prompt/completion/label (KTO); 'sft': prompt/completion (or prompt/chosen)."""
    max_length: int = 512
    """Longest prompt + completion in tokens."""
    max_prompt_length: int = 256
    """Prompts longer than this keep their last tokens (the end of a prompt is what the answer follows)."""
    use_chat_template: bool = True
    """Render prompts with the tokenizer's chat template (message lists always need it)."""
    on_error: Literal["raise", "skip"] = "raise"
    """A malformed record raises (with file and line) or is skipped and counted."""
    bucket_size: int = 64
    """Length bucketing: micro-batches are formed from windows of this many micro-batches sorted by length."""
    shuffle: bool = True
    """Shuffle the data each epoch (order is a function of run.seed and the epoch)."""
    pack_sequences: bool = False
    """Pack several examples (a pair's chosen and rejected side together) into each row, with per-sequence
    attention boundaries and positions; every sequence's log-prob equals the unpacked one."""
    pack_length: int = 0
    """Tokens per packed row (0 = 2 x data.max_length, so the longest pair fits one row)."""


@dataclass
class LossConfig:
    type: Literal["dpo", "ipo", "hinge", "kto", "sft"] = "dpo"
    """dpo (sigmoid), ipo, hinge (SLiC), kto (unpaired data), sft (NLL on completions: the SFT stage)."""
    beta: float = 0.1
    """beta of DPO/hinge/KTO; IPO's tau (the target margin is 1 / (2 beta))."""
    label_smoothing: float = 0.0
    """Conservative DPO: probability that a preference label is flipped (dpo only)."""
    sft_weight: float = 0.0
    """Weight of an added NLL term on the chosen responses (0 = off)."""
    desirable_weight: float = 1.0
    """KTO lambda_D: weight of desirable examples' losses."""
    undesirable_weight: float = 1.0
    """KTO lambda_U: weight of undesirable examples' losses."""
    kto_kl: bool = True
    """Estimate KTO's reference point z0 from mismatched pairs (TRL); false sets z0 = 0."""
    reference: Literal["cached", "online"] = "cached"
    """'cached': reference log-probs computed once with the initial weights and stored on disk.
    'online': a frozen reference model (reference_hf_path / reference_megatron_load) is run every step."""
    reference_hf_path: str | None = _path()
    """Online reference model in HF format (when it is not the starting policy)."""
    reference_megatron_load: str | None = _path()
    """Or a dist_checkpointing directory saved by this trainer."""


@dataclass
class OptimConfig:
    lr: float = 5e-7
    """Peak learning rate (the paper: 5e-7 ... 5e-6)."""
    min_lr: float = 0.0
    """Learning rate at the end of the decay."""
    weight_decay: float = 0.0
    """Decoupled weight decay (applied densely after the merge, never merged)."""
    adam_beta1: float = 0.9
    """Adam's first-moment decay."""
    adam_beta2: float = 0.999
    """Adam's second-moment decay."""
    adam_eps: float = 1e-8
    """Adam's epsilon."""
    clip_grad: float = 1.0
    """Clip the global gradient norm (over all ranks) to this value; 0 disables clipping."""
    warmup_steps: int = 0
    """Linear warmup from 0 over this many steps; step s uses the schedule's value at s + 1."""
    lr_decay_style: Literal["cosine", "constant", "linear"] = "cosine"
    """Decay from lr to min_lr over run.train_steps (megatron's OptimizerParamScheduler)."""
    nonfinite: Literal["stop", "skip"] = "stop"
    """A gradient with inf/NaN is caught before the update (weights and optimizer state unchanged); then
    'stop' ends the run with an error, 'skip' skips the step (counted as skipped_steps in the metrics)."""
    max_consecutive_skips: int = 10
    """With nonfinite 'skip': stop after this many skipped steps in a row (the run is not recovering)."""
    fused: Literal["auto"] | bool = "auto"
    """The fused Triton AdamW + merge step (docs/kernels.md): 'auto' uses it on CUDA when triton imports, the
    PyTorch engine elsewhere; true requires it; false never uses it."""


@dataclass
class ParallelConfig:
    tensor_parallel: int = 1
    """Tensor-parallel size; must divide the attention heads and KV heads."""
    pipeline_parallel: int = 1
    """Pipeline-parallel size; must divide the layers. Batches are padded to data.max_length under PP."""
    micro_batch_size: int = 1
    """Pairs (or unpaired examples) per micro-batch per data-parallel rank."""
    global_batch_size: int = 128
    """Pairs per optimizer step; gradient accumulation = global / (micro * data_parallel)."""
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """Process-group backend: auto = nccl with GPUs, gloo on CPU."""
    sequence_parallel: Literal["auto"] | bool = "auto"
    """Megatron sequence parallelism (activations split along the sequence within the TP group): 'auto' = on
    when tensor_parallel > 1."""
    context_parallel: int = 1
    """Context-parallel size: each sequence is split over this many ranks (needs Transformer Engine attention)."""
    overlap_grad_reduce: bool = False
    """Overlap the distributed optimizer's gradient reduce-scatter with the backward pass."""
    overlap_param_gather: bool = False
    """Overlap the parameter all-gather after the optimizer step with the next forward pass."""


@dataclass
class MergeConfig:
    """Online merging (OnDARE/OnTIES). `online` holds the engine's settings (docs/algorithm.md);
    in a training config `merge.online.method` defaults to 'none' (plain AdamW) unless set."""

    online: OnlineMergeConfig = field(default_factory=lambda: OnlineMergeConfig(**_front_end_defaults(OnlineMergeConfig)))
    base_hf_path: str | None = _path()
    """Base (pre-SFT) model in HF format: tau = initial weights - base."""
    base_megatron_load: str | None = _path()
    """Or the base as a dist_checkpointing directory (saved by this trainer or `onmerge convert-hf`)."""
    log_update_norm: bool = True
    """Log the norm of each step's dense update before merging (one extra pass over the shard per step)."""


@dataclass
class RunConfig:
    output_dir: str = _path("runs/train", must_exist=False)
    """Where checkpoints, metrics.jsonl, tensorboard/, reference_logps/ and summary.json go."""
    train_steps: int = 100
    """Optimizer steps; the data is cycled (reshuffled per epoch) if it runs out."""
    epochs: float = 0.0
    """If > 0, train for this many passes over the training data instead: run.train_steps is computed from
    the number of training records and parallel.global_batch_size (rounded up)."""
    stop_at_step: int = 0
    """End this session at this step (checkpoint saved) although the schedule runs to train_steps;
    0 = run to the end. For time-limited jobs: resubmit and the run resumes."""
    eval_every: int = 0
    """Steps between evaluations (0: only at the end)."""
    eval_batches: int = 0
    """Evaluation micro-batches per rank (0: the whole held-out set)."""
    save_every: int = 0
    """Steps between checkpoints (0: only at the end)."""
    resume: bool = True
    """Continue from the latest checkpoint in output_dir if there is one."""
    export_hf: bool = False
    """Write the final weights in HF format to output_dir/hf."""
    save_final: bool = True
    """Save a checkpoint at the end of the run."""
    keep_last: int = 0
    """Keep only the newest this-many checkpoints (older ones are removed after each save); 0 keeps all."""
    override_scheduler: bool = False
    """On resume, rebuild the LR schedule from this config (optim.lr, min_lr, warmup_steps, lr_decay_style,
    weight_decay, run.train_steps) instead of the checkpoint's (megatron's override_opt_param_scheduler)."""
    seed: int = 1234
    """Seed of the data order, held-out split and megatron's RNGs (merge masks use merge.online.seed)."""
    log_every: int = 1
    """Steps between progress lines (metrics.jsonl and TensorBoard get every step)."""
    tensorboard: bool = True
    """Also write TensorBoard scalars to output_dir/tensorboard."""


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(self)


# --------------------------------------------------------------------------- building


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list):
        return [_to_plain(x) for x in obj]
    return obj


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


_STRICT = pydantic.ConfigDict(strict=True, extra="forbid", allow_inf_nan=False, protected_namespaces=())


@functools.cache
def _schema(cls: type) -> type[pydantic.BaseModel]:
    """A strict pydantic model with the dataclass's fields (a nested section is a nested model).
    Every field defaults to None and is read back with exclude_unset, so an omitted key takes the
    dataclass's own default: the defaults live in the dataclasses alone."""
    hints = typing.get_type_hints(cls)
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        fields[f.name] = (_schema(tp) if dataclasses.is_dataclass(tp) else tp, None)
    return pydantic.create_model(f"{cls.__name__}Schema", __config__=_STRICT, **fields)


def _front_end_defaults(cls: type) -> dict[str, Any]:
    """Defaults the front-ends use instead of the dataclass's (OnlineMergeConfig.method: 'none')."""
    return {f.name: f.metadata["front_end_default"] for f in dataclasses.fields(cls) if "front_end_default" in f.metadata}


_Locate = Callable[[tuple], str]
"""Where a key (a path of names and list indices) was written: 'file.yaml:LINE: ', or '' (--set, a dict)."""


def _construct(cls: type, values: Mapping[str, Any], loc: tuple, where: _Locate) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = _front_end_defaults(cls)
    for name, value in values.items():
        tp = hints[name]
        kwargs[name] = _construct(tp, value, loc + (name,), where) if dataclasses.is_dataclass(tp) else value
    try:
        return cls(**kwargs)
    except ValueError as exc:  # the engine's own validation (OnlineMergeConfig)
        raise ConfigError(f"{where(loc)}config section '{'.'.join(loc)}': {exc}") from None


def _config_error(exc: pydantic.ValidationError, where: _Locate) -> ConfigError:
    """pydantic's first error, as: [file:line: ]config key 'a.b': expected <type>, got <value>."""
    errors = exc.errors()
    unknown = [e["loc"] for e in errors if e["type"] == "extra_forbidden"]
    if unknown:  # all the unknown keys of the first section that has some
        section = unknown[0][:-1]
        names = ", ".join(f"'{_dotted(loc)}'" for loc in unknown if loc[:-1] == section)
        valid = sorted(f.name for f in dataclasses.fields(_leaf(section)[2]))
        return ConfigError(f"{where(unknown[0])}unknown config key {names}; valid keys here: {valid}")
    value = errors[0]["input"]
    path, tp, section = _leaf(errors[0]["loc"])
    at = where(path) + f"config key '{_dotted(path) or '<root>'}'"
    if section is not None:
        return ConfigError(f"{at}: expected a mapping, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        return ConfigError(f"{at}: expected a finite number, got {value!r}")
    if typing.get_origin(tp) is Literal:
        return ConfigError(f"{at}: expected {_type_name(tp)}, got {value!r}")
    return ConfigError(f"{at}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _dotted(path: tuple) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")


def _leaf(loc: tuple) -> tuple[tuple, Any, type | None]:
    """The key of a pydantic error location (names and list indices), the annotation there, and the
    dataclass when the key is a section. Names after the key are pydantic's tags of a union's members."""
    path, tp, section = (), None, TrainConfig
    for part in loc:
        if isinstance(part, int):  # a list item
            path, tp = path + (part,), typing.get_args(tp)[0]
        elif section is not None and part in {f.name for f in dataclasses.fields(section)}:
            path, tp = path + (part,), typing.get_type_hints(section)[part]
            section = tp if dataclasses.is_dataclass(tp) else None
    return path, tp, section


def _from_tree(tree: Any, where: _Locate) -> TrainConfig:
    if not isinstance(tree, Mapping):
        raise ConfigError(f"{where(())}config key '<root>': expected a mapping, got {tree!r}")
    try:
        checked = _schema(TrainConfig).model_validate(tree)
    except pydantic.ValidationError as exc:
        raise _config_error(exc, where) from None
    return _construct(TrainConfig, checked.model_dump(exclude_unset=True), (), where)


class _YamlLoader(yaml.SafeLoader):
    """PyYAML follows YAML 1.1, where 5e-7 (no dot) is a string; YAML 1.2 and config authors mean a float."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _read_yaml(path: str) -> tuple[dict[str, Any], dict[tuple, int]]:
    """The file's mapping, and the line of each key and list item in it (for error messages)."""
    with open(path) as f:
        loader = _YamlLoader(f.read())
    try:
        node = loader.get_single_node()
        tree = loader.construct_document(node) if node is not None else {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    finally:
        loader.dispose()
    lines: dict[tuple, int] = {}

    def visit(node: yaml.Node, loc: tuple) -> None:
        items = []
        if isinstance(node, yaml.MappingNode):
            items = [(loc + (key.value,), key, value) for key, value in node.value]
        elif isinstance(node, yaml.SequenceNode):
            items = [(loc + (i,), item, item) for i, item in enumerate(node.value)]
        for sub, mark_node, value in items:
            lines[sub] = mark_node.start_mark.line + 1
            visit(value, sub)

    if node is not None:
        visit(node, ())
        lines[()] = node.start_mark.line + 1
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}:{lines[()]}: config key '<root>': expected a mapping, got {tree!r}")
    return tree, lines


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """`key=value` strings; values are parsed as YAML scalars (1e-6, true, [a, b], null)."""
    parsed = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            value = yaml.load(raw, Loader=_YamlLoader) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        parsed.append((key.strip(), value))
    return parsed


def load_config(
    path: str | None = None,
    overrides: list[str] | None = None,
    world_size: int | None = None,
    check_paths: bool = True,
    check_devices: bool = False,
) -> TrainConfig:
    """Read YAML, apply `--set` overrides, type-check, then validate (see `validate`). Type errors in
    the file name its line."""
    tree: dict[str, Any] = {}
    lines: dict[tuple, int] = {}
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"config file not found: {path}")
        tree, lines = _read_yaml(path)
    overridden = set()
    for key, value in parse_overrides(overrides or []):
        _set_dotted(tree, key, value)
        overridden.add(tuple(key.split(".")))

    def where(key: tuple) -> str:
        if any(key[:len(o)] == o or o[:len(key)] == key for o in overridden):
            return ""  # (part of) the value came from --set, which the user has in front of them
        return f"{path}:{lines[key]}: " if key in lines else ""

    cfg = _from_tree(tree, where)
    validate(cfg, world_size=world_size, check_paths=check_paths, check_devices=check_devices)
    return cfg


def config_from_dict(tree: Mapping[str, Any]) -> TrainConfig:
    """Type-check a config given as nested dicts (as load_config does with a YAML file)."""
    return _from_tree(tree, lambda loc: "")


def _check_paths(obj: Any, prefix: str) -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = prefix + f.name
        if dataclasses.is_dataclass(value):
            _check_paths(value, key + ".")
        elif f.metadata.get("path") and f.metadata.get("must_exist") and value:
            for p in value if isinstance(value, list) else [value]:
                if not os.path.exists(p):
                    raise ConfigError(f"config key '{key}': file or directory not found: {p}")


def hf_model_dims(hf_path: str) -> dict[str, int]:
    """Read the sizes that constrain parallelism from config.json without importing transformers."""
    with open(os.path.join(hf_path, "config.json")) as f:
        hf = json.load(f)
    heads = hf["num_attention_heads"]
    return {
        "num_layers": hf["num_hidden_layers"],
        "num_attention_heads": heads,
        "num_key_value_heads": hf.get("num_key_value_heads") or heads,
        "vocab_size": hf["vocab_size"],
    }


def validate(cfg: TrainConfig, world_size: int | None = None, check_paths: bool = True, check_devices: bool = False) -> None:
    """Cross-field checks; each error names the offending key. `check_devices` also checks the
    dtype/backend against this machine (at launch; not when checking a config on a login node)."""
    m, d, lo, p, g, r = cfg.model, cfg.data, cfg.loss, cfg.parallel, cfg.merge, cfg.run
    if check_paths:
        _check_paths(cfg, "")
    if m.hf_path is None:
        raise ConfigError("config key 'model.hf_path' is required (the HF model directory giving the architecture)")
    if check_paths and not os.path.isfile(os.path.join(m.hf_path, "config.json")):
        raise ConfigError(f"config key 'model.hf_path': no config.json in {m.hf_path}")
    if m.load_format == "megatron" and not m.megatron_load:
        raise ConfigError("config key 'model.megatron_load' is required when model.load_format is 'megatron'")
    if not d.train_files:
        raise ConfigError("config key 'data.train_files' must list at least one file")
    for key, files in (("data.train_files", d.train_files), ("data.eval_files", d.eval_files)):
        for fpath in files:
            if not fpath.endswith((".jsonl", ".json", ".parquet")):
                raise ConfigError(f"config key '{key}': {fpath} is neither .jsonl/.json nor .parquet")
    if not 0.0 <= d.eval_fraction < 1.0:
        raise ConfigError(f"config key 'data.eval_fraction' must be in [0, 1), got {d.eval_fraction}")
    for key, value in (("data.max_length", d.max_length), ("data.max_prompt_length", d.max_prompt_length),
                       ("data.bucket_size", d.bucket_size), ("parallel.micro_batch_size", p.micro_batch_size),
                       ("parallel.global_batch_size", p.global_batch_size),
                       ("parallel.tensor_parallel", p.tensor_parallel),
                       ("parallel.pipeline_parallel", p.pipeline_parallel), ("run.train_steps", r.train_steps),
                       ("run.log_every", r.log_every)):
        if value < 1:
            raise ConfigError(f"config key '{key}' must be >= 1, got {value}")
    if d.max_prompt_length >= d.max_length:
        raise ConfigError(
            f"config key 'data.max_prompt_length' ({d.max_prompt_length}) must be below data.max_length ({d.max_length})"
        )
    expected_format = {"kto": "unpaired", "sft": "sft"}.get(lo.type, "pairs")
    if lo.type == "sft" and d.format == "pairs":
        pass  # SFT on the chosen side of preference pairs is allowed
    elif d.format != expected_format:
        raise ConfigError(f"config key 'data.format' is {d.format!r} but loss.type {lo.type!r} needs {expected_format!r}")
    if lo.beta <= 0:
        raise ConfigError(f"config key 'loss.beta' must be > 0, got {lo.beta}")
    if not 0.0 <= lo.label_smoothing < 0.5:
        raise ConfigError(f"config key 'loss.label_smoothing' must be in [0, 0.5), got {lo.label_smoothing}")
    if lo.label_smoothing and lo.type != "dpo":
        raise ConfigError("config key 'loss.label_smoothing' applies to loss.type 'dpo' only")
    if lo.sft_weight < 0:
        raise ConfigError(f"config key 'loss.sft_weight' must be >= 0, got {lo.sft_weight}")
    if lo.reference == "online" and not (lo.reference_hf_path or lo.reference_megatron_load):
        raise ConfigError("loss.reference is 'online': set 'loss.reference_hf_path' or 'loss.reference_megatron_load'")
    if lo.reference == "online" and p.pipeline_parallel > 1:
        raise ConfigError("config key 'loss.reference' = 'online' needs parallel.pipeline_parallel = 1 "
                          "(the frozen reference runs beside the last stage); use 'cached'")
    o = cfg.optim
    if o.lr <= 0 or o.min_lr < 0 or o.min_lr > o.lr:
        raise ConfigError(f"config keys 'optim.lr'/'optim.min_lr': need 0 <= min_lr <= lr and lr > 0, got lr={o.lr}, min_lr={o.min_lr}")
    for key, value in (("optim.adam_beta1", o.adam_beta1), ("optim.adam_beta2", o.adam_beta2)):
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"config key '{key}' must be in [0, 1), got {value}")
    if o.adam_eps <= 0:
        # 0 makes Adam's update 0/0 = NaN wherever a gradient has been 0 so far (e.g. unused embedding rows).
        raise ConfigError(f"config key 'optim.adam_eps' must be > 0, got {o.adam_eps}")
    for key, value in (("optim.weight_decay", o.weight_decay), ("optim.clip_grad", o.clip_grad),
                       ("loss.desirable_weight", lo.desirable_weight), ("loss.undesirable_weight", lo.undesirable_weight),
                       ("run.eval_every", r.eval_every), ("run.eval_batches", r.eval_batches),
                       ("run.save_every", r.save_every), ("run.keep_last", r.keep_last)):
        if value < 0:
            raise ConfigError(f"config key '{key}' must be >= 0, got {value}")
    if o.max_consecutive_skips < 1:
        raise ConfigError(f"config key 'optim.max_consecutive_skips' must be >= 1, got {o.max_consecutive_skips}")
    _check_epochs(cfg)
    # With run.epochs, train_steps is known only once the data is read (steps_from_epochs checks these then).
    if r.stop_at_step < 0 or (r.stop_at_step > r.train_steps and not r.epochs):
        raise ConfigError(f"config key 'run.stop_at_step' must be in [0, run.train_steps], got {r.stop_at_step}")
    if cfg.optim.warmup_steps < 0 or (cfg.optim.warmup_steps and cfg.optim.warmup_steps >= r.train_steps and not r.epochs):
        raise ConfigError(f"config key 'optim.warmup_steps' must be 0 or below run.train_steps ({r.train_steps}), "
                          f"got {cfg.optim.warmup_steps}")
    if g.online.needs_reference and not (g.base_hf_path or g.base_megatron_load):
        raise ConfigError(
            f"merge.online.method is {g.online.method!r} with alpha > 0: set 'merge.base_hf_path' or "
            "'merge.base_megatron_load' (the reference delta is initial weights minus base)"
        )
    tp, pp = p.tensor_parallel, p.pipeline_parallel
    _validate_context_parallel(cfg, check_devices)
    cp = p.context_parallel
    if world_size is not None and cp > 1 and world_size % (tp * pp * cp) != 0:
        raise ConfigError(
            f"config keys 'parallel.tensor_parallel' x 'parallel.pipeline_parallel' x 'parallel.context_parallel' = "
            f"{tp} x {pp} x {cp} = {tp * pp * cp} does not divide the world size {world_size} (the number of processes)")
    if world_size is not None:
        if world_size % (tp * pp) != 0:
            # Two ways out: more processes (the next multiple of tp x pp), or sizes that divide these.
            nproc = -(-world_size // (tp * pp)) * tp * pp
            fit_tp = math.gcd(tp, world_size)
            fit_pp = math.gcd(pp, world_size // fit_tp)
            sets = " ".join(f"--set parallel.{key}={value}" for key, value, was in
                            (("tensor_parallel", fit_tp, tp), ("pipeline_parallel", fit_pp, pp)) if value != was)
            raise ConfigError(
                f"config keys 'parallel.tensor_parallel' x 'parallel.pipeline_parallel' = {tp} x {pp} = {tp * pp} "
                f"does not divide the world size {world_size} (the number of processes). Start {nproc} processes "
                f"(torchrun --nproc-per-node {nproc} -m onmerge_megatron.training.cli train --config CONFIG.yaml), "
                f"or fit the sizes to {world_size} process(es) ({sets})"
            )
        dp = world_size // (tp * pp * cp)
        if p.global_batch_size % (p.micro_batch_size * dp) != 0:
            raise ConfigError(
                f"config key 'parallel.global_batch_size' ({p.global_batch_size}) must be a multiple of "
                f"parallel.micro_batch_size x data-parallel size ({p.micro_batch_size} x {dp})"
            )
    if check_paths and m.hf_path and os.path.isfile(os.path.join(m.hf_path, "config.json")):
        dims = hf_model_dims(m.hf_path)
        if dims["num_layers"] % pp:
            raise ConfigError(f"config key 'parallel.pipeline_parallel' ({pp}) must divide num_hidden_layers ({dims['num_layers']})")
        for name in ("num_attention_heads", "num_key_value_heads"):
            if dims[name] % tp:
                raise ConfigError(f"config key 'parallel.tensor_parallel' ({tp}) must divide {name} ({dims[name]})")
    if check_devices:
        import torch

        if p.backend == "nccl" and not torch.cuda.is_available():
            raise ConfigError("config key 'parallel.backend' is 'nccl' but no GPU is available")
        if m.dtype == "bf16" and not torch.cuda.is_available():
            raise ConfigError("config key 'model.dtype' is 'bf16', which this trainer supports on GPU only (use fp32 on CPU)")
    _validate_scale(cfg, check_devices)
    _validate_packing(cfg)


def effective_pack_length(d: DataConfig) -> int:
    """The width of a packed row: data.pack_length, 0 meaning 2 x data.max_length (a whole pair a
    row); 0 when data.pack_sequences is off."""
    if not d.pack_sequences:
        return 0
    return d.pack_length or 2 * d.max_length


def cp_slot_multiple(cp: int) -> int:
    """What every row width and packed sequence slot is a multiple of under context parallelism of
    size `cp`: 2 x cp (each sequence splits into 2 x cp chunks), 1 without it."""
    return 2 * cp if cp > 1 else 1


def _validate_packing(cfg: TrainConfig) -> None:
    """data.pack_sequences / data.pack_length against the lengths and the parallel layout."""
    d, p = cfg.data, cfg.parallel
    if d.pack_length < 0:
        raise ConfigError(f"config key 'data.pack_length' must be >= 0 (0: 2 x data.max_length), got {d.pack_length}")
    if not d.pack_sequences:
        if d.pack_length:
            raise ConfigError(f"config key 'data.pack_length' ({d.pack_length}) applies with data.pack_sequences true only")
        return
    # A sequence of max_length tokens takes max_length - 1 positions (the model reads seq[:-1]),
    # in a slot rounded up to 2 x CP positions under context parallelism.
    chunks = cp_slot_multiple(p.context_parallel)
    needed = max(d.max_length, -(-(d.max_length - 1) // chunks) * chunks)
    if d.pack_length and d.pack_length < needed:
        why = f"data.max_length {d.max_length}" + (f", slots of a multiple of 2 x parallel.context_parallel = {chunks}"
                                                   if chunks > 1 else "")
        raise ConfigError(f"config key 'data.pack_length' ({d.pack_length}) must be >= {needed} ({why}) so that the "
                          "longest sequence fits a row (0: 2 x data.max_length, a whole pair a row)")
    if p.pipeline_parallel > 1:
        raise ConfigError(f"config key 'data.pack_sequences' is true but parallel.pipeline_parallel is {p.pipeline_parallel}: "
                          "pipeline stages exchange fixed shapes and the number of packed rows varies per micro-batch "
                          "(set data.pack_sequences false, or pipeline_parallel 1)")


def _validate_context_parallel(cfg: TrainConfig, check_devices: bool) -> None:
    """parallel.context_parallel needs Transformer Engine's attention: megatron-core's local
    DotProductAttention asserts context_parallel_size == 1."""
    m, p = cfg.model, cfg.parallel
    if p.context_parallel < 1:
        raise ConfigError(f"config key 'parallel.context_parallel' must be >= 1, got {p.context_parallel}")
    if p.context_parallel == 1:
        return
    if m.transformer_impl == "local":
        raise ConfigError(f"config key 'parallel.context_parallel' is {p.context_parallel} but model.transformer_impl is "
                          "'local': megatron-core's local attention does not support context parallelism (use "
                          "model.transformer_impl 'transformer_engine', or context_parallel 1)")
    if check_devices:
        from .model import use_transformer_engine

        if not use_transformer_engine(cfg):
            raise ConfigError(f"config key 'parallel.context_parallel' is {p.context_parallel} but this machine builds "
                              "megatron-core's local layer spec (model.transformer_impl 'auto' without Transformer Engine "
                              "and a GPU), whose attention does not support context parallelism (use context_parallel 1 here)")


def _check_epochs(cfg: TrainConfig) -> None:
    if cfg.run.epochs < 0:
        raise ConfigError(f"config key 'run.epochs' must be >= 0 (0: run.train_steps steps), got {cfg.run.epochs}")


def steps_from_epochs(cfg: TrainConfig, records: int) -> TrainConfig:
    """cfg with run.train_steps = ceil(run.epochs x records / global_batch_size), for `records`
    training records (after the held-out split). The checks against train_steps that validate()
    leaves to this point (stop_at_step, warmup_steps) are done here."""
    r, warmup = cfg.run, cfg.optim.warmup_steps
    # The decimal the user wrote (0.7, not 0.69999...): a product that is a whole number stays one.
    steps = math.ceil(Fraction(repr(r.epochs)) * records / cfg.parallel.global_batch_size)
    computed = (f"run.train_steps = {steps}, computed from run.epochs ({r.epochs}) x {records} training records / "
                f"parallel.global_batch_size ({cfg.parallel.global_batch_size}), rounded up")
    if steps < 1:
        raise ConfigError(f"config key 'run.epochs' ({r.epochs}) gives no training step: {computed}. "
                          f"The training files hold {records} training records (after the held-out split); "
                          f"add records, lower data.eval_fraction, or use run.train_steps with run.epochs 0")
    if r.stop_at_step > steps:
        raise ConfigError(f"config key 'run.stop_at_step' ({r.stop_at_step}) is past the end of the run: {computed}. "
                          f"Set run.stop_at_step to at most {steps} (or 0), or raise run.epochs")
    if warmup and warmup >= steps:
        raise ConfigError(f"config key 'optim.warmup_steps' ({warmup}) must be below {computed}. "
                          f"Lower optim.warmup_steps (e.g. --set optim.warmup_steps={steps // 10}) or raise run.epochs")
    return dataclasses.replace(cfg, run=dataclasses.replace(r, train_steps=steps))


def _validate_scale(cfg: TrainConfig, check_devices: bool) -> None:
    """Layer implementation, sequence parallelism, recomputation, communication overlap and the fused
    optimizer step: impossible combinations always, and with `check_devices` what this machine
    cannot run (Transformer Engine, a GPU, Triton)."""
    m, p, o = cfg.model, cfg.parallel, cfg.optim
    if m.recompute_layers < 0:
        raise ConfigError(f"config key 'model.recompute_layers' must be >= 0 (0: every layer), got {m.recompute_layers}")
    if m.recompute_layers and m.recompute != "full":
        raise ConfigError(f"config key 'model.recompute_layers' ({m.recompute_layers}) applies to model.recompute 'full' "
                          f"only, got model.recompute {m.recompute!r}")
    if m.recompute_layers and m.hf_path and os.path.isfile(os.path.join(m.hf_path, "config.json")):
        per_stage = hf_model_dims(m.hf_path)["num_layers"] // p.pipeline_parallel
        if m.recompute_layers > per_stage:
            raise ConfigError(f"config key 'model.recompute_layers' ({m.recompute_layers}) must be at most the layers per "
                              f"pipeline stage ({per_stage})")
    if p.sequence_parallel is True and p.tensor_parallel == 1:
        raise ConfigError("config key 'parallel.sequence_parallel' is true but parallel.tensor_parallel is 1: sequence "
                          "parallelism splits activations over the tensor-parallel group (use 'auto' or false)")
    if p.sequence_parallel is True and m.transformer_impl == "local":
        raise ConfigError("config key 'parallel.sequence_parallel' is true but model.transformer_impl is 'local': "
                          "megatron-core's local norm layers do not support sequence parallelism (use "
                          "model.transformer_impl 'transformer_engine', or sequence_parallel 'auto'/false)")
    if p.overlap_param_gather and not p.overlap_grad_reduce:
        raise ConfigError("config key 'parallel.overlap_param_gather' is true but parallel.overlap_grad_reduce is false: "
                          "megatron-core overlaps the parameter all-gather only together with the gradient reduce-scatter")
    if o.fused is True and not cfg.merge.online.merges:
        raise ConfigError("config key 'optim.fused' is true but merge.online.method is 'none': the fused kernel is the "
                          "online-merging step (without merging megatron's own Adam steps); use 'auto' or false")
    if not check_devices:
        return
    import torch

    from .model import transformer_engine_available, use_transformer_engine

    if m.transformer_impl == "transformer_engine":
        if not transformer_engine_available():
            raise ConfigError("config key 'model.transformer_impl' is 'transformer_engine' but transformer_engine does not "
                              "import here (use 'auto' or 'local')")
        if not torch.cuda.is_available():
            raise ConfigError("config key 'model.transformer_impl' is 'transformer_engine' but no GPU is available "
                              "(use 'auto' or 'local')")
    if p.sequence_parallel is True and not use_transformer_engine(cfg):
        raise ConfigError("config key 'parallel.sequence_parallel' is true but this machine builds megatron-core's local "
                          "layer spec (model.transformer_impl 'auto' without Transformer Engine and a GPU), whose norm "
                          "layers do not support sequence parallelism (use 'auto' or false here)")
    if o.fused is True:
        from onmerge_megatron.kernels import triton_available

        interpreted = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
        if not triton_available():
            raise ConfigError("config key 'optim.fused' is true but triton does not import here (use 'auto' or false)")
        if not torch.cuda.is_available() and not interpreted:
            raise ConfigError("config key 'optim.fused' is true but no GPU is available: the Triton kernel runs on CUDA "
                              "(on CPU only under TRITON_INTERPRET=1, for tests); use 'auto' or false")


def dump_config(cfg: TrainConfig, path: str) -> None:
    from .checkpoints import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


# --------------------------------------------------------------------------- reference docs


def _field_docs(cls: type) -> dict[str, str]:
    """Each field's meaning: its metadata "help" (OnlineMergeConfig), else the string literal under it."""
    import ast
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, after in zip(body, body[1:] + [None]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(after, ast.Expr) and isinstance(getattr(after, "value", None), ast.Constant) and isinstance(after.value.value, str):
                docs[node.target.id] = " ".join(after.value.value.split())
    docs.update({f.name: " ".join(f.metadata["help"].split()) for f in dataclasses.fields(cls) if "help" in f.metadata})
    return docs


def _default_text(f: dataclasses.Field) -> str:
    if "front_end_default" in f.metadata:
        return json.dumps(f.metadata["front_end_default"])
    if f.default is not dataclasses.MISSING:
        return "null" if f.default is None else json.dumps(f.default)
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = f.default_factory()  # type: ignore[misc]
        return json.dumps(value) if not dataclasses.is_dataclass(value) else "(section)"
    return "(required)"


def config_reference_markdown() -> str:
    """Markdown tables of every config key, generated from the dataclasses (docs/config.md)."""
    lines = []

    def section(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        docs = _field_docs(cls)
        nested = []
        lines.append(f"### `{prefix.rstrip('.')}`\n")
        if cls.__doc__ and not cls.__doc__.startswith(cls.__name__ + "("):
            lines.append(" ".join(cls.__doc__.split()) + "\n")
        lines.append("| key | type | default | meaning |")
        lines.append("|---|---|---|---|")
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                nested.append((tp, prefix + f.name + "."))
                lines.append(f"| `{prefix}{f.name}` | section | | see below |")
                continue
            meaning = docs.get(f.name, "")
            if f.metadata.get("path") and f.metadata.get("must_exist"):
                meaning = (meaning + " Must exist (checked before start).").strip()
            lines.append(f"| `{prefix}{f.name}` | {_type_name(tp)} | `{_default_text(f)}` | {meaning} |")
        lines.append("")
        for tp, p in nested:
            section(tp, p)

    for f in dataclasses.fields(TrainConfig):
        section(typing.get_type_hints(TrainConfig)[f.name], f.name + ".")
    return "\n".join(lines)


if __name__ == "__main__":
    print(config_reference_markdown())
