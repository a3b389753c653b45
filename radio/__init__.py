"""C-RADIOv4-style agglomerative vision backbones: the student model and its training pieces.

Only the student model's public types are imported here; ``radio.teachers``, ``radio.normalize`` and
``radio.train`` are imported explicitly by who needs them (they pull in heavier dependencies).
"""

from .model import AdaptorSpec, RadioConfig, RadioModel, RadioOutput

__all__ = ["AdaptorSpec", "RadioConfig", "RadioModel", "RadioOutput"]
