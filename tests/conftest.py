import sys
from pathlib import Path

import pytest

# The multi-process harness (distributed.py) is imported by plain name from every test folder, and
# the ranks it spawns inherit this sys.path.
TESTS = str(Path(__file__).resolve().parent)
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: multi-process or long-running test (run in CI, skip with -m 'not slow')")
