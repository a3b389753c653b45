"""FeatSharp (arXiv 2502.16025): a learned upsampler for the features of low-resolution teachers.

``FeatSharpUpsampler`` (upsampler.py) fuses a teacher's upsampled global view with its features on
native-size tiles and removes its fixed-pattern noise; ``featsharp_teacher_output`` (target.py) runs
teacher + upsampler as a high-resolution target; training.py trains one (``radio featsharp train``).
"""

from .target import FEATSHARP_FILE, featsharp_teacher_output, load_featsharp, resolve_featsharp_path, save_featsharp
from .upsampler import FeatSharpUpsampler, FusionBlock, JBULevel, LocalAttention, prime_factors

__all__ = [
    "FEATSHARP_FILE",
    "FeatSharpUpsampler",
    "FusionBlock",
    "JBULevel",
    "LocalAttention",
    "featsharp_teacher_output",
    "load_featsharp",
    "prime_factors",
    "resolve_featsharp_path",
    "save_featsharp",
]
