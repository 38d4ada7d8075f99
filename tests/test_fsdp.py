"""FSDP2 (fully_shard, DTensor parameters) on 2 gloo processes equals a single process bit for bit."""

import pytest
import torch

from onmerge_megatron import OnlineMergeConfig, OnlineMergingAdamW

from distributed import run_distributed, torch_threads

CASES = {
    "ties-per-tensor": dict(method="ties", keep_rate=0.1, alpha=0.3, ties_scope="tensor"),
    "dare-K2": dict(method="dare", keep_rate=0.1, alpha=0.3, merge_every=2),
}
STEPS = 4


def make_model(offset=0.0):
    torch.manual_seed(0)
    # The last layer has one row: on 2 ranks one holds all of it and the other an empty shard.
    model = torch.nn.Sequential(torch.nn.Linear(33, 64), torch.nn.Tanh(), torch.nn.Linear(64, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(offset)
    return model


def train(model, config_dict):
    opt = OnlineMergingAdamW(model.named_parameters(), lr=1e-2, merge=OnlineMergeConfig(**config_dict))
    opt.set_reference_delta(reference=make_model(), base=make_model(offset=0.01))
    for step in range(STEPS):
        # The same batch on every rank, so FSDP's gradient average is exactly the single-process gradient.
        x = torch.randn(8, 33, generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    return model


def _fsdp_run(rank, world, cases):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    results = {}
    for case, config_dict in cases.items():
        model = make_model()
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        train(model, config_dict)
        results[case] = {n: p.full_tensor().detach() for n, p in model.named_parameters()}
    return results


@pytest.fixture(scope="module")
def fsdp_results():
    return run_distributed(_fsdp_run, 2, CASES)


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_fsdp2_equals_single_process(case, fsdp_results):
    with torch_threads():  # the ranks' count, for the same matmul bits
        single = train(make_model(), CASES[case])
    for rank_result in fsdp_results:
        for n, p in single.named_parameters():
            assert torch.equal(rank_result[case][n], p.detach()), n
