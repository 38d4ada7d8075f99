"""Parallel sizes that do not fit the number of processes: the error says both ways out, with the numbers."""

import os

import pytest

from onmerge_megatron.training.config import ConfigError, config_from_dict, load_config, validate

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs", "tiny_cpu_dpo.yaml")


def test_tensor_parallel_2_on_one_process_suggests_torchrun_or_tp1():
    with pytest.raises(ConfigError) as err:
        load_config(TINY, world_size=1, check_paths=False)
    assert str(err.value) == (
        "config keys 'parallel.tensor_parallel' x 'parallel.pipeline_parallel' = 2 x 1 = 2 does not divide the world "
        "size 1 (the number of processes). Start 2 processes (torchrun --nproc-per-node 2 -m "
        "onmerge_megatron.training.cli train --config CONFIG.yaml), or fit the sizes to 1 process(es) "
        "(--set parallel.tensor_parallel=1)")
    # Both suggestions are accepted.
    load_config(TINY, world_size=2, check_paths=False)
    assert load_config(TINY, ["parallel.tensor_parallel=1"], world_size=1, check_paths=False).parallel.tensor_parallel == 1


@pytest.mark.parametrize("tp,pp,world,nproc,fit", [
    (4, 2, 4, 8, "(--set parallel.pipeline_parallel=1)"),  # 4 x 1 divides 4
    (4, 1, 6, 8, "(--set parallel.tensor_parallel=2)"),  # gcd(4, 6) = 2; 8 is the next multiple of 4
    (2, 2, 3, 4, "(--set parallel.tensor_parallel=1 --set parallel.pipeline_parallel=1)"),
])
def test_suggested_sizes_divide_the_world_size(tp, pp, world, nproc, fit):
    tree = {"model": {"hf_path": "model"}, "data": {"train_files": ["train.jsonl"]},
            "parallel": {"tensor_parallel": tp, "pipeline_parallel": pp, "micro_batch_size": 1, "global_batch_size": 24}}
    with pytest.raises(ConfigError) as err:
        validate(config_from_dict(tree), world_size=world, check_paths=False)
    message = str(err.value)
    assert f"Start {nproc} processes (torchrun --nproc-per-node {nproc} " in message
    assert message.endswith(f"fit the sizes to {world} process(es) {fit}")
