"""DPO, IPO, hinge and KTO training on megatron-core with online merging (OnDARE/OnTIES).

Entry points: `onmerge train --config FILE.yaml [--set key=value ...]` (cli.py), the tiny CPU
pipeline (tiny_pipeline.py), and `Trainer` (loop.py) for use from Python. Modules import
megatron-core lazily, so the losses, data and config code work without it.
"""

from .config import ConfigError, TrainConfig, load_config
from .losses import dpo_loss, hinge_loss, ipo_loss, kto_loss, sft_loss

__all__ = ["ConfigError", "TrainConfig", "load_config", "dpo_loss", "hinge_loss", "ipo_loss", "kto_loss", "sft_loss"]
