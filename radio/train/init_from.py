"""``student.init_from``: continue distilling from released (or earlier) weights.

``init_from`` is an NVlabs/RADIO checkpoint file (``RadioModel.from_radio_checkpoint``, EMA weights,
float32) or a folder, which is always handed to ``RadioModel.from_pretrained`` (so any folder format
it reads is accepted). The student then is that model:

- the backbone: architecture and weights (``student.preset`` is ignored; ``student.model`` may
  change fields that leave the weights' shapes alone, e.g. ``window_size``);
- per enabled teacher, in the trainer's order: the source head named ``teachers.<t>.init_head`` (by
  default the head named like the teacher) when there is one, renamed to the teacher, keeping the
  CLS token it reads; its summary head is kept when the teacher has a summary loss and dropped when
  not, and a new one is built when the source head has none. The head's widths must match the
  teacher's. A teacher without a source head (or with ``init_head = ""``) gets a new head (random,
  as a fresh run's) reading a CLS token no loaded head uses; when every CLS token is taken, the
  first register becomes one (the prefix tokens, and so the backbone's outputs, are unchanged);
- the output feature normaliser of a released checkpoint (``_feature_normalizer``) is kept as it is,
  a fixed buffer that does not train: the patch features, and so the adaptor feature heads and the
  MESA target, keep reading whitened patch tokens, and the student at step 0 computes exactly what
  ``from_radio_checkpoint`` does. The per-block intermediate normaliser is kept too (it only affects
  ``forward_intermediates``).

The EMA copy starts from these weights (the trainer copies the student). ``init_from`` is stored
as an absolute path in the run's config.toml, which so records where the weights came from; a
resumed run reads it again for the architecture, then loads its own checkpoint.
"""

from __future__ import annotations

import os

import torch

from radio.model import AdaptorSpec, RadioModel

from .config import TrainConfig
from .teaching import TeacherSlot

__all__ = ["init_student", "load_source_model"]


def load_source_model(path: str | os.PathLike) -> RadioModel:
    """The model in ``path``: a folder via ``RadioModel.from_pretrained``, a file via ``from_radio_checkpoint``."""
    if os.path.isdir(path):
        model = RadioModel.from_pretrained(path)
    elif os.path.isfile(path):
        model = RadioModel.from_radio_checkpoint(path, dtype=torch.float32)
    else:
        raise ValueError(
            f"student.init_from={str(path)!r} does not exist (expected an NVlabs/RADIO checkpoint file "
            "or a RadioModel.from_pretrained folder)"
        )
    return model.float()


def _source_head(name: str, slot: TeacherSlot, source: RadioModel) -> AdaptorSpec | None:
    wanted = slot.cfg.init_head
    specs = {s.name: s for s in source.adaptor_specs}
    if wanted == "":
        return None
    if wanted is None:
        return specs.get(name)
    if wanted not in specs:
        raise ValueError(f"teachers.{name}.init_head={wanted!r}: the source model has heads {sorted(specs)}")
    return specs[wanted]


def _check_head(name: str, src: AdaptorSpec, slot: TeacherSlot) -> None:
    teacher = slot.teacher
    hint = f'set teachers.{name}.init_head to another head, or to "" for a new one'
    if src.feature_dim != teacher.feature_dim:
        raise ValueError(
            f"teachers.{name}: source head {src.name!r} emits {src.feature_dim} feature channels, the teacher "
            f"has {teacher.feature_dim}; {hint}"
        )
    if src.upsample_factor != 1:
        raise ValueError(
            f"teachers.{name}: source head {src.name!r} upsamples its features x{src.upsample_factor}; the "
            f"trainer matches student and teacher tokens at the same pitch; {hint}"
        )
    if slot.has_summary and src.summary_dim is not None and src.summary_dim != teacher.summary_dim:
        raise ValueError(
            f"teachers.{name}: source head {src.name!r} has a {src.summary_dim}-wide summary, the teacher "
            f"{teacher.summary_dim}; {hint}"
        )


def init_student(cfg: TrainConfig, slots: dict[str, TeacherSlot]) -> RadioModel:
    """The student built from ``cfg.student.init_from`` for the teachers ``slots`` (module docstring)."""
    path = os.path.abspath(os.fspath(cfg.student.init_from))
    source = load_source_model(path)
    cfg.student.init_from = path  # the run's config.toml records the absolute source
    config = source.config.replace(**cfg.student.model)

    loaded: dict[str, AdaptorSpec] = {}  # teacher -> source head
    for name, slot in slots.items():
        src = _source_head(name, slot, source)
        if src is not None:
            _check_head(name, src, slot)
            loaded[name] = src
    used = {s.cls_index for s in loaded.values()}
    num_cls, num_registers = config.num_cls_tokens, config.num_registers
    specs = []
    for name, slot in slots.items():
        summary_dim = slot.teacher.summary_dim if slot.has_summary else None
        src = loaded.get(name)
        if src is not None:
            fields = {**src.to_dict(), "name": name, "summary_dim": summary_dim}
            if src.summary_dim is None and summary_dim is not None:
                # A new summary head of default widths; pin the loaded feature head's own widths.
                fields.update(
                    hidden_dim=None,
                    num_inner=AdaptorSpec("x", None, 1).num_inner,
                    feature_hidden_dim=src.feature_hidden_dim or src.hidden_dim or config.embed_dim,
                    feature_num_inner=_feature_num_inner(src),
                )
            specs.append(AdaptorSpec.from_dict(fields))
            continue
        free = [i for i in range(num_cls) if i not in used]
        if not free:
            if num_registers == 0:
                raise ValueError(
                    f"teachers.{name} needs a new head, but every CLS token of the source model is taken by a "
                    "loaded head and it has no register to turn into one"
                )
            num_cls, num_registers = num_cls + 1, num_registers - 1  # the first register becomes a CLS token
            free = [num_cls - 1]
        used.add(free[0])
        specs.append(AdaptorSpec(name, summary_dim, slot.teacher.feature_dim, head=slot.cfg.head, cls_index=free[0]))
    config = config.replace(num_cls_tokens=num_cls, num_registers=num_registers)
    model = RadioModel(config, specs)  # new heads are initialised here, from the run's seed

    # Backbone and normalisers as they are; loaded heads renamed from their source names.
    source_state = source.state_dict()
    state = {k: v for k, v in source_state.items() if not k.startswith("adaptors.")}
    for name, src in loaded.items():
        prefix = f"adaptors.{src.name}."
        for k, v in source_state.items():
            if k.startswith(prefix):
                part = k[len(prefix) :]
                if part.startswith("summary_head.") and not slots[name].has_summary:
                    continue  # the teacher has no summary loss: its summary head is dropped
                state[f"adaptors.{name}.{part}"] = v
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches, e.g. from student.model overrides
        raise ValueError(
            f"student.init_from: the weights do not fit the student (student.model={cfg.student.model}): {e}"
        ) from e
    if result.unexpected_keys:
        raise ValueError(f"student.init_from: weights the student has no place for: {result.unexpected_keys[:8]}")
    new = [f"adaptors.{n}." for n in slots if n not in loaded]
    new += [f"adaptors.{n}.summary_head." for n, src in loaded.items() if src.summary_dim is None]
    missing = [k for k in result.missing_keys if not k.startswith(tuple(new))]
    if missing:
        raise ValueError(f"student.init_from: the source lacks weights for {missing[:8]}")
    return model


def _feature_num_inner(spec: AdaptorSpec) -> int:
    """The residual blocks of a spec's spatial MLP2 (AdaptorSpec's default rule spelled out)."""
    if spec.feature_num_inner is not None:
        return spec.feature_num_inner
    return spec.num_inner if spec.head == "mlp" else 0
