"""AdamW plus online merging in one pass over the dense state, with Triton kernels.

`FusedOnlineMergingAdamW` is the engine (`OnlineMergingAdamW`, `merging.merger.merge_segment`)
with its one dense-pass hook, `OnlineMergingAdamW._dense_pass`, overridden; the algorithm (step-K
schedule, sparsification, consensus, statistics, EMA) is the engine's. What the kernels take over,
through the hooks the engine documents (`merging.merger.MergeHooks`):

- `_adamw_merge_kernel` (the dense pass) does weight decay and the moment updates in one read and
  write of each dense tensor, and depending on the step also
  - the step-K part (`MergeHooks.step_k_done`): the plain update applied and accumulated
    (non-merge steps), or the accumulated updates rolled back (merge steps);
  - OnTIES merge steps: the update's magnitude, compared against a cut predicted from the
    previous merge; positions at or above it are appended to a small candidate list (about 2 k),
    offered to the engine's selection (`MergeHooks.top_k_candidates`), which proves them complete
    or selects over the whole segment itself. Either way the kept set is the engine's.
- `_dare_update_kernel` (`MergeHooks.add_dare_update`) does OnDARE's sparse part: it draws the
  counter-based keep-mask of one 2^16-index block in registers, exactly as `rng._block_positions`
  does, and adds the rescaled, weighted update at the kept positions (about p of the elements),
  with no host synchronisation. OnDARE's fixed reference term is built once and added with
  `index_add_` (`MergeHooks.add_dare_reference`).

Bit agreement: every rounding of the engine's torch ops is reproduced (`tl.fma` where torch's
kernels fuse, IEEE `sqrt_rn`/`div_rn`, bf16 round-to-nearest-even done on the bits, contraction
otherwise disabled). Where torch's kernels differ between devices or releases (which lerp and
addcmul fuse, whether a division by a Python scalar multiplies by its reciprocal), the kernels
follow what `torch_rounding` reads off the device. torch's CPU sqrt is not correctly rounded (its
CUDA sqrt is), which bounds the agreement with the CPU engine to the last bit of the update. See
docs/kernels.md.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Literal

import numpy
import torch

from ..merging import rng
from ..merging import state as merge_state
from ..merging.config import OnlineMergeConfig
from ..merging.merger import MergeHooks, MergeStats, Update, is_merge_step, segment_top_k
from ..merging.reference import ReferenceDelta, reference_positions
from ..merging.sparsify import Candidates
from ..optim import AdamUpdate, NonFinite, OnlineMergingAdamW, Segment

try:
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 - a missing or broken Triton only disables the kernel
    triton = None
    tl = None

# Triton reads this at import; on CPU tensors the kernel runs only in interpreter mode.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")

MODE_MOMENTS = 0
"""Weight decay and moments only (merge steps with K = 1, elements no segment covers)."""
MODE_ACCUMULATE = 1
"""Step-K non-merge step: also param += update, accumulator += update."""
MODE_ROLLBACK = 2
"""Step-K merge step: also param -= accumulator (the update is merged with it)."""

_MARGIN = {torch.float32: 2.0**-16, torch.bfloat16: 2.0**-5}
"""Relative slack between the kernel's magnitudes and the engine's, used only to prove that the
candidate list holds the whole top-k. They differ by at most an ulp per rounded operation (torch's
CPU sqrt is off by one ulp at times; a device's scalar division may round differently): fp32
2^-23 each, bf16 2^-8 each, four roundings, well inside these bounds."""

# The OnTIES candidate list holds up to _CAPACITY * k + 1024 positions (int64) before the step
# falls back.
_CAPACITY = 4


def triton_available() -> bool:
    """True when Triton imported (the kernel can run on CUDA, or on CPU in interpreter mode)."""
    return triton is not None


if triton is not None:

    @triton.jit
    def _load_f32(ptr, offs, mask, IS_BF16: tl.constexpr):
        # bf16 tensors are passed as int16 views: the interpreter's own bf16 casts truncate, and
        # exact bit handling is the same on every backend.
        if IS_BF16:
            raw = tl.load(ptr + offs, mask=mask, other=0)
            return (raw.to(tl.int32) << 16).to(tl.float32, bitcast=True)
        else:
            return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)

    @triton.jit
    def _round(x, IS_BF16: tl.constexpr):
        """x rounded to the storage type (bf16: round to nearest even, as torch), kept as fp32."""
        if IS_BF16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = ((bits + (((bits >> 16) & 1) + 0x7FFF)) >> 16) << 16
            return tl.where(x != x, x, bits.to(tl.float32, bitcast=True))
        else:
            return x

    @triton.jit
    def _adam_update(m, v, bc2_sqrt, inv_bc2_sqrt, eps, neg_step_size, IS_BF16: tl.constexpr, RECIPROCAL_DIV: tl.constexpr):
        """AdamUpdate._update: (m / (sqrt(v) / bc2_sqrt + eps)) * (-step_size), rounded per op as
        the device's torch kernels round (`_TorchRounding`)."""
        denom = _round(tl.sqrt_rn(v), IS_BF16)
        if RECIPROCAL_DIV:
            denom = _round(denom * inv_bc2_sqrt, IS_BF16)
        else:
            denom = _round(tl.div_rn(denom, bc2_sqrt), IS_BF16)
        denom = _round(denom + eps, IS_BF16)
        return _round(_round(tl.div_rn(m, denom), IS_BF16) * neg_step_size, IS_BF16)

    @triton.jit
    def _store(ptr, offs, x, mask, IS_BF16: tl.constexpr):
        """Store a value already rounded by `_round`."""
        if IS_BF16:
            tl.store(ptr + offs, (x.to(tl.uint32, bitcast=True) >> 16).to(tl.int16), mask=mask)
        else:
            tl.store(ptr + offs, x, mask=mask)

    @triton.jit
    def _adamw_merge_kernel(
        param_ptr,
        grad_ptr,
        exp_avg_ptr,
        exp_avg_sq_ptr,
        acc_ptr,
        cand_ptr,
        count_ptr,
        n,
        lerp_weight,
        beta2,
        addcmul_value,
        decay,
        neg_step_size,
        bc2_sqrt,
        inv_bc2_sqrt,
        eps,
        cut,
        capacity,
        PARAM_BF16: tl.constexpr,
        STATE_BF16: tl.constexpr,
        WEIGHT_DECAY: tl.constexpr,
        NEGATE_GRAD: tl.constexpr,
        LERP_SMALL: tl.constexpr,
        LERP_FUSED: tl.constexpr,
        ADDCMUL: tl.constexpr,
        MODE: tl.constexpr,
        CANDIDATES: tl.constexpr,
        RECIPROCAL_DIV: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inb = offs < n
        # Float scalars are rounded to float32 on the host, as torch rounds a Python scalar for a
        # float32 op, so their conversion here (float32 argument, or constant) is exact.

        g = _load_f32(grad_ptr, offs, inb, PARAM_BF16)
        if NEGATE_GRAD:
            g = -g
        m = _load_f32(exp_avg_ptr, offs, inb, STATE_BF16)
        v = _load_f32(exp_avg_sq_ptr, offs, inb, STATE_BF16)

        # exp_avg.lerp_(grad, 1 - beta1), rounded as the device's torch kernel does (`_TorchRounding`).
        diff = g - m
        if LERP_SMALL:
            if LERP_FUSED:
                m = tl.fma(lerp_weight, diff, m)
            else:
                m = m + lerp_weight * diff
        else:
            if LERP_FUSED:
                m = tl.fma(lerp_weight - 1.0, diff, g)
            else:
                m = g + (lerp_weight - 1.0) * diff
        m = _round(m, STATE_BF16)
        # exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2): two torch ops, two roundings.
        v = _round(v * beta2, STATE_BF16)
        if ADDCMUL == 0:  # ADDCMUL_SCALED_FMA
            v = tl.fma(addcmul_value * g, g, v)
        elif ADDCMUL == 1:  # ADDCMUL_PRODUCT_FMA
            v = tl.fma(addcmul_value, g * g, v)
        elif ADDCMUL == 2:  # ADDCMUL_SCALED
            v = v + (addcmul_value * g) * g
        else:  # ADDCMUL_PRODUCT
            v = v + addcmul_value * (g * g)
        v = _round(v, STATE_BF16)
        _store(exp_avg_ptr, offs, m, inb, STATE_BF16)
        _store(exp_avg_sq_ptr, offs, v, inb, STATE_BF16)

        if MODE != 0 or CANDIDATES:
            update = _adam_update(m, v, bc2_sqrt, inv_bc2_sqrt, eps, neg_step_size, STATE_BF16, RECIPROCAL_DIV)
        if MODE != 0:
            acc = tl.load(acc_ptr + offs, mask=inb, other=0.0)
        if WEIGHT_DECAY or MODE != 0:
            p = _load_f32(param_ptr, offs, inb, PARAM_BF16)
            if WEIGHT_DECAY:
                p = _round(p * decay, PARAM_BF16)
            if MODE == 1:
                p = _round(p + update, PARAM_BF16)
                tl.store(acc_ptr + offs, acc + update, mask=inb)
            if MODE == 2:
                p = _round(p - acc, PARAM_BF16)
            _store(param_ptr, offs, p, inb, PARAM_BF16)

        if CANDIDATES:
            if MODE == 2:
                magnitude = tl.abs(update + acc)
            else:
                magnitude = tl.abs(update)
            keep = (magnitude >= cut) & inb
            keep_i = keep.to(tl.int32)
            base = tl.atomic_add(count_ptr, tl.sum(keep_i, axis=0))
            slot = base + tl.cumsum(keep_i, axis=0) - 1
            tl.store(cand_ptr + slot, offs, mask=keep & (slot < capacity))

    @triton.jit
    def _dare_update_kernel(
        param_ptr,
        exp_avg_ptr,
        exp_avg_sq_ptr,
        lookup_ptr,
        thresholds_ptr,
        stats_ptr,
        seed,
        first_block,
        lo,
        hi,
        step,
        stream,
        n_thresholds,
        bc2_sqrt,
        inv_bc2_sqrt,
        eps,
        neg_step_size,
        keep_rate,
        inv_keep_rate,
        update_weight,
        PARAM_BF16: tl.constexpr,
        STATE_BF16: tl.constexpr,
        RESCALE: tl.constexpr,
        RECIPROCAL_DIV: tl.constexpr,
        CALLS: tl.constexpr,
        SEARCH_STEPS: tl.constexpr,
        MASK_BLOCK: tl.constexpr,
    ):
        """OnDARE's update at the kept positions of one 2^16-index mask block: the keep-mask drawn
        in registers exactly as `rng._block_positions` draws it (Philox call j of block b with
        counter (j, b, step, stream) gives gaps 4j .. 4j+3), then param[pos] += (1 - alpha) F(update)."""
        block = first_block + tl.program_id(0).to(tl.int64)
        block_start = block * MASK_BLOCK
        cursor = block * 0 - 1  # last kept position inside the block so far
        first_call = block * 0
        kept = block * 0
        merged_sq = (block * 0).to(tl.float64)
        while cursor < MASK_BLOCK:
            calls = first_call + tl.arange(0, CALLS)
            c0 = calls.to(tl.uint32)
            c1 = (calls * 0 + block).to(tl.uint32)
            c2 = (calls * 0 + step).to(tl.uint32)
            c3 = (calls * 0 + stream).to(tl.uint32)
            w0, w1, w2, w3 = tl.philox(seed, c0, c1, c2, c3, 10)
            # Word order of the engine: call-major, then the four outputs.
            words = tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), (4 * CALLS,))
            wide = words.to(tl.int64) & 0xFFFFFFFF
            gaps = tl.load(lookup_ptr + (wide >> 16)).to(tl.int64)
            # Buckets holding a threshold: search the thresholds (searchsorted right, plus one).
            unresolved = gaps < 0
            low = tl.zeros_like(wide)
            high = tl.zeros_like(wide) + n_thresholds
            for _ in tl.static_range(SEARCH_STEPS):
                mid = (low + high) >> 1
                t = tl.load(thresholds_ptr + mid, mask=unresolved & (low < high), other=0)
                right = t <= wide
                low = tl.where(unresolved & (low < high) & right, mid + 1, low)
                high = tl.where(unresolved & (low < high) & ~right, mid, high)
            gaps = tl.where(unresolved, low + 1, gaps)
            positions = cursor + tl.cumsum(gaps, axis=0)
            index = block_start + positions
            mine = (positions < MASK_BLOCK) & (index >= lo) & (index <= hi)
            local = index - lo
            m = _load_f32(exp_avg_ptr, local, mine, STATE_BF16)
            v = _load_f32(exp_avg_sq_ptr, local, mine, STATE_BF16)
            update = _adam_update(m, v, bc2_sqrt, inv_bc2_sqrt, eps, neg_step_size, STATE_BF16, RECIPROCAL_DIV)
            if RESCALE:
                if RECIPROCAL_DIV:
                    update = _round(update * inv_keep_rate, STATE_BF16)
                else:
                    update = _round(tl.div_rn(update, keep_rate), STATE_BF16)
            update = _round(update * update_weight, STATE_BF16)
            p = _load_f32(param_ptr, local, mine, PARAM_BF16)
            _store(param_ptr, local, _round(p + update, PARAM_BF16), mine, PARAM_BF16)
            kept += tl.sum(mine.to(tl.int64), axis=0)
            sq = tl.where(mine, update.to(tl.float64) * update.to(tl.float64), 0.0)
            merged_sq += tl.sum(sq, axis=0)
            # The block's end not reached: draw the next calls from the last position.
            cursor = tl.max(positions, axis=0)
            first_call += CALLS
        tl.atomic_add(stats_ptr, kept.to(tl.float64))
        tl.atomic_add(stats_ptr + 1, merged_sq)


def _f32(x: float) -> float:
    """A Python scalar as torch rounds it for a float32 / bf16 op (double -> float, nearest even)."""
    return float(numpy.float32(x))


@dataclass(frozen=True)
class _Scalars:
    lerp_weight: float
    beta2: float
    addcmul_value: float
    decay: float
    neg_step_size: float
    bc2_sqrt: float
    inv_bc2_sqrt: float
    eps: float
    lerp_small: bool
    weight_decay: bool
    negate_grad: bool


@dataclass(frozen=True)
class _TiesPlan:
    cut: float
    capacity: int


DIV_TRUE, DIV_RECIPROCAL_OF_FLOAT, DIV_RECIPROCAL_OF_DOUBLE = range(3)
"""How x / c rounds for a Python scalar c: an IEEE float division by float(c), or a multiply by a
reciprocal, computed in float from float(c) (1.0f / float(c)) or in double from c itself and then
rounded to float (torch 2.11's CUDA kernel)."""

ADDCMUL_SCALED_FMA, ADDCMUL_PRODUCT_FMA, ADDCMUL_SCALED, ADDCMUL_PRODUCT = range(4)
"""How addcmul_(g, g, value=c) rounds v + c g g: fma(c g, g, v) (the CPU's, and CUDA's contraction of
``a + alpha * b * c``), fma(c, g g, v) (CUDA's explicit fma in newer torch), or without an fma."""


@dataclass(frozen=True)
class _TorchRounding:
    """How the device's torch kernels round the engine's element-wise ops where C++ leaves a choice
    (an fma or two roundings, a division or a reciprocal multiply). These differ between devices
    and between torch releases, so they are read off the device once (`torch_rounding`) rather
    than assumed."""

    lerp_fused: bool
    """exp_avg.lerp_(grad, w): fma(w, grad - exp_avg, exp_avg), else two roundings."""
    addcmul: int
    """One of the ADDCMUL_* forms."""
    scalar_div: int
    """One of the DIV_* forms."""

    @property
    def reciprocal_div(self) -> bool:
        return self.scalar_div != DIV_TRUE

    def reciprocal(self, x: float) -> float:
        """The float the device's torch multiplies by to divide by the Python scalar x."""
        return _reciprocal(x, self.scalar_div)


def _reciprocal(x: float, form: int) -> float:
    if form == DIV_RECIPROCAL_OF_DOUBLE:
        return _f32(1.0 / x)
    return float(numpy.float32(1.0) / numpy.float32(x))


_ROUNDING: dict[torch.device, _TorchRounding | None] = {}
_PROBE_WEIGHT, _PROBE_VALUE, _PROBE_DIVISOR = 0.1, 1 - 0.999, 0.0316227766
"""The probe's lerp weight (1 - beta1), addcmul value (1 - beta2) and divisor (a bias correction)."""


def rounding_misses(device: torch.device) -> dict[str, dict[Any, int]]:
    """For each op whose rounding `torch_rounding` reads, and each candidate form, how many of 4096
    Adam-like values torch on ``device`` computes differently from the form (computed on the CPU
    in float64 from float32 inputs: products exact, a sum rounded to float64 and then to float32,
    which could miss one element in billions)."""
    device = torch.device(device)
    gen = torch.Generator().manual_seed(0)
    n = 4096
    g = (torch.randn(n, generator=gen) + 1.0) * 1e-2
    m = torch.randn(n, generator=gen) * 1e-2
    # Of the size of (1 - beta2) g^2, where an fma and two roundings differ most often; half at
    # zero, as at Adam's first step.
    v = torch.rand(n, generator=gen) * 2e-7
    v[: n // 2] = 0.0
    w, c, d = _f32(_PROBE_WEIGHT), _f32(_PROBE_VALUE), _f32(_PROBE_DIVISOR)
    g64, m64, v64 = g.double(), m.double(), v.double()
    diff64 = (g - m).double()
    # In place as the engine calls them, on copies (.to() of a CPU tensor to the CPU is itself).
    lerp = m.to(device, copy=True).lerp_(g.to(device), _PROBE_WEIGHT).cpu()
    addcmul = v.to(device, copy=True).addcmul_(g.to(device), g.to(device), value=_PROBE_VALUE).cpu()
    divided = (v.to(device) / _PROBE_DIVISOR).cpu()
    forms = {
        "lerp": (lerp, {True: (w * diff64 + m64).float(), False: m + (w * diff64).float()}),
        "addcmul": (addcmul, {
            ADDCMUL_SCALED_FMA: ((c * g).double() * g64 + v64).float(),
            ADDCMUL_PRODUCT_FMA: (c * (g * g).double() + v64).float(),
            ADDCMUL_SCALED: v + (c * g) * g,
            ADDCMUL_PRODUCT: v + c * (g * g),
        }),
        "div": (divided, {
            DIV_TRUE: (v64 / d).float(),
            DIV_RECIPROCAL_OF_FLOAT: (v64 * _reciprocal(_PROBE_DIVISOR, DIV_RECIPROCAL_OF_FLOAT)).float(),
            DIV_RECIPROCAL_OF_DOUBLE: (v64 * _reciprocal(_PROBE_DIVISOR, DIV_RECIPROCAL_OF_DOUBLE)).float(),
        }),
    }
    return {op: {form: int((result != value).sum()) for form, value in candidates.items()}
            for op, (result, candidates) in forms.items()}


def torch_rounding(device: torch.device) -> _TorchRounding | None:
    """The rounding of torch's lerp_, addcmul_ and division by a scalar on ``device`` (cached): for
    each op the one candidate form that matches torch on all but at most one of `rounding_misses`'
    values. None when an op has no such form, or several: the kernel is then not used there."""
    device = torch.device(device)
    if device not in _ROUNDING:
        chosen = {}
        for op, misses in rounding_misses(device).items():
            fits = [form for form, miss in misses.items() if miss <= 1]
            chosen[op] = fits[0] if len(fits) == 1 else None
        known = None not in chosen.values()
        _ROUNDING[device] = _TorchRounding(chosen["lerp"], chosen["addcmul"], chosen["div"]) if known else None
    return _ROUNDING[device]


def _as_kernel_arg(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t


class FusedOnlineMergingAdamW(OnlineMergingAdamW):
    """`OnlineMergingAdamW` whose dense pass runs as one fused Triton kernel per parameter.

    Same arguments, state keys (`step`, `exp_avg`, `exp_avg_sq`, `merge_accumulator`, the reference
    state) and results as the engine, so it can replace it inside Megatron's distributed optimizer
    or DeepSpeed. It overrides only the engine's dense-pass hook (`_dense_pass`) and hands the
    engine one `_KernelHooks` per segment; the gradient check, the step-K schedule, the selection,
    the consensus and the statistics stay the engine's. Extra arguments:
        backend: "auto" (the kernel on CUDA tensors when Triton imports, the engine otherwise),
            "triton" (always the kernel; on CPU only under TRITON_INTERPRET=1, used by the tests),
            "torch" (always the engine).
        block_size: elements per Triton program (default 1024).
    Parameters the kernel does not cover (method="none", sparse or non-contiguous gradients, dtypes
    other than fp32/bf16) take the engine's path, which gives the same results.
    """

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        merge: OnlineMergeConfig | None = None,
        maximize: bool = False,
        nonfinite: NonFinite = "raise",
        backend: Literal["auto", "triton", "torch"] = "auto",
        block_size: int = 1024,
    ) -> None:
        super().__init__(
            params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, merge=merge, maximize=maximize, nonfinite=nonfinite
        )
        if backend not in ("auto", "triton", "torch"):
            raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
        if backend == "triton" and triton is None:
            raise RuntimeError("backend='triton' needs the triton package")
        if block_size < 16 or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 16, got {block_size}")
        self.backend = backend
        self.block_size = block_size
        self.kernel_counts = dict.fromkeys(
            ("fused", "engine", "dare_kernel", "dare_torch", "ties_fast", "ties_no_cut", "ties_too_few", "ties_too_many", "ties_margin", "ties_not_applicable"), 0
        )
        """How parameter steps were taken (fused: the dense kernel; engine: the engine's dense
        pass), how OnDARE updates were applied (in-kernel mask or the engine's), and whether the
        engine's OnTIES selection used the kernel's candidates or why not (for tests and logs; not
        saved). Misses give the same result, only slower."""
        # Per parameter and segment index: OnDARE's fixed reference term (the ReferenceDelta it was
        # built from, positions on the device, alpha * values, squared norm).
        self._reference_terms: dict[torch.Tensor, dict[int, tuple[ReferenceDelta, torch.Tensor, torch.Tensor, float]]] = {}
        self._gap_tables: dict[tuple[torch.device, float], tuple[torch.Tensor, torch.Tensor]] = {}
        # OnDARE kept counts and merged squared norms, summed on the device (see add_dare_update).
        self._device_stats: dict[torch.device, torch.Tensor] = {}

    # ---------------------------------------------------------------- the dense-pass hook
    def _kernel_applies(self, data: torch.Tensor, grad: torch.Tensor, state: dict, config: OnlineMergeConfig) -> bool:
        if self.backend == "torch" or triton is None or not config.merges:
            return False
        if not data.is_cuda:
            if self.backend != "triton":
                return False
            if not _INTERPRET:
                raise RuntimeError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported")
        tensors = [data, grad, state["exp_avg"], state["exp_avg_sq"]]
        if merge_state.ACCUMULATOR in state:
            if state[merge_state.ACCUMULATOR].dtype != torch.float32:
                return False
            tensors.append(state[merge_state.ACCUMULATOR])
        if data.dtype not in _MARGIN or grad.dtype != data.dtype:
            return False
        if torch_rounding(data.device) is None:  # the engine's roundings could not be reproduced
            return False
        if state["exp_avg"].dtype not in _MARGIN or state["exp_avg_sq"].dtype != state["exp_avg"].dtype:
            return False
        return all(t.is_contiguous() and t.device == data.device for t in tensors)

    def _dense_pass(
        self,
        param: torch.Tensor,
        data: torch.Tensor,
        grad: torch.Tensor,
        state: dict[str, Any],
        group: dict[str, Any],
        step: int,
        step_size: float,
        bias_correction2_sqrt: float,
        config: OnlineMergeConfig,
    ) -> list[MergeHooks] | None:
        if not self._kernel_applies(data, grad, state, config):
            self.kernel_counts["engine"] += 1
            return super()._dense_pass(param, data, grad, state, group, step, step_size, bias_correction2_sqrt, config)
        self.kernel_counts["fused"] += 1
        lr, (beta1, beta2), weight_decay = group["lr"], group["betas"], group["weight_decay"]
        # The engine's scalars, computed the same way in double precision, rounded as torch rounds them.
        scalars = _Scalars(
            lerp_weight=_f32(1 - beta1),
            beta2=_f32(beta2),
            addcmul_value=_f32(1 - beta2),
            decay=_f32(1 - lr * weight_decay),
            neg_step_size=_f32(-step_size),
            bc2_sqrt=_f32(bias_correction2_sqrt),
            inv_bc2_sqrt=torch_rounding(data.device).reciprocal(bias_correction2_sqrt),
            eps=_f32(group["eps"]),
            lerp_small=abs(_f32(1 - beta1)) < 0.5,
            weight_decay=weight_decay != 0,
            negate_grad=bool(group["maximize"]),
        )
        flat, flat_grad = data.view(-1), grad.view(-1)
        m, v = state["exp_avg"].view(-1), state["exp_avg_sq"].view(-1)
        accumulator = state.get(merge_state.ACCUMULATOR)
        acc = accumulator.view(-1) if accumulator is not None else None
        merge_now = is_merge_step(config, step)
        if not merge_now:
            segment_mode = MODE_ACCUMULATE
        else:
            segment_mode = MODE_ROLLBACK if config.merge_every > 1 else MODE_MOMENTS
        segments = self.segments(param)

        # One launch per run of elements that need the same pass; OnTIES segments with a plan get
        # their own (each has its own candidate list).
        plans = {i: self._ties_plan(param, i, seg, config) for i, seg in enumerate(segments)} if merge_now and config.method == "ties" else {}
        found: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        runs: list[list[int | None]] = []  # [start, end, mode, segment index or None]
        cursor = 0
        for i, seg in sorted(enumerate(segments), key=lambda item: item[1].offset):
            if seg.offset > cursor:
                runs.append([cursor, seg.offset, MODE_MOMENTS, None])
            runs.append([seg.offset, seg.offset + seg.coords.numel, segment_mode, i if plans.get(i) else None])
            cursor = seg.offset + seg.coords.numel
        if cursor < flat.numel():
            runs.append([cursor, flat.numel(), MODE_MOMENTS, None])
        merged: list[list[int | None]] = []
        for run in runs:
            if merged and merged[-1][1] == run[0] and merged[-1][2] == run[2] and merged[-1][3] is None and run[3] is None:
                merged[-1][1] = run[1]
            else:
                merged.append(run)
        for start, end, mode, seg_index in merged:
            plan = plans.get(seg_index) if seg_index is not None else None
            out = None
            if plan is not None:
                out = (
                    torch.empty(plan.capacity, dtype=torch.int64, device=data.device),
                    torch.zeros(1, dtype=torch.int32, device=data.device),
                )
                found[seg_index] = out
            self._launch(flat, flat_grad, m, v, acc, start, end, mode, scalars, plan, out)
        margin = _MARGIN[m.dtype]
        return [
            _KernelHooks(self, param, i, seg, step, plans.get(i), found.get(i), margin, config.merge_every > 1)
            for i, seg in enumerate(segments)
        ]

    def _ties_plan(self, param: torch.Tensor, index: int, seg: Segment, config: OnlineMergeConfig) -> _TiesPlan | None:
        """Candidate collection for a segment's OnTIES merge, where the engine consults candidates
        (`segment_top_k`) and a cut was predicted at the previous merge."""
        k = segment_top_k(config, seg.coords, seg.group is not None)
        cut = self.predicted_cut(param, index)
        if k is None or cut is None:
            self.kernel_counts["ties_not_applicable" if k is None else "ties_no_cut"] += 1
            return None
        return _TiesPlan(cut=cut, capacity=min(seg.coords.numel, _CAPACITY * k + 1024))

    def _launch(self, flat, grad, m, v, acc, start, end, mode, s: _Scalars, plan, out) -> None:
        n = end - start
        if n == 0:
            return
        sl = slice(start, end)
        dummy = m[sl]
        cand, count = out if out is not None else (dummy, dummy)
        extra = {} if _INTERPRET else {"enable_fp_fusion": False}
        rounding = torch_rounding(flat.device)
        grid = (triton.cdiv(n, self.block_size),)
        _adamw_merge_kernel[grid](
            _as_kernel_arg(flat[sl]),
            _as_kernel_arg(grad[sl]),
            _as_kernel_arg(m[sl]),
            _as_kernel_arg(v[sl]),
            acc[sl] if (acc is not None and mode != MODE_MOMENTS) else dummy,
            cand,
            count,
            n,
            s.lerp_weight,
            s.beta2,
            s.addcmul_value,
            s.decay,
            s.neg_step_size,
            s.bc2_sqrt,
            s.inv_bc2_sqrt,
            s.eps,
            plan.cut if plan is not None else 0.0,
            plan.capacity if plan is not None else 0,
            PARAM_BF16=flat.dtype == torch.bfloat16,
            STATE_BF16=m.dtype == torch.bfloat16,
            WEIGHT_DECAY=s.weight_decay,
            NEGATE_GRAD=s.negate_grad,
            LERP_SMALL=s.lerp_small,
            LERP_FUSED=rounding.lerp_fused,
            ADDCMUL=rounding.addcmul,
            MODE=mode,
            CANDIDATES=plan is not None,
            RECIPROCAL_DIV=rounding.reciprocal_div,
            BLOCK=self.block_size,
            **extra,
        )

    # ---------------------------------------------------------------- OnDARE's sparse kernel
    def _launch_dare_update(self, segment: torch.Tensor, update: AdamUpdate, name: str, lo: int, hi: int, step: int) -> None:
        config = self.merge_config
        if hi < lo:
            return
        lookup, thresholds = self._gap_tables_on(segment.device, config.keep_rate)
        key0, key1 = rng.mask_key(config.seed, name)
        rounding = torch_rounding(segment.device)
        expected = config.keep_rate * rng.BLOCK
        # Philox calls drawn per loop turn: about one turn per mask block (capped for registers).
        calls = min(1024, triton.next_power_of_2(int((expected + 4.5 * math.sqrt(expected) + 8) / 4) + 1))
        extra = {} if _INTERPRET else {"enable_fp_fusion": False}
        first_block, last_block = lo // rng.BLOCK, hi // rng.BLOCK
        _dare_update_kernel[(last_block - first_block + 1,)](
            _as_kernel_arg(segment),
            _as_kernel_arg(update.exp_avg),
            _as_kernel_arg(update.exp_avg_sq),
            lookup,
            thresholds,
            self._device_stats_on(segment.device),
            key0 | (key1 << 32),
            first_block,
            lo,
            hi,
            step,
            rng.STREAM_UPDATE,
            thresholds.numel(),
            _f32(update.bias_correction2_sqrt),
            rounding.reciprocal(update.bias_correction2_sqrt),
            _f32(update.eps),
            _f32(-update.step_size),
            _f32(config.keep_rate),
            rounding.reciprocal(config.keep_rate),
            _f32(1.0 - config.alpha),
            PARAM_BF16=segment.dtype == torch.bfloat16,
            STATE_BF16=update.exp_avg.dtype == torch.bfloat16,
            RESCALE=config.dare_rescale,
            RECIPROCAL_DIV=rounding.reciprocal_div,
            CALLS=calls,
            SEARCH_STEPS=max(1, int(thresholds.numel()).bit_length() + 1),
            MASK_BLOCK=rng.BLOCK,
            **extra,
        )

    def _gap_tables_on(self, device: torch.device, keep_rate: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The engine's geometric-gap tables (bucket lookup as int32, thresholds), cached per device."""
        key = (device, keep_rate)
        if key not in self._gap_tables:
            thresholds, lookup = rng.gap_tables(keep_rate)
            self._gap_tables[key] = (lookup.to(device=device, dtype=torch.int32), thresholds.to(device))
        return self._gap_tables[key]

    def _device_stats_on(self, device: torch.device) -> torch.Tensor:
        """[kept, merged squared norm] of the sparse kernel, summed on the device between statistics reads."""
        if device not in self._device_stats:
            self._device_stats[device] = torch.zeros(2, dtype=torch.float64, device=device)
        return self._device_stats[device]

    def merge_sums(self, reset: bool = True) -> MergeStats:
        # The sparse kernel's counts join the engine's here: one host synchronisation per read.
        for device_stats in self._device_stats.values():
            kept, merged_sq = device_stats.tolist()
            self._stats.kept += int(kept)
            self._stats.merged_sq += merged_sq
            device_stats.zero_()
        return super().merge_sums(reset)


class _KernelHooks(MergeHooks):
    """What the fused kernels take over of one segment's merged step (see `MergeHooks`)."""

    def __init__(
        self,
        optimizer: FusedOnlineMergingAdamW,
        param: torch.Tensor,
        index: int,
        seg: Segment,
        step: int,
        plan: _TiesPlan | None,
        found: tuple[torch.Tensor, torch.Tensor] | None,
        margin: float,
        step_k_done: bool,
    ) -> None:
        self.optimizer, self.param, self.index, self.seg, self.step = optimizer, param, index, seg, step
        self.plan, self.found, self.margin = plan, found, margin
        self.step_k_done = step_k_done
        self.offered = False

    def top_k_candidates(self, k: int) -> Candidates | None:
        if self.plan is None or self.found is None:
            return None
        positions, count = self.found
        found = int(count.item())
        if found < k or found > self.plan.capacity:
            self.optimizer.kernel_counts["ties_too_few" if found < k else "ties_too_many"] += 1
            return None
        self.offered = True
        # Every position left out had kernel magnitude < cut, so engine magnitude < cut * (1 + margin).
        return Candidates(torch.sort(positions[:found]).values, self.plan.cut * (1.0 + self.margin))

    def top_k_selected(self, magnitude: torch.Tensor, k: int, from_candidates: bool) -> None:
        if from_candidates or self.offered:
            self.optimizer.kernel_counts["ties_fast" if from_candidates else "ties_margin"] += 1
        self.optimizer.predict_cut(self.param, self.index, magnitude, k)

    def add_dare_update(self, param: torch.Tensor, update: Update, weight: float, stats: MergeStats) -> bool:
        """The keep-mask drawn in the kernel; the kept count and norm summed on the device. Only
        Adam's own update (not step-K's update plus accumulator), without the L1 rescale."""
        config, coords = self.optimizer.merge_config, self.seg.coords
        if not isinstance(update, AdamUpdate) or not coords.is_contiguous or config.keep_rate >= 1.0 or config.l1_rescale:
            self.optimizer.kernel_counts["dare_torch"] += 1
            return False
        lo, hi = coords.global_span()
        self.optimizer._launch_dare_update(param, update, self.seg.name, lo, hi, self.step)
        self.optimizer.kernel_counts["dare_kernel"] += 1
        return True

    def add_dare_reference(self, param: torch.Tensor, reference: ReferenceDelta, weight: float, stats: MergeStats) -> bool:
        """With a fixed mask, weight * F(tau) is one fixed sparse vector: built once per reference
        delta (positions drawn on the device) and added with one index_add_."""
        config, seg = self.optimizer.merge_config, self.seg
        if config.reference_mask == "resampled":
            return False
        terms = self.optimizer._reference_terms.setdefault(self.param, {})
        if self.index not in terms or terms[self.index][0] is not reference:
            positions = reference_positions(config, seg.name, seg.coords, 0, param.device)
            step_reference = reference.values.to(param.device) * weight
            terms[self.index] = (reference, positions, step_reference, float(step_reference.double().square().sum()))
        _, positions, step_reference, reference_sq = terms[self.index]
        stats.reference_kept = positions.numel()
        stats.merged_sq = stats.merged_sq + reference_sq
        if param.dtype == step_reference.dtype:
            # One launch; positions are distinct, so each element gets exactly one rounded addition.
            param.index_add_(0, positions, step_reference)
        else:
            param[positions] += step_reference  # bf16 + fp32, rounded once to bf16, as the engine
        return True
