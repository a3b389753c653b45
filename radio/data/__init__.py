"""Web-scale training data: webdataset tar shards (``radio.data.shards``), the trainer's step-indexed
loader over them (``radio.data.loader``) and ``radio data pack`` (``radio.data.pack``)."""

from .shards import ShardOrder, ShardStream, StreamState, expand_shards, read_samples

__all__ = ["ShardOrder", "ShardStream", "StreamState", "expand_shards", "read_samples"]
