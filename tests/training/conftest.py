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
