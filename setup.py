from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="onmerge_megatron",
    version="0.1.0",
    description="Online merging optimizers (OnDARE, OnTIES, step-K) for Megatron-core, DeepSpeed and PyTorch",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8") if Path(__file__).with_name("README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["onmerge_megatron", "onmerge_megatron.*"]),
    install_requires=["torch>=2.4", "numpy", "pyyaml", "tqdm"],
    extras_require={
        "megatron": [
            "megatron-core>=0.14,<0.20",
            "transformers>=4.56.2,<5",
            "mbridge>=0.15.1,<0.16",
            "sentencepiece",
            "safetensors",
            "pyarrow",
            "psutil",  # dist_checkpointing needs it; megatron-core does not declare it
            "tensorboard",
            "matplotlib",
            "pydantic>=2",  # the trainer's YAML type checks (training/config.py)
            "six",  # Megatron-LM's megatron.training imports it (tests/megatron/test_megatron_lm.py)
        ],
        "deepspeed": ["deepspeed>=0.16", "transformers>=4.56.2,<5", "accelerate>=1.0", "trl>=1.0", "safetensors"],
        "kernels": ["triton>=3.0"],
        # `onmerge eval` and the CPU study's scoring (docs/eval.md); scipy for the study's t intervals.
        "eval": ["lm-eval>=0.4.9,<0.5", "transformers>=4.56.2,<5", "matplotlib", "scipy"],
        "dev": ["pytest>=8", "pytest-timeout"],
    },
    entry_points={"console_scripts": ["onmerge=onmerge_megatron.training.cli:main"]},
)
