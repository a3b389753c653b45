"""Frozen teacher encoders (SigLIP2, DINOv3, SAM3) behind one interface, plus tiling and mosaics.

``teacher(images)`` with images (B, 3, H, W) in [0, 1] returns
``TeacherOutput(summary (B, Cs) | None, features (B, h, w, Cf))``.
"""

from .base import Teacher, TeacherOutput
from .dinov3 import DINOv3Teacher
from .loading import TEACHER_KINDS, load_teacher, tiny_teacher
from .mosaic import Placement, mosaic_features, plan_mosaic
from .sam3 import Sam3Teacher
from .siglip2 import Siglip2NaFlexTeacher, SiglipTeacher
from .tiling import native_size, tiled_features, tiled_teacher_output, tiles_for

__all__ = [
    "TEACHER_KINDS",
    "DINOv3Teacher",
    "Placement",
    "Sam3Teacher",
    "Siglip2NaFlexTeacher",
    "SiglipTeacher",
    "Teacher",
    "TeacherOutput",
    "load_teacher",
    "mosaic_features",
    "native_size",
    "plan_mosaic",
    "tiled_features",
    "tiled_teacher_output",
    "tiles_for",
    "tiny_teacher",
]
