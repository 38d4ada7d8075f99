import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: multi-process or long-running test (run in CI, skip with -m 'not slow')")
