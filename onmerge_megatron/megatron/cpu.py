"""Run megatron-core on CPU with the gloo backend.

megatron-core assumes CUDA in a handful of places even when the model is built with
``use_cpu_initialization=True`` and the local (non Transformer Engine) layer spec. This module
is the only place that works around them, so that tests and the CPU training job exercise the
real megatron-core code paths (DDP buffers, distributed optimizer, dist_checkpointing) rather
than re-implementations of them.

The CUDA-only spots, and what is done about each:

1. ``GlobalMemoryBuffer`` allocates on ``torch.cuda.current_device()``           -> proxy (a)
2. the tensor-parallel RNG tracker and ``model_parallel_cuda_manual_seed`` use the CUDA
   generator                                                                       -> (b)
3. DDP grad/param buffers are allocated on ``torch.cuda.current_device()``       -> proxy (a)
4. ``MixedPrecisionOptimizer`` / ``FP32Optimizer`` create tensors with ``device='cuda'`` -> (a)
5. the optimizers accept only ``param.type() == 'torch.cuda.*Tensor'``            -> (c)
6. grad-norm / clipping helpers and the loss scalers create tensors on 'cuda'    -> proxy (a)
7. the async filesystem checkpoint writer calls ``torch.cuda.synchronize``        -> proxy (a)
8. the ``fully_reshardable`` optimizer-state load copies every per-param state key from the
   checkpoint, which has no ``step`` (TE/apex FusedAdam keep it in ``param_groups``, torch AdamW,
   the CPU fallback, per param): KeyError('step')                                   -> (d)

(a) In the listed megatron-core modules, the module-global name ``torch`` is replaced by a proxy
    that forwards everything to torch except: ``torch.cuda.current_device()`` is the CPU device,
    ``torch.cuda.synchronize``/``empty_cache`` do nothing, the CUDA RNG functions act on the CPU
    generator, and tensor factories map a CUDA ``device=`` to the CPU (and drop ``pin_memory``).
    torch itself is not modified, so code outside megatron-core is unaffected.
(b) ``_get_cuda_rng_state``/``_set_cuda_rng_state`` in ``tensor_parallel.random`` are replaced
    by the CPU generator's get/set: ``get_cuda_rng_tracker().fork()`` then swaps the CPU
    generator's state, which is what dropout on CPU draws from.
(c) while the optimizers' constructors and the grad-clipping helper run, ``Tensor.type()``
    (no argument) reports a CPU tensor under its CUDA name, so the dtype checks pass unchanged;
    likewise ``Tensor.cuda()`` returns the tensor itself while tied embeddings are set up (PP > 1).
(d) ``DistributedOptimizer.load_parameter_state_from_fully_reshardable`` is wrapped to hide the
    per-param ``step`` while it runs (megatron restores ``step`` from the param groups itself).

Beyond those eight: RoPE's ``inv_freq.to(torch.cuda.current_device())`` (proxy, a) and the tied
embedding setup's ``weight.data.cuda()`` for PP > 1 (c).

Only the megatron-core versions in ``TESTED_VERSIONS`` are accepted: the patch targets are
looked up by name, and a release that moves them would fail in confusing ways instead.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import sys
import threading
from typing import Any, Callable, Iterator

import torch

TESTED_VERSIONS: tuple[str, ...] = ("0.16.1",)
"""megatron-core releases this layer was run against (CPU, gloo, torch 2.13)."""

ALLOW_UNTESTED_ENV = "ONMERGE_ALLOW_UNTESTED_MEGATRON"

# Modules whose global ``torch`` is replaced by the CPU proxy (spots 1, 3, 4, 6, 7 and the RNG
# calls of spot 2). Looked up by name; a module missing from a release is skipped.
_PROXIED_MODULES: tuple[str, ...] = (
    "megatron.core.utils",
    "megatron.core.tensor_parallel.random",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.distributed.finalize_model_grads",
    "megatron.core.optimizer",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.async_utils",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.strategies.fully_parallel",
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.models.gpt.gpt_model",
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    "megatron.core.models.common.embeddings.rope_utils",
    "megatron.core.transformer.attention",
    "megatron.core.transformer.dot_product_attention",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
)

# Functions during which Tensor.type() reports CUDA names (spot 5): (module, qualified name).
_CUDA_TYPE_NAME_SCOPES: tuple[tuple[str, str], ...] = (
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer.__init__"),
    ("megatron.core.optimizer.optimizer", "Float16OptimizerWithFloat16Params.__init__"),
    ("megatron.core.optimizer.clip_grads", "clip_grad_by_total_norm_fp32"),
)

# Functions during which Tensor.cuda() returns the tensor itself (CPU): (module, qualified name).
_CUDA_NOOP_SCOPES: tuple[tuple[str, str], ...] = (
    # Tied embeddings with PP > 1: the last stage's copy is moved to CUDA before its all-reduce.
    ("megatron.core.models.common.language_module.language_module", "LanguageModule.setup_embeddings_and_output_layer"),
)

_lock = threading.Lock()
_enabled = False


class MegatronVersionError(RuntimeError):
    """The installed megatron-core is not one this compatibility layer was tested on."""


def megatron_core_version() -> str:
    from megatron.core import package_info

    return str(package_info.__version__)


def check_megatron_version(allow_untested: bool = False) -> str:
    """Return the installed megatron-core version, refusing one that was not tested."""
    version = megatron_core_version()
    if version in TESTED_VERSIONS or allow_untested or os.environ.get(ALLOW_UNTESTED_ENV) == "1":
        return version
    raise MegatronVersionError(
        f"the CPU compatibility layer for megatron-core was tested on {list(TESTED_VERSIONS)}, "
        f"but megatron-core {version} is installed. Its CUDA-only spots are patched by name and may "
        f"have moved; install a tested version, or set {ALLOW_UNTESTED_ENV}=1 (or pass "
        f"allow_untested_version=True) to try anyway. On GPUs this layer is not needed."
    )


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # An int device means a CUDA ordinal to torch's factories.
    return isinstance(device, int) and not isinstance(device, bool)


def _cpu_factory(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def factory(*args: Any, **kwargs: Any) -> Any:
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        # Pinned memory needs a CUDA runtime; on CPU it would only slow things down.
        kwargs.pop("pin_memory", None)
        return fn(*args, **kwargs)

    return factory


_FACTORIES = (
    "tensor", "as_tensor", "zeros", "ones", "empty", "full", "arange", "rand", "randn", "randint",
    "zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like",
)


class _CpuCuda:
    """Stands in for ``torch.cuda`` inside megatron-core modules."""

    @staticmethod
    def current_device() -> torch.device:
        return torch.device("cpu")

    @staticmethod
    def synchronize(*_: Any, **__: Any) -> None:
        return None

    @staticmethod
    def empty_cache() -> None:
        return None

    @staticmethod
    def set_device(*_: Any, **__: Any) -> None:
        return None

    @staticmethod
    def device_count() -> int:
        return 1

    # The "CUDA" generator is the CPU one: dropout on CPU draws from it.
    @staticmethod
    def get_rng_state(*_: Any, **__: Any) -> torch.Tensor:
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(state: torch.Tensor, *_: Any, **__: Any) -> None:
        torch.set_rng_state(state)

    @staticmethod
    def manual_seed(seed: int) -> None:
        torch.manual_seed(seed)

    manual_seed_all = manual_seed

    @staticmethod
    def nvtx_range_push(*_: Any) -> None:
        return None

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)


class _CpuTorch:
    """Stands in for the ``torch`` module inside megatron-core modules (see the module docstring)."""

    def __init__(self) -> None:
        self.cuda = _CpuCuda()
        for name in _FACTORIES:
            setattr(self, name, _cpu_factory(getattr(torch, name)))

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


_CPU_TORCH = _CpuTorch()


@contextlib.contextmanager
def _cuda_type_names() -> Iterator[None]:
    original = torch.Tensor.type

    def type_(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        name = original(self, *args, **kwargs)
        if not args and not kwargs and isinstance(name, str) and name.startswith("torch.") and not name.startswith("torch.cuda."):
            return "torch.cuda." + name[len("torch.") :]
        return name

    torch.Tensor.type = type_  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.type = original  # type: ignore[method-assign]


@contextlib.contextmanager
def _cuda_is_noop() -> Iterator[None]:
    original = torch.Tensor.cuda

    def cuda(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self

    torch.Tensor.cuda = cuda  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.cuda = original  # type: ignore[method-assign]


def _scoped(fn: Callable[..., Any], context: Callable[[], Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with context():
            return fn(*args, **kwargs)

    wrapper.__onmerge_cpu__ = True  # type: ignore[attr-defined]
    return wrapper


def _resolve(module_name: str, qualname: str) -> tuple[Any, str, Any] | None:
    try:
        owner: Any = importlib.import_module(module_name)
    except ImportError:
        return None
    *path, attr = qualname.split(".")
    for part in path:
        owner = getattr(owner, part, None)
        if owner is None:
            return None
    fn = getattr(owner, attr, None)
    return (owner, attr, fn) if fn is not None else None


def _patch_rng(module: Any) -> None:
    def get_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
        state = torch.get_rng_state()
        return state.clone() if clone else state

    def set_state(new_state: torch.Tensor, device: int = -1, graph_safe: bool = False) -> None:
        torch.set_rng_state(new_state)

    module._get_cuda_rng_state = get_state
    module._set_cuda_rng_state = set_state


def _patch_fully_reshardable_step(distrib_module: Any) -> None:
    cls = getattr(distrib_module, "DistributedOptimizer", None)
    fn = getattr(cls, "load_parameter_state_from_fully_reshardable", None)
    if fn is None or getattr(fn, "__onmerge_cpu__", False):
        return
    from .checkpoint import without_step_state

    @functools.wraps(fn)
    def load(self: Any, state_dict: dict, *args: Any, **kwargs: Any) -> Any:
        # torch AdamW keeps 'step' per param; megatron copies every state key from the loaded
        # tensors, which have no 'step' (it comes from the param groups): hide it meanwhile.
        with without_step_state(self.optimizer):
            return fn(self, state_dict, *args, **kwargs)

    load.__onmerge_cpu__ = True  # type: ignore[attr-defined]
    cls.load_parameter_state_from_fully_reshardable = load


def enable_cpu_megatron(allow_untested_version: bool = False) -> None:
    """Patch megatron-core (in this process) to run on CPU with gloo. Idempotent.

    Call it before building models or optimizers. Models must be built with
    ``use_cpu_initialization=True`` and the local layer spec (no Transformer Engine); keep
    ``overlap_grad_reduce``/``overlap_param_gather`` and sequence parallelism off.
    """
    global _enabled
    with _lock:
        if _enabled:
            return
        check_megatron_version(allow_untested_version)
        for name in _PROXIED_MODULES:
            try:
                module = importlib.import_module(name)
            except ImportError:
                continue
            if getattr(module, "torch", None) is torch:
                module.torch = _CPU_TORCH
        random_module = importlib.import_module("megatron.core.tensor_parallel.random")
        _patch_rng(random_module)
        scopes = [(m, q, _cuda_type_names) for m, q in _CUDA_TYPE_NAME_SCOPES] + [(m, q, _cuda_is_noop) for m, q in _CUDA_NOOP_SCOPES]
        for module_name, qualname, context in scopes:
            found = _resolve(module_name, qualname)
            if found is None:
                continue
            owner, attr, fn = found
            if not getattr(fn, "__onmerge_cpu__", False):
                wrapped = _scoped(fn, context)
                setattr(owner, attr, wrapped)
                # Functions imported by name elsewhere (``from .clip_grads import ...``) too.
                for module in list(sys.modules.values()):
                    if getattr(module, "__name__", "").startswith("megatron.core") and getattr(module, attr, None) is fn:
                        setattr(module, attr, wrapped)
        _patch_fully_reshardable_step(importlib.import_module("megatron.core.optimizer.distrib_optimizer"))
        _enabled = True


def is_cpu_megatron_enabled() -> bool:
    return _enabled


def init_cpu_process_group(rank: int, world_size: int, init_method: str) -> None:
    """Start a gloo process group (the CPU stand-in for NCCL) if none is running."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size)


def initialize_cpu_model_parallel(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    seed: int = 1234,
    **kwargs: Any,
) -> None:
    """``parallel_state.initialize_model_parallel`` plus the seeds megatron expects, on CPU.

    Needs a running gloo process group (see ``init_cpu_process_group``).
    """
    enable_cpu_megatron()
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        **kwargs,
    )
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
