"""The distillation trainer: ``radio train`` (radio/train/loop.py reads top to bottom).

From Python::

    from radio.train import TrainConfig, train
    cfg = TrainConfig()                      # the tiny demo; TrainConfig.preset("c-radiov4") for real scale
    cfg.run.steps = 100
    result = train(cfg)                      # writes cfg.run.out/{config.toml, metrics.jsonl, ...}

Training on your own images: ``--set data.image_dir=/data/images`` (recursive; jpg, jpeg, png,
webp; unreadable or tiny files are skipped and counted). ``data.holdout`` images are kept out for
the fidelity measurement.

Real teachers: every ``teachers.<name>`` has ``kind`` (siglip2 | dinov3 | sam3, or hf | timm for any
``transformers`` / ``timm`` vision model, radio.teachers.generic) and ``name_or_path`` (a Hugging Face
hub name, or a local folder when offline; none = the tiny random teacher). ``--preset c-radiov4`` sets
google/siglip2-giant-opt-patch16-384, facebook/dinov3-vit7b16-pretrain-lvd1689m and facebook/sam3 in
bfloat16, the SO400M student, resolutions {128..432} / {512..1152}, batch 1024, EMA decay 0.9996 and
the PHI-S schedule of METHOD.md. Multi-GPU: ``torchrun --nproc-per-node N -m radio train ...`` (the batch is global).

Modules: config (dataclass tree, TOML, --set), data (views and step-indexed sampling), align
(view geometry and student/teacher alignment), teaching (teachers, view plans), step (losses),
damp, build (student, AdamW, schedule, EMA), init_from (start from released weights), adapt (freeze,
LoRA), loop, checkpoint, fidelity, plots, export, distributed.
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
