"""The distillation trainer: ``radio train`` (see radio/train/loop.py for the loop, top to bottom)::

from radio.train import TrainConfig, train
cfg = TrainConfig()                      # the tiny demo; TrainConfig.preset("c-radiov4") for real scale
cfg.run.steps = 100
result = train(cfg)                      # writes cfg.run.out/{config.toml, metrics.jsonl, ...}
"""

from .config import TrainConfig, apply_overrides, load_config, save_config, valid_keys
from .export import export_run
from .loop import load_run_config, train

__all__ = [
    "TrainConfig",
    "apply_overrides",
    "export_run",
    "load_config",
    "load_run_config",
    "save_config",
    "train",
    "valid_keys",
]
