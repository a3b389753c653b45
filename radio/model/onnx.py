"""ONNX export of a RadioModel for inference runtimes (checked with onnxruntime; TensorRT untested).

The exported graph is the eval-mode model at one input resolution: pixels (B, 3, H, W) in [0, 1]
(input normalisation included, unless ``make_preprocessor_external`` was called) -> one output pair
per head, named::

    summary, features                      the backbone (RadioOutput of ``model(x)``)
    <adaptor>.summary, <adaptor>.features  each adaptor head (a head without a summary has none)

Features are (B, h*w, C) ("NLC"), (B, h, w, C) ("NHWC") or (B, C, h, w) ("NCHW"). The batch axis is
dynamic by default; the resolution is fixed, because the position embedding (CPE) is resampled for the
grid at export time, so export once per resolution you serve (``get_nearest_supported_resolution``
says which are valid).
Attention runs through PyTorch's SDPA while exporting (the Triton kernels do not trace into ONNX).
Uses ``torch.onnx.export(dynamo=True)``, which needs the ``onnxscript`` package; ``check=True``
compares onnxruntime's outputs with PyTorch's (needs ``onnxruntime``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from .model import RadioModel, _check_feature_fmt

__all__ = ["OnnxExport", "export_onnx"]

INPUT_NAME = "pixels"


@dataclass
class OnnxExport:
    """What ``export_onnx`` wrote: the file, the output names in graph order, and the largest
    absolute difference between onnxruntime and PyTorch per output (empty without ``check``)."""

    path: str
    output_names: list[str]
    max_abs_diff: dict[str, float]


class _Flattened(nn.Module):
    """The model's outputs as a flat tuple in ``names`` order (ONNX graphs return tuples)."""

    def __init__(self, model: RadioModel, feature_fmt: str) -> None:
        super().__init__()
        self.model, self.feature_fmt = model, feature_fmt
        self.names = ["summary", "features"]
        for spec in model.adaptor_specs:
            self.names += ([f"{spec.name}.summary"] if spec.summary_dim is not None else []) + [f"{spec.name}.features"]

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(pixels, feature_fmt=self.feature_fmt)
        heads = out if isinstance(out, dict) else {"backbone": out}
        flat = []
        for name, head in heads.items():
            prefix = "" if name == "backbone" else f"{name}."
            if prefix + "summary" in self.names:
                flat.append(head.summary)
            flat.append(head.features)
        return tuple(flat)


def _check_resolution(model: RadioModel, height: int, width: int) -> None:
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if (height, width) != tuple(model.get_nearest_supported_resolution(height, width)):
        step = model.min_resolution_step
        raise ValueError(
            f"height and width must be multiples of {step} up to {model.max_resolution}, got {height} x {width}; "
            f"nearest supported: {tuple(model.get_nearest_supported_resolution(height, width))}"
        )


@torch.no_grad()
def export_onnx(
    model: RadioModel,
    path: str | os.PathLike,
    height: int,
    width: int,
    *,
    batch_size: int = 1,
    dynamic_batch: bool = True,
    feature_fmt: str = "NLC",
    opset_version: int | None = None,
    check: bool = True,
) -> OnnxExport:
    """Write ``model`` (eval mode, attention through SDPA) as an ONNX graph at ``height`` x ``width``.

    ``batch_size``: the example batch traced (with ``dynamic_batch`` any batch runs). ``check``: run the
    file with onnxruntime on a random batch and record the largest difference to PyTorch per output.
    The model is left as it was (mode and attention backend restored).
    """
    if not isinstance(model, RadioModel):
        raise TypeError(f"model must be a RadioModel, got {type(model).__name__}")
    _check_resolution(model, height, width)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    _check_feature_fmt("feature_fmt", feature_fmt)
    path = os.fspath(path)
    was_training, backend = model.training, model.config.attention_backend
    param = next(model.parameters())
    example = torch.rand(batch_size, 3, height, width, generator=torch.Generator().manual_seed(0))
    example = example.to(param.device, param.dtype)
    wrapper = _Flattened(model, feature_fmt).eval()
    try:
        model.eval()
        model.set_attention_backend("torch")
        dynamic = {INPUT_NAME: {0: torch.export.Dim("batch", min=1, max=4096)}} if dynamic_batch else None
        program = torch.onnx.export(
            wrapper,
            (example,),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=wrapper.names,
            dynamic_shapes=dynamic,
            opset_version=opset_version,
            verbose=False,
        )
        program.save(path)
        diffs = _compare_with_onnxruntime(path, wrapper, example) if check else {}
    finally:
        model.set_attention_backend(backend)
        model.train(was_training)
    return OnnxExport(path, list(wrapper.names), diffs)


def _compare_with_onnxruntime(path: str, wrapper: _Flattened, example: torch.Tensor) -> dict[str, float]:
    try:
        import onnxruntime
    except ImportError as err:
        raise ImportError("check=True needs onnxruntime (pip install onnxruntime), or pass check=False") from err
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = session.run(None, {INPUT_NAME: example.float().cpu().numpy()})
    want = wrapper(example)
    return {
        name: float((torch.from_numpy(g) - w.float().cpu()).abs().max()) for name, g, w in zip(wrapper.names, got, want)
    }
