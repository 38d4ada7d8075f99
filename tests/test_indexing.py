"""merging.indexing: the sparse helpers give exactly what the plain torch expressions give."""

from __future__ import annotations

import pytest
import torch

from onmerge_megatron.merging.indexing import add_at, gather, positions


def _values(dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(100_003, generator=gen).to(dtype)
    values[::97] = 0.25  # exact ties with a bound
    values[5] = float("nan")
    values[6] = float("inf")
    values[7] = -0.0
    return values


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("compare, expression", [("<", torch.lt), (">=", torch.ge), ("==", torch.eq)])
@pytest.mark.parametrize("bound", [0.25, 0.0, -1.5, 0.1])  # 0.1 is not representable: rounded as torch rounds it
def test_positions_equal_torch_nonzero(dtype, compare, expression, bound):
    values = _values(dtype)
    expected = torch.nonzero(expression(values, bound)).squeeze(1)
    got = positions(values, compare, bound)
    assert got.dtype == torch.int64 and torch.equal(got, expected)
    # Views and tensors that need grad go through torch's ops, with the same answer.
    assert torch.equal(positions(values[1000:5000], compare, bound), torch.nonzero(expression(values[1000:5000], bound)).squeeze(1))
    leaf = values.clone().requires_grad_(dtype.is_floating_point)
    assert torch.equal(positions(leaf, compare, bound), expected)


def test_positions_of_an_empty_tensor():
    assert positions(torch.empty(0), "<", 0.0).shape == (0,)


def test_gather_and_add_at_equal_indexing():
    gen = torch.Generator().manual_seed(1)
    target = torch.randn(5000, generator=gen)
    where = torch.randperm(5000, generator=gen)[:700].sort().values
    values = torch.randn(700, generator=gen)
    assert torch.equal(gather(target, where), target[where])
    expected = target.clone()
    expected[where] += values
    add_at(target, where, values)
    assert torch.equal(target, expected)
    # A wider value type is added in it and rounded once, as += does.
    half = torch.randn(5000, generator=gen).half()
    expected = half.clone()
    expected[where] += values
    add_at(half, where, values)
    assert torch.equal(half, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int64, torch.bfloat16])
def test_kth_smallest_equals_kthvalue(dtype):
    from onmerge_megatron.merging.indexing import kth_smallest

    gen = torch.Generator().manual_seed(2)
    values = (torch.randn(30_001, generator=gen) * 100).to(dtype)
    values[::7] = values[3]  # many ties
    for k in (1, 2, 15_000, 30_000, 30_001):
        got = kth_smallest(values, k)
        assert got.dtype == dtype and got.dim() == 0
        assert torch.equal(got, torch.kthvalue(values, k).values)
