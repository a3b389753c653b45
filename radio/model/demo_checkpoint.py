"""A tiny random checkpoint in the layout NVlabs/RADIO releases (``*.pth.tar``), for demos and tests.

    python -m radio.model.demo_checkpoint tiny-c-radio.pth.tar [--teachers siglip2:32:32,dinov3:32:32]

writes ``{"args": {...}, "state_dict": ..., "state_dict_ema": ...}`` with the training-layout keys
(``base_model.*``, ``input_conditioner.*``, ``_heads.<i>.*``, ``_feature_projections.<i>.*``,
``_feature_normalizer.*``, LayerScale under RADIO's ``grandma`` name) that
``RadioModel.from_radio_checkpoint`` and ``radio train --set student.init_from=...`` read. The weights
are random; the architecture is the "tiny" preset (no final norm, as the released models). Each
teacher ``name:summary_dim:feature_dim`` gets an MLP2 summary head (none when summary_dim is 0) and
an MLP2 spatial head; the defaults match the tiny SigLIP2 and DINOv3 teachers of ``radio train``.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from .config import AdaptorSpec, RadioConfig
from .model import RadioModel

__all__ = ["demo_checkpoint", "write_demo_checkpoint"]

DEFAULT_TEACHERS = (("siglip2", 32, 32), ("dinov3", 32, 32))


def demo_checkpoint(teachers=DEFAULT_TEACHERS, seed: int = 0) -> dict:
    """The checkpoint dict (module docstring); ``teachers``: (name, summary_dim or 0, feature_dim) triples."""
    gen = torch.Generator().manual_seed(seed)
    specs = [AdaptorSpec(n, s or None, f, cls_index=i) for i, (n, s, f) in enumerate(teachers)]
    config = RadioConfig.preset(
        "tiny",
        final_norm=False,
        num_cls_tokens=len(specs),
        num_registers=10 - len(specs),
        summary_idxs=[i for i, (_, s, _) in enumerate(teachers) if s] or [0],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = RadioModel(config, specs)
    sd = model.state_dict()
    state = {
        "base_model.patch_generator.embedder.weight": sd["patch_embed.proj.weight"],
        "base_model.patch_generator.pos_embed": sd["cpe.pos_embed"],
        "base_model.patch_generator.cls_token.token": sd["prefix_tokens"],
        "input_conditioner.norm_mean": sd["input_norm.mean"].reshape(3, 1, 1),
        "input_conditioner.norm_std": sd["input_norm.std"].reshape(3, 1, 1),
    }
    for k, v in sd.items():
        if k.startswith("blocks."):
            state["base_model." + k.replace(".gamma", ".grandma")] = v
    for i, spec in enumerate(specs):
        for part, target in (("summary_head.", "_heads"), ("feature_head.", "_feature_projections")):
            prefix = f"adaptors.{spec.name}.{part}"
            state.update({f"{target}.{i}.{k[len(prefix) :]}": v for k, v in sd.items() if k.startswith(prefix)})
    D = config.embed_dim  # a non-trivial output feature normaliser, as the released C-RADIO models have
    state["_feature_normalizer.mean"] = torch.randn(D, generator=gen) * 0.1
    state["_feature_normalizer.tx"] = torch.eye(D) + torch.randn(D, D, generator=gen) * 0.05
    args = {
        "model": "vit_tiny_demo",
        "model_kwargs": {"num_heads": config.num_heads},
        "teachers": [{"name": n, "type": n, "use_summary": bool(s)} for n, s, _ in teachers],
        "cpe_max_size": config.cpe_max_size,
        "cls_token_per_teacher": True,
        "register_multiple": 10,
    }
    state = {k: v.clone() for k, v in state.items()}
    return {"args": args, "state_dict": state, "state_dict_ema": state}


def write_demo_checkpoint(path: str | os.PathLike, teachers=DEFAULT_TEACHERS, seed: int = 0) -> str:
    torch.save(demo_checkpoint(teachers, seed), path)
    return os.fspath(path)


def _parse_teachers(text: str):
    out = []
    for item in text.split(","):
        parts = item.split(":")
        if len(parts) != 3 or not parts[0] or not parts[1].isdigit() or not parts[2].isdigit() or parts[2] == "0":
            raise ValueError(
                f"--teachers items must be name:summary_dim:feature_dim (summary_dim 0 = none), got {item!r}"
            )
        out.append((parts[0], int(parts[1]), int(parts[2])))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m radio.model.demo_checkpoint", description=__doc__.split("\n")[0])
    p.add_argument("path", help="output file, e.g. tiny-c-radio.pth.tar")
    p.add_argument("--teachers", default=",".join(f"{n}:{s}:{f}" for n, s, f in DEFAULT_TEACHERS))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        teachers = _parse_teachers(args.teachers)
    except ValueError as e:
        p.error(str(e))
    print(write_demo_checkpoint(args.path, teachers, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
