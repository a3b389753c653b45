"""``radio train --dry-run``: what a run costs per rank, before a single weight is loaded.

The teachers (from their ``config.json`` only, or the tiny configs) and the student are built on
PyTorch's ``meta`` device: shapes without storage. On them:

* parameter counts are exact (the same modules the trainer builds);
* FLOPs per image are counted with ``torch.utils.flop_counter.FlopCounterMode`` on a meta forward
  (and, for the student, backward) of the very views the run plans (tiles, mosaics, resized
  canvases): matmul / convolution / attention FLOPs, elementwise work not counted. Attention is
  counted as a flash-style kernel runs it (forward 2 matmuls; backward recomputes the scores:
  5 matmuls), which is what the fused kernels do on GPU;
* student activation memory is the bytes autograd saves for backward in a meta forward (flash-style
  attention saves q, k, v, the output and the log-sum-exp, no N x N matrix), per sample, at every
  resolution; with activation checkpointing a block keeps only its input, plus one block's saved
  tensors during its recompute.

Per-rank memory (bytes) for world size W, P = student parameters (adaptors included)::

    DDP:  weights 4P + gradients 4P + AdamW 8P + EMA 4P + DDP gradient buckets 4P
    FSDP: the same four / W, plus the unsharded working set of 2 blocks (gather + prefetch, weights
          and gradients); no buckets
    both: teachers (parameters x their dtype, and PHI-S / dispersion buffers), replicated
          activations: local micro-batch (data.batch_size / W) x saved bytes per sample

Counted in float32; with ``run.amp`` bf16 autocast the activations are roughly halved (the row says
so). Not counted: teacher inference intermediates (transient), the CUDA context and allocator slack.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from .build import build_student
from .config import TrainConfig
from .teaching import _DTYPES, TeacherSlot, plan_all_views, run_teacher

__all__ = ["RunPlan", "format_plan", "meta_teacher", "plan_run"]


# ----------------------------------------------------------------------------------------------
# models on the meta device
# ----------------------------------------------------------------------------------------------


def meta_teacher(kind: str, name_or_path: str | None, dtype: torch.dtype, seed: int = 0):
    """The teacher ``load_teacher`` / ``tiny_teacher`` would build, on the meta device (config only)."""
    from transformers import AutoConfig, DINOv3ViTModel, SiglipVisionModel
    from transformers.models.sam3.modeling_sam3 import Sam3ViTModel
    from transformers.models.siglip2.modeling_siglip2 import Siglip2VisionModel

    from radio.teachers.dinov3 import DINOv3Teacher
    from radio.teachers.loading import _DEFAULT_NORM, _SIGLIP_FIXED, _SIGLIP_NAFLEX, _sam3_vit_config, _tiny_config
    from radio.teachers.sam3 import Sam3Teacher
    from radio.teachers.siglip2 import Siglip2NaFlexTeacher, SiglipTeacher

    if name_or_path is None:
        config = _tiny_config(kind, naflex=False)
        mtype = {"siglip2": "siglip_vision_model", "dinov3": "dinov3_vit", "sam3": "sam3_vit_model"}[kind]
    else:
        config = AutoConfig.from_pretrained(name_or_path)  # config.json only: no weights are read
        mtype = config.model_type
    if kind == "siglip2" and mtype in _SIGLIP_FIXED | _SIGLIP_NAFLEX:
        naflex = mtype in _SIGLIP_NAFLEX
        config = getattr(config, "vision_config", None) or config
        model_cls, teacher_cls = (
            (Siglip2VisionModel, Siglip2NaFlexTeacher) if naflex else (SiglipVisionModel, SiglipTeacher)
        )
    elif kind == "dinov3" and mtype == "dinov3_vit":
        model_cls, teacher_cls = DINOv3ViTModel, DINOv3Teacher
    elif kind == "sam3" and mtype.startswith("sam3"):
        config, model_cls, teacher_cls = _sam3_vit_config(config), Sam3ViTModel, Sam3Teacher
    else:
        raise ValueError(f"--dry-run: {name_or_path!r} has model_type {mtype!r}, not a {kind} model")
    with torch.device("meta"):
        model = model_cls(config)
    mean, std = _DEFAULT_NORM[kind]
    return teacher_cls(model, name=str(name_or_path or f"tiny-{kind}"), mean=mean, std=std, dtype=dtype)


def _meta_models(cfg: TrainConfig):
    slots = {}
    for name, t in cfg.enabled_teachers().items():
        teacher = meta_teacher(t.kind, t.name_or_path, _DTYPES[t.dtype], t.seed)
        with torch.device("meta"):
            slots[name] = TeacherSlot(name, t, teacher, cfg)
    with torch.device("meta"):
        student = build_student(cfg, slots)
    return slots, student


# ----------------------------------------------------------------------------------------------
# flash-style attention for counting (meta tensors have no fused kernel)
# ----------------------------------------------------------------------------------------------


class _FlashStyleAttention(torch.autograd.Function):
    """softmax(q k^T s) v that saves what a flash kernel saves and recomputes the scores in backward."""

    @staticmethod
    def forward(ctx, q, k, v, scale):
        scores = (q @ k.transpose(-2, -1)) * scale
        lse = torch.logsumexp(scores.float(), dim=-1, keepdim=True)
        out = (torch.exp(scores.float() - lse).to(q.dtype)) @ v
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse = ctx.saved_tensors
        p = torch.exp((q @ k.transpose(-2, -1)).float() * ctx.scale - lse).to(q.dtype)
        dv = p.transpose(-2, -1) @ grad
        dp = grad @ v.transpose(-2, -1)
        ds = p * (dp - (grad * out).sum(-1, keepdim=True)) * ctx.scale
        return ds @ k, ds.transpose(-2, -1) @ q, dv, None


@contextlib.contextmanager
def _flash_style_sdpa():
    original = F.scaled_dot_product_attention

    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if attn_mask is not None or is_causal or dropout_p:
            return original(q, k, v, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
        if k.shape[-3] != q.shape[-3]:  # grouped-query attention
            k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
            v = v.repeat_interleave(q.shape[-3] // v.shape[-3], dim=-3)
        return _FlashStyleAttention.apply(q, k, v, q.shape[-1] ** -0.5 if scale is None else scale)

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


# ----------------------------------------------------------------------------------------------
# counting
# ----------------------------------------------------------------------------------------------


def _student_loss(out) -> torch.Tensor:
    terms = [o.features.sum() + (o.summary.sum() if o.summary is not None else 0) for o in out.values()]
    return sum(terms)


def student_cost(student, resolution: int) -> dict:
    """Per image at ``resolution``: training FLOPs (forward + backward), EMA forward FLOPs, saved bytes
    without and with activation checkpointing."""
    student.train()
    x = torch.zeros(1, 3, resolution, resolution, device="meta")
    params = {p.untyped_storage()._cdata for p in student.parameters()}
    saved: dict[int, tuple[int, int]] = {}  # storage -> (bytes, block index or -1)
    inputs: list[int] = []
    current = [-1]

    def pack(t):
        s = t.untyped_storage()
        if s._cdata not in params and s._cdata not in saved:
            saved[s._cdata] = (s.nbytes(), current[0])
        return t

    def enter(index):
        def hook(module, args):
            current[0] = index
            inputs.append(args[0].nbytes)  # what a checkpointed block keeps

        return hook

    def leave(module, args, output):
        current[0] = -1

    hooks = []
    for i, block in enumerate(student.blocks):
        hooks += [block.register_forward_pre_hook(enter(i)), block.register_forward_hook(leave)]
    try:
        with _flash_style_sdpa(), FlopCounterMode(display=False) as counter:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = student(x, feature_fmt="NHWC")  # meta: CPE draws need no values
            forward = counter.get_total_flops()
            _student_loss(out).backward()
        train_flops = counter.get_total_flops()
        with torch.no_grad(), _flash_style_sdpa(), FlopCounterMode(display=False) as counter:
            student.eval()
            student.forward_features(x)
        ema_flops = counter.get_total_flops()
    finally:
        for h in hooks:
            h.remove()
        student.train()
        student.zero_grad(set_to_none=True)
    per_block = [0] * len(student.blocks)
    outside = 0
    for nbytes, block in saved.values():
        if block < 0:
            outside += nbytes
        else:
            per_block[block] += nbytes
    full = outside + sum(per_block)
    checkpointed = outside + sum(inputs) + max(per_block, default=0)
    return {
        "forward_flops": forward,
        "train_flops": train_flops,
        "ema_flops": ema_flops,
        "activation_bytes": full,
        "activation_bytes_checkpointed": checkpointed,
    }


def teacher_flops(slot: TeacherSlot, plan, batch: int) -> float:
    """FLOPs per image of one teacher on ``batch`` views of ``plan`` (mosaics pack the batch together)."""
    x = torch.zeros(batch, 3, plan.crop, plan.crop, device="meta")
    with torch.no_grad(), _flash_style_sdpa(), FlopCounterMode(display=False) as counter:
        run_teacher(slot.teacher, x, plan)
    return counter.get_total_flops() / batch


# ----------------------------------------------------------------------------------------------
# the plan
# ----------------------------------------------------------------------------------------------


@dataclass
class RunPlan:
    world_size: int
    local_batch: int
    student_params: int
    largest_block_params: int
    teacher_params: dict[str, int]
    teacher_bytes: dict[str, int]
    memory: dict[str, dict[str, float]]  # "ddp" / "fsdp" -> component -> bytes per rank
    resolutions: list[dict] = field(default_factory=list)  # one row per (partition, resolution)
    amp_bf16: bool = False
    mean_flops_per_image: float = 0.0


def plan_run(cfg: TrainConfig, world_size: int = 1) -> RunPlan:
    """Everything ``--dry-run`` prints, computed on the meta device (module docstring)."""
    cfg.validate()
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"--world-size must be a positive int, got {world_size!r}")
    if cfg.data.batch_size % world_size:
        raise ValueError(f"data.batch_size={cfg.data.batch_size} must be divisible by the world size {world_size}")
    slots, student = _meta_models(cfg)
    plans, _ = plan_all_views(cfg, slots, student.patch_size, student.min_resolution_step)
    local = cfg.data.batch_size // world_size

    P = sum(p.numel() for p in student.parameters())
    block = max(sum(p.numel() for p in b.parameters()) for b in student.blocks)
    teacher_params = {n: sum(p.numel() for p in s.teacher.parameters()) for n, s in slots.items()}
    teacher_bytes = {
        n: sum(t.numel() * t.element_size() for t in [*s.parameters(), *s.buffers()]) for n, s in slots.items()
    }
    W = world_size
    replicated = {"teachers": float(sum(teacher_bytes.values()))}
    memory = {
        "ddp": {"weights": 4.0 * P, "gradients": 4.0 * P, "adamw": 8.0 * P, "ema": 4.0 * P, "buckets": 4.0 * P}
        | replicated,
        "fsdp": {"weights": 4.0 * P / W, "gradients": 4.0 * P / W, "adamw": 8.0 * P / W, "ema": 4.0 * P / W}
        | {"unsharded blocks": 2 * 2 * 4.0 * block}
        | replicated,
    }
    cuda = cfg.run.device == "cuda" or (cfg.run.device == "auto" and torch.cuda.is_available())
    amp = cfg.run.amp == "bf16" or (cfg.run.amp == "auto" and cuda)  # as the trainer decides
    scale = 0.5 if amp else 1.0
    rows = []
    for (partition, res), teacher_plans in plans.items():
        cost = student_cost(student, res)
        teachers = {n: teacher_flops(slots[n], teacher_plans[n], local) for n in slots}
        rows.append(
            {
                "partition": partition,
                "resolution": res,
                **cost,
                "teacher_flops": teachers,
                "modes": {n: p.mode for n, p in teacher_plans.items()},
                "activations": local * cost["activation_bytes"] * scale,
                "activations_checkpointed": local * cost["activation_bytes_checkpointed"] * scale,
                "flops_per_image": cost["train_flops"] + cost["ema_flops"] + sum(teachers.values()),
            }
        )
    d = cfg.data
    mean = 0.0
    for partition, prob in (("low", 1 - d.high_prob), ("high", d.high_prob)):
        part = [r["flops_per_image"] for r in rows if r["partition"] == partition]
        if part and prob > 0:
            mean += prob * sum(part) / len(part)
    return RunPlan(W, local, P, block, teacher_params, teacher_bytes, memory, rows, amp, mean)


def _gib(x: float) -> str:
    return f"{x / 2**30:.3f} GiB" if x >= 2**24 else f"{x / 2**20:.2f} MiB"


def _flops(x: float) -> str:
    for unit, scale in (("EFLOP", 1e18), ("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if x >= scale:
            return f"{x / scale:.2f} {unit}"
    return f"{x:.0f} FLOP"


def format_plan(plan: RunPlan, cfg: TrainConfig) -> str:
    """The human-readable report ``radio train --dry-run`` prints."""
    lines = [f"dry run: world size {plan.world_size}, local micro-batch {plan.local_batch} (no weights loaded)"]
    lines.append("")
    lines.append("parameters")
    lines.append(f"  student (with adaptors)  {plan.student_params:>16,}")
    for n, count in plan.teacher_params.items():
        t = cfg.teachers[n]
        lines.append(f"  teacher {n:<16} {count:>16,}   ({t.dtype}, {t.name_or_path or 'tiny, random'})")
    lines.append("")
    lines.append(f"memory per rank (float32 training state; teachers in their dtype; W = {plan.world_size})")
    lines.append(f"  {'':<20} {'DDP':>14} {'FSDP':>14}")
    keys = list(dict.fromkeys([*plan.memory["ddp"], *plan.memory["fsdp"]]))
    for k in keys:
        a, b = plan.memory["ddp"].get(k), plan.memory["fsdp"].get(k)
        lines.append(f"  {k:<20} {_gib(a) if a is not None else '-':>14} {_gib(b) if b is not None else '-':>14}")
    for k in ("ddp", "fsdp"):
        plan_total = sum(plan.memory[k].values())
        lines.append(f"  total {k.upper()} before activations: {_gib(plan_total)}")
    note = " (bf16 autocast: float32 count x 0.5, approximate)" if plan.amp_bf16 else ""
    lines.append("")
    lines.append(f"activations per rank for the local micro-batch{note}, and FLOPs per image")
    head = f"  {'res':>6} {'part':<5} {'activations':>13} {'checkpointed':>13} {'student f+b':>13} {'EMA fwd':>12}"
    teachers = list(plan.teacher_params)
    head += "".join(f" {n:>14}" for n in teachers) + f" {'total':>13}"
    lines.append(head)
    for r in plan.resolutions:
        row = (
            f"  {r['resolution']:>6} {r['partition']:<5} {_gib(r['activations']):>13} "
            f"{_gib(r['activations_checkpointed']):>13} {_flops(r['train_flops']):>13} {_flops(r['ema_flops']):>12}"
        )
        row += "".join(f" {_flops(r['teacher_flops'][n]) + ' ' + r['modes'][n][0]:>14}" for n in teachers)
        lines.append(row + f" {_flops(r['flops_per_image']):>13}")
    lines.append("  (teacher view mode: p plain, t tile, m mosaic, r resize)")
    d, accum = cfg.data, cfg.optim.accum_steps
    per_step = plan.mean_flops_per_image * d.batch_size * accum
    lines.append("")
    lines.append(
        f"mean over the resolution mix (high_prob {d.high_prob}): {_flops(plan.mean_flops_per_image)} per image, "
        f"{_flops(per_step)} per optimizer step ({d.batch_size} x {accum} images, all ranks), "
        f"{_flops(per_step * cfg.run.steps)} for {cfg.run.steps} steps"
    )
    if math.isfinite(per_step) and plan.world_size > 1:
        lines.append(f"  per rank per step: {_flops(per_step / plan.world_size)}")
    return "\n".join(lines)
