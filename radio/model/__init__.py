"""The student ViT: configuration, layers, ViTDet runner, adaptor heads and checkpoint I/O."""

from .config import AdaptorSpec, RadioConfig
from .model import RadioModel, RadioOutput, Resolution

__all__ = ["AdaptorSpec", "RadioConfig", "RadioModel", "RadioOutput", "Resolution"]
