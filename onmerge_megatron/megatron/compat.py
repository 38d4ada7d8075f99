"""Every use of megatron-core internals, in one place, gated by the versions it was tested on.

The adapter (optimizer.py, checkpoint.py, reference.py, the CPU layer cpu.py) and the trainer call
the functions here and never touch a private megatron-core name themselves. Each of these names can
move in any release, so ``require_tested_megatron`` refuses a megatron-core version not in
``TESTED_VERSIONS``, naming the version found and the tested ones, unless untested versions are
allowed (``ONMERGE_ALLOW_UNTESTED_MEGATRON=1``, or ``allow_untested_megatron()``).

What is used, and why:

- The optimizers' main params (``main_params``): the distributed optimizer's
  ``model_float16_groups``/``shard_fp32_from_float16_groups``/``model_fp32_groups``/
  ``shard_fp32_groups`` and ``_get_model_param_range_map``; the Float16 optimizer's
  ``float16_groups``/``fp32_from_float16_groups``/``fp32_from_fp32_groups``. megatron-core has no
  public way to ask which elements of which parameter an inner-optimizer tensor holds.
- The distributed optimizer's ``data_parallel_group`` and ``buffers[].param_index_map``: which DP
  group shards a parameter, and whether an optimizer trains a parameter on any DP rank.
- ``fully_reshardable`` loading (``fix_fully_reshardable_load``): megatron copies every per-param
  state key from the checkpoint's tensors, which hold no ``step``; torch-style Adam (torch AdamW,
  ``OnlineMergingAdamW``) keeps ``step`` per param, so the load raises KeyError('step'). TE/apex
  FusedAdam keep it in the param groups, which is why megatron does not hit this on GPUs.
- Adam's ``step`` around a load (``init_adam_state_for_loading``, ``restore_adam_steps``).
- dist_checkpointing's writer results queue (``checkpoint_results_queue_dies_with_process``).
- The CPU stand-ins for megatron-core's CUDA-only spots (``enable_cpu_shims``, used by cpu.py),
  and for Megatron-LM's ``megatron.training`` (``enable_cpu_megatron_lm_shims``), plus the wheel's
  prebuilt dataset helpers for Megatron-LM's ``initialize_megatron`` (``use_prebuilt_dataset_helpers``).
- Packed sequences: GPTModel's ``rotary_pos_emb`` (``rope_at_positions``: megatron-core's RoPE
  ignores ``position_ids`` and rotates position t of every row by t) and ``PackedSeqParams`` for
  Transformer Engine's THD attention.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import multiprocessing as mp
import os
import sys
import threading
import types
from multiprocessing.managers import SyncManager
from typing import Any, Callable, Iterable, Iterator

import torch

from ..processes import die_with_parent

logger = logging.getLogger(__name__)

TESTED_VERSIONS: tuple[str, ...] = ("0.16.1",)
"""megatron-core releases this module was run against (CPU, gloo, torch 2.13)."""

ALLOW_UNTESTED_ENV = "ONMERGE_ALLOW_UNTESTED_MEGATRON"

_untested_allowed = False


class MegatronVersionError(RuntimeError):
    """The installed megatron-core is not one this module was tested on."""


class OnlineMergeUnsupportedError(RuntimeError):
    """A megatron-core setting the online merge cannot work with."""


# ---------------------------------------------------------------------------------- version gate
def megatron_core_version() -> str:
    from megatron.core import package_info

    return str(package_info.__version__)


def allow_untested_megatron() -> None:
    """Accept untested megatron-core versions from now on, in this process."""
    global _untested_allowed
    _untested_allowed = True


def check_megatron_version(allow_untested: bool = False) -> str:
    """Return the installed megatron-core version, refusing one that was not tested."""
    version = megatron_core_version()
    if version in TESTED_VERSIONS or allow_untested or _untested_allowed or os.environ.get(ALLOW_UNTESTED_ENV) == "1":
        return version
    raise MegatronVersionError(
        f"onmerge_megatron's use of megatron-core internals was tested on {list(TESTED_VERSIONS)}, "
        f"but megatron-core {version} is installed. The names it relies on (see "
        f"onmerge_megatron/megatron/compat.py) may have moved; install a tested version, or set "
        f"{ALLOW_UNTESTED_ENV}=1 (or pass allow_untested_version=True to enable_cpu_megatron) to try anyway."
    )


require_tested_megatron = check_megatron_version


# ------------------------------------------------------------------------- optimizer internals
def sub_optimizers(megatron_optimizer: Any) -> list[Any]:
    """The optimizers in a ChainedOptimizer (dense, expert), or the optimizer itself."""
    return list(getattr(megatron_optimizer, "chained_optimizers", None) or [megatron_optimizer])


def is_distributed_optimizer(opt: Any) -> bool:
    return hasattr(opt, "_get_model_param_range_map")


def main_params(opt: Any) -> list[tuple[torch.Tensor, torch.Tensor, int, int]]:
    """(main_param, model_param, start, end) for every param the inner optimizer of ``opt`` steps:
    ``main_param`` holds elements ``[start, end)`` of ``model_param.view(-1)``."""
    kind = type(opt).__name__
    out = []
    if hasattr(opt, "shard_fp32_from_float16_groups") and is_distributed_optimizer(opt):
        # DistributedOptimizer: flat main shards of ranges of the model params.
        pairs = [
            (opt.model_float16_groups, opt.shard_fp32_from_float16_groups),
            (opt.model_fp32_groups, opt.shard_fp32_groups),
        ]
        for model_groups, main_groups in pairs:
            for model_group, main_group in zip(model_groups, main_groups):
                for model_param, main_param in zip(model_group, main_group):
                    if main_param is None:
                        raise OnlineMergeUnsupportedError(
                            f"online merge: {kind} has no fp32 main param for a parameter of shape "
                            f"{tuple(model_param.shape)} (precision-aware optimizer or fp8 params without main copies)"
                        )
                    start, end = param_range(opt, model_param)
                    out.append((main_param, model_param, start, end))
    elif hasattr(opt, "fp32_from_float16_groups"):
        # Float16OptimizerWithFloat16Params: fp32 copies of the 16-bit params, fp32 params themselves.
        for model_group, main_group in zip(opt.float16_groups, opt.fp32_from_float16_groups):
            for model_param, main_param in zip(model_group, main_group):
                out.append((main_param, model_param, 0, model_param.numel()))
        for group in opt.fp32_from_fp32_groups:
            for param in group:
                out.append((param, param, 0, param.numel()))
    elif kind == "FP32Optimizer" or hasattr(opt, "optimizer"):
        for group in opt.optimizer.param_groups:
            for param in group["params"]:
                out.append((param, param, 0, param.numel()))
    else:
        raise OnlineMergeUnsupportedError(f"online merge: unknown megatron optimizer {kind}")
    return out


def param_range(opt: Any, model_param: torch.Tensor) -> tuple[int, int]:
    """The ``[start, end)`` range of ``model_param.view(-1)`` this rank's distributed optimizer owns."""
    found = opt._get_model_param_range_map(model_param)["param"]
    return int(found.start), int(found.end)


def data_parallel_group(opt: Any) -> Any:
    """The group over which ``opt`` shards its params (distributed optimizer), else None (the
    Float16/FP32 optimizers hold whole params on every DP rank)."""
    return getattr(opt, "data_parallel_group", None) if is_distributed_optimizer(opt) else None


def expert_tensor_parallel_size() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_expert_tensor_parallel_world_size()


def tensor_and_data_parallel_group(dp_group: Any) -> tuple[Any, int]:
    """The group of ranks holding pieces of a stage's dense params: tensor-parallel times the
    optimizer's data-parallel group (``dp_group``; None: the optimizer shards nothing), and this
    rank's TP rank. megatron-core builds the TP x DP group with or without context parallelism;
    the one whose size matches the optimizer's DP group is taken."""
    from megatron.core import parallel_state

    tp_group = parallel_state.get_tensor_model_parallel_group()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    if dp_group is None or dp_group.size() == 1:
        return tp_group, tp_rank
    want = (tp_group.size() if tp_group is not None else 1) * dp_group.size()
    for with_cp in (False, True):
        group = parallel_state.get_tensor_and_data_parallel_group(with_context_parallel=with_cp)
        if group is not None and group.size() == want:
            return group, tp_rank
    raise OnlineMergeUnsupportedError(
        f"online merge: no tensor-and-data-parallel group of size {want} for the optimizer's data-parallel group of size "
        f"{dp_group.size()} (a custom DP group?); use ties_scope='shard'"
    )


def trains_on_some_rank(opt: Any, param: torch.Tensor) -> bool | None:
    """Whether a distributed optimizer trains ``param`` on any DP rank (a DP rank may own none of
    it); None for other optimizers (they hold whole params: ask their main params)."""
    buffers = getattr(opt, "buffers", None)
    if buffers is None or not is_distributed_optimizer(opt):
        return None
    return any(param in buffer.param_index_map for buffer in buffers)


# ------------------------------------------------------------- Adam's step around checkpoint loads
@contextlib.contextmanager
def without_step_state(inner: Any) -> Iterator[None]:
    """Hide the per-param ``step`` of a torch-style Adam while megatron's ``fully_reshardable``
    load runs (megatron restores ``step`` from the param groups itself)."""
    steps = {}
    for param, state in inner.state.items():
        if "step" in state:
            steps[param] = state.pop("step")
    try:
        yield
    finally:
        for param, step in steps.items():
            inner.state[param].setdefault("step", step)


def fix_fully_reshardable_load() -> None:
    """Make ``DistributedOptimizer.load_parameter_state_from_fully_reshardable`` hide the per-param
    ``step`` while it runs (see the module docstring). Idempotent; applied to the class, so every
    distributed optimizer of this process gets it, with or without online merging."""
    require_tested_megatron()
    distrib = importlib.import_module("megatron.core.optimizer.distrib_optimizer")
    cls = distrib.DistributedOptimizer
    fn = cls.load_parameter_state_from_fully_reshardable
    if getattr(fn, "__onmerge_step_hidden__", False):
        return

    @functools.wraps(fn)
    def load(self: Any, state_dict: dict, *args: Any, **kwargs: Any) -> Any:
        with without_step_state(self.optimizer):
            return fn(self, state_dict, *args, **kwargs)

    load.__onmerge_step_hidden__ = True  # type: ignore[attr-defined]
    cls.load_parameter_state_from_fully_reshardable = load


def _torch_style_inner_optimizers(megatron_optimizer: Any) -> Iterator[Any]:
    for opt in sub_optimizers(megatron_optimizer):
        inner = getattr(opt, "optimizer", None)
        if inner is not None:
            yield inner


def init_adam_state_for_loading(megatron_optimizer: Any) -> None:
    """Give every main param an (empty) Adam state before a load: the distributed optimizer's
    state template reads exp_avg/exp_avg_sq and torch AdamW's per-param ``step``, which exist
    only after a first step. The loaded values replace these in place."""
    for inner in _torch_style_inner_optimizers(megatron_optimizer):
        for group in inner.param_groups:
            for param in group["params"]:
                state = inner.state[param]
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(param.data)
                    state["exp_avg_sq"] = torch.zeros_like(param.data)
                if "step" not in state:
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)


def restore_adam_steps(megatron_optimizer: Any) -> None:
    """After a load: megatron 0.16 restores torch AdamW's ``step`` into the param groups, but the
    dp_reshardable parameter-state load then copies the (non-persistent, freshly initialised)
    per-param ``step`` over it, restarting Adam's bias correction. Put the saved step back."""
    for inner in _torch_style_inner_optimizers(megatron_optimizer):
        for group in inner.param_groups:
            if "step" not in group:
                continue
            for param in group["params"]:
                state = inner.state.get(param)
                if state is not None and "step" in state:
                    state["step"] = torch.tensor(float(group["step"]), dtype=torch.float32)


# ------------------------------------------------------------------- dist_checkpointing's writers
def checkpoint_results_queue_dies_with_process() -> None:
    """Start the multiprocessing Manager through which dist_checkpointing's file writers report,
    so that its server process dies with this one.

    megatron starts it on the first save (``filesystem_async._get_write_results_queue``, 'spawn'
    context) as a separate Python process that outlives a killed rank. Started here, from the
    calling thread (call it from the main thread, before the first save), its server sets
    PR_SET_PDEATHSIG first. Collective-free; call on every rank."""
    require_tested_megatron()
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if not hasattr(filesystem_async, "_results_queue"):
        logger.warning(
            "megatron-core %s has no filesystem_async._results_queue (tested on %s): the checkpoint writers' "
            "Manager process is not bound to this one and may outlive it", megatron_core_version(), list(TESTED_VERSIONS),
        )
        return
    if filesystem_async._results_queue is not None:  # already started (here, or by an earlier save)
        return
    manager = SyncManager(ctx=mp.get_context("spawn"))
    manager.start(initializer=die_with_parent)
    # The queue proxy holds the manager, which shuts its server down at exit.
    filesystem_async._results_queue = manager.Queue()


# ------------------------------------------------------------------------------- CPU stand-ins
# megatron-core assumes CUDA in a handful of places even when the model is built with
# ``use_cpu_initialization=True`` and the local (non Transformer Engine) layer spec:
#
# 1. ``GlobalMemoryBuffer`` allocates on ``torch.cuda.current_device()``           -> proxy (a)
# 2. the tensor-parallel RNG tracker and ``model_parallel_cuda_manual_seed`` use the CUDA
#    generator                                                                       -> (b)
# 3. DDP grad/param buffers are allocated on ``torch.cuda.current_device()``       -> proxy (a)
# 4. ``MixedPrecisionOptimizer`` / ``FP32Optimizer`` create tensors with ``device='cuda'`` -> (a)
# 5. the optimizers accept only ``param.type() == 'torch.cuda.*Tensor'``            -> (c)
# 6. grad-norm / clipping helpers and the loss scalers create tensors on 'cuda'    -> proxy (a)
# 7. the async filesystem checkpoint writer calls ``torch.cuda.synchronize``        -> proxy (a)
# 8. the ``fully_reshardable`` load and torch AdamW's per-param ``step`` -> fix_fully_reshardable_load
# Beyond those: RoPE's ``inv_freq.to(torch.cuda.current_device())`` (proxy, a) and the tied
# embedding setup's ``weight.data.cuda()`` for PP > 1 (c).
#
# (a) In the listed megatron-core modules, the module-global name ``torch`` is replaced by a proxy
#     that forwards everything to torch except: ``torch.cuda.current_device()`` is the CPU device,
#     ``torch.cuda.synchronize``/``empty_cache`` do nothing, the CUDA RNG functions act on the CPU
#     generator, and tensor factories map a CUDA ``device=`` to the CPU (and drop ``pin_memory``).
#     torch itself is not modified, so code outside megatron-core is unaffected.
# (b) ``_get_cuda_rng_state``/``_set_cuda_rng_state`` in ``tensor_parallel.random`` are replaced
#     by the CPU generator's get/set: ``get_cuda_rng_tracker().fork()`` then swaps the CPU
#     generator's state, which is what dropout on CPU draws from.
# (c) while the optimizers' constructors and the grad-clipping helper run, ``Tensor.type()``
#     (no argument) reports a CPU tensor under its CUDA name, so the dtype checks pass unchanged;
#     likewise ``Tensor.cuda()`` returns the tensor itself while tied embeddings are set up (PP > 1).


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

_cpu_lock = threading.Lock()
_cpu_shims_enabled = False



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


CPU_TORCH = _CpuTorch()
"""The ``torch`` stand-in given to megatron-core modules on CPU (also usable for other libraries' modules)."""


@contextlib.contextmanager
def _tensor_method_replaced(name: str, replacement: Callable[[Callable[..., Any]], Callable[..., Any]]) -> Iterator[None]:
    """torch.Tensor.<name> replaced by ``replacement(original)`` inside the block."""
    original = getattr(torch.Tensor, name)
    setattr(torch.Tensor, name, replacement(original))
    try:
        yield
    finally:
        setattr(torch.Tensor, name, original)


def _cuda_type_name(original: Callable[..., Any]) -> Callable[..., Any]:
    def type_(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        name = original(self, *args, **kwargs)
        if not args and not kwargs and isinstance(name, str) and name.startswith("torch.") and not name.startswith("torch.cuda."):
            return "torch.cuda." + name[len("torch.") :]
        return name

    return type_


def _cuda_type_names() -> contextlib.AbstractContextManager[None]:
    return _tensor_method_replaced("type", _cuda_type_name)


def _cuda_is_noop() -> contextlib.AbstractContextManager[None]:
    return _tensor_method_replaced("cuda", lambda original: lambda self, *args, **kwargs: self)


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


def _proxy_torch(module_names: Iterable[str], replacement: Any) -> None:
    """Rebind the name ``torch`` to ``replacement`` in each module (that imports) whose ``torch`` is torch."""
    for name in module_names:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if getattr(module, "torch", None) is torch:
            module.torch = replacement


def enable_cpu_shims() -> None:
    """Install the CPU stand-ins above in this process (idempotent). Called by
    ``cpu.enable_cpu_megatron``, which describes how models must be built."""
    global _cpu_shims_enabled
    with _cpu_lock:
        if _cpu_shims_enabled:
            return
        require_tested_megatron()
        _proxy_torch(_PROXIED_MODULES, CPU_TORCH)
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
        fix_fully_reshardable_load()
        _cpu_shims_enabled = True


def cpu_shims_enabled() -> bool:
    return _cpu_shims_enabled


# ------------------------------------------------------------- Megatron-LM's training package on CPU
# ``megatron.training`` (Megatron-LM's ``pretrain``; not in the megatron-core wheel) assumes CUDA in
# more places than megatron-core: ``initialize_megatron`` asserts ``torch.cuda.is_available()``,
# ``get_model`` moves the model with ``module.cuda(...)`` and builds DDP on a side CUDA stream, the
# batch helpers move each batch with ``tensor.cuda()``, and timers / logging / the loss reduction
# create tensors on 'cuda' and read CUDA memory statistics. ``enable_cpu_megatron_lm_shims`` gives
# those modules the CPU proxy (a) with the stream and memory calls stubbed, and makes
# ``Tensor.cuda()`` return the tensor itself while ``get_model`` and the batch helper run (c).

_TRAINING_PROXIED_MODULES: tuple[str, ...] = (
    "megatron.training.training",
    "megatron.training.initialize",
    "megatron.training.utils",
    "megatron.training.checkpointing",
    "megatron.training.inprocess_restart",
    "megatron.core.timers",  # megatron-core modules only the training loop uses
    "megatron.core.rerun_state_machine",
)

_TRAINING_CUDA_NOOP_SCOPES: tuple[tuple[str, str], ...] = (
    ("megatron.training.training", "get_model"),
    ("megatron.training.utils", "get_batch_on_this_tp_rank"),
)


class _NoStream:
    """Stands in for a CUDA stream: CPU work is already ordered."""

    def wait_stream(self, *_: Any) -> None:
        return None

    def synchronize(self) -> None:
        return None


class _CpuCudaForTraining(_CpuCuda):
    """``torch.cuda`` inside Megatron-LM's training modules on CPU."""

    # initialize_megatron asserts it; the device itself is the CPU (current_device above).
    @staticmethod
    def is_available() -> bool:
        return True

    @staticmethod
    def Stream(*_: Any, **__: Any) -> _NoStream:  # noqa: N802 (torch's name)
        return _NoStream()

    @staticmethod
    def current_stream(*_: Any, **__: Any) -> _NoStream:
        return _NoStream()

    @staticmethod
    def stream(*_: Any, **__: Any) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    @staticmethod
    def memory_allocated(*_: Any, **__: Any) -> int:
        return 0

    max_memory_allocated = memory_reserved = max_memory_reserved = memory_allocated


class _CpuTorchForTraining(_CpuTorch):
    def __init__(self) -> None:
        super().__init__()
        self.cuda = _CpuCudaForTraining()


_training_shims_enabled = False


def enable_cpu_megatron_lm_shims(script_modules: tuple[str, ...] = ()) -> None:
    """Install the CPU stand-ins for Megatron-LM's ``megatron.training`` (and for the modules named
    in ``script_modules``, e.g. ``pretrain_gpt``), on top of ``enable_cpu_shims``. Idempotent per
    module: a later call installs nothing twice, but does rebind the modules it newly names.
    Run with ``--distributed-backend gloo`` and the flags ``cpu.enable_cpu_megatron`` describes."""
    global _training_shims_enabled
    enable_cpu_shims()
    cpu_torch = _CpuTorchForTraining()
    with _cpu_lock:
        _proxy_torch((*_TRAINING_PROXIED_MODULES, *script_modules), cpu_torch)
        if not _training_shims_enabled:
            # initialize_megatron's fused_kernels.load runs `nvcc -V` (and, in this release, builds
            # nothing); the unfused softmax (--no-masked-softmax-fusion) needs no kernel.
            initialize = importlib.import_module("megatron.training.initialize")
            initialize.fused_kernels = types.SimpleNamespace(load=lambda args: None)
        for module_name, qualname in _TRAINING_CUDA_NOOP_SCOPES:
            found = _resolve(module_name, qualname)
            if found is None:
                continue
            owner, attr, fn = found
            if getattr(fn, "__onmerge_cpu__", False):  # wrapped by an earlier call
                wrapped, fn = fn, fn.__wrapped__
            else:
                wrapped = _scoped(fn, _cuda_is_noop)
                setattr(owner, attr, wrapped)
            # Imported by name too (pretrain_gpt: ``from megatron.training.utils import ...``),
            # including by script modules named only in this call.
            for module in list(sys.modules.values()):
                name = getattr(module, "__name__", "")
                if (name.startswith("megatron.") or name in script_modules) and getattr(module, attr, None) is fn:
                    setattr(module, attr, wrapped)
        _training_shims_enabled = True


def use_prebuilt_dataset_helpers() -> bool:
    """Make ``megatron.core.datasets.utils.compile_helpers`` a no-op when the installed megatron-core
    already has its compiled dataset helpers (the wheel ships ``helpers_cpp`` built, without the
    Makefile that ``initialize_megatron`` runs ``make`` on, so Megatron-LM's ``pretrain`` against the
    wheel exits with "Failed to compile the C++ dataset helper functions"). Returns whether it did."""
    require_tested_megatron()
    try:
        importlib.import_module("megatron.core.datasets.helpers_cpp")
    except ImportError:
        return False  # a source checkout: megatron builds them
    utils = importlib.import_module("megatron.core.datasets.utils")
    utils.compile_helpers = lambda: None
    return True


# --------------------------------------------------------------------------- packed sequences


def _gpt_model(model: torch.nn.Module) -> torch.nn.Module:
    while hasattr(model, "module"):  # DDP, Float16Module
        model = model.module
    return model


@contextlib.contextmanager
def rope_at_positions(model: torch.nn.Module, position_ids: torch.Tensor) -> Iterator[None]:
    """Within the block, `model` (a GPTModel, possibly wrapped) rotates each position by its
    `position_ids` [b, s] instead of by its index in the row: packed rows restart the positions of
    every sequence. megatron-core's RotaryEmbedding returns the angles of positions 0..s-1 as
    [s, 1, 1, d], broadcast over the batch; here they become [s, b, 1, d], one column per row,
    which the unfused (bshd) rotation broadcasts the same way. Rows whose positions are 0..s-1
    get bitwise the same angles."""
    gpt = _gpt_model(model)
    rope = getattr(gpt, "rotary_pos_emb", None)
    if rope is None or gpt.config.apply_rope_fusion or gpt.config.context_parallel_size > 1:
        raise RuntimeError("explicit RoPE positions need GPTModel's unfused rotary embedding without context parallelism")

    def forward(max_seq_len: int, offset: int = 0, packed_seq: bool = False, cp_group: Any = None) -> torch.Tensor:
        emb = type(rope).forward(rope, max_seq_len, offset, packed_seq, cp_group)  # [s, 1, 1, d]
        return emb[:, 0, 0, :][position_ids.t().to(emb.device)].unsqueeze(2)

    rope.forward = forward  # an instance attribute: nn.Module.__call__ finds it first
    try:
        yield
    finally:
        del rope.forward


def thd_packed_seq_params(cu_seqlens: torch.Tensor, max_seqlen: int, cu_seqlens_padded: torch.Tensor | None = None,
                          cp_group: Any = None) -> Any:
    """megatron-core's PackedSeqParams for one THD row whose sequences end at `cu_seqlens`
    (int32, on the model's device, starting with 0) and, under context parallelism, whose
    padded slots end at `cu_seqlens_padded` and whose positions are split over `cp_group` (the
    context-parallel group; None without CP); `max_seqlen` is the longest (padded) one."""
    from megatron.core.packed_seq_params import PackedSeqParams

    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                           cu_seqlens_q_padded=cu_seqlens_padded, cu_seqlens_kv_padded=cu_seqlens_padded,
                           max_seqlen_q=max_seqlen, max_seqlen_kv=max_seqlen, cp_group=cp_group)


def thd_partitioned_indices(cu_seqlens_padded: torch.Tensor, total: int, cp_size: int, cp_rank: int) -> torch.Tensor:
    """The positions of a THD row of `total` that CP rank `cp_rank` holds: Transformer Engine's
    own choice (`thd_get_partitioned_indices`, as megatron-core's get_thd_batch_on_this_cp_rank
    uses it), which its context-parallel attention expects."""
    import transformer_engine_torch as tex

    return tex.thd_get_partitioned_indices(cu_seqlens_padded, total, cp_size, cp_rank)
