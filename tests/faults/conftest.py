"""Faulty inputs. The tiny HF models come from the training tests' fixtures and the megatron-core
runs from the Megatron tests' harness: their folders go on sys.path (spawned ranks import jobs
from there) and the fixtures are imported from tests/training/conftest.py."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent
for folder in ("training", "megatron"):
    if str(TESTS / folder) not in sys.path:
        sys.path.insert(0, str(TESTS / folder))

# Loaded under a name of its own: every conftest.py is a module named "conftest".
_spec = importlib.util.spec_from_file_location("training_fixtures", TESTS / "training" / "conftest.py")
_training = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_training)
tiny_base = _training.tiny_base
tiny_other_base = _training.tiny_other_base
tiny_tokenizer = _training.tiny_tokenizer
