import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATA = os.path.join(ROOT, "data", "tiny")


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    """The tiny Llama + tokenizer of the CPU pipeline, in HF format (built once per session)."""
    from onmerge_megatron.training.tiny_pipeline import make_base

    out = tmp_path_factory.mktemp("tiny")
    return make_base(str(out), DATA)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_base):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_base)


@pytest.fixture(scope="session")
def tiny_other_base(tmp_path_factory, tiny_base):
    """Same architecture and tokenizer, different random weights: a stand-in 'base' for tau."""
    from onmerge_megatron.training.tiny_pipeline import make_base

    out = tmp_path_factory.mktemp("tiny_other")
    return make_base(str(out), DATA, seed=1)


@pytest.fixture()
def make_model_dir(tmp_path):
    """A factory of model directories holding only a small Llama config.json (what validation and
    the planner read): `make_model_dir(num_hidden_layers=2)` returns the directory's path."""

    def make(num_hidden_layers: int = 2) -> str:
        d = tmp_path / f"model_{num_hidden_layers}"
        d.mkdir(exist_ok=True)
        (d / "config.json").write_text(json.dumps(
            {"model_type": "llama", "num_hidden_layers": num_hidden_layers, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 384}))
        return str(d)

    return make
