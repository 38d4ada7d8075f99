"""What a result was computed on: the CPU model and the versions of the packages that compute it."""

from __future__ import annotations

import platform
from importlib import metadata


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what the platform module reports."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def package_versions(names: tuple[str, ...] = ("torch", "transformers", "lm_eval", "tokenizers", "datasets")) -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def machine_description() -> dict[str, str]:
    import os

    return {"cpu": cpu_model(), "cpu_count": str(os.cpu_count()), **package_versions()}
