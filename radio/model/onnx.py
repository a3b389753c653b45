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
compares onnxruntime's outputs with PyTorch's (needs ``onnxruntime``) and fails (``OnnxCheckError``,
file removed) where they differ by more than ``CHECK_ATOL + CHECK_RTOL * max |output|``. A model with
non-finite weights is refused (``radio.finite.NonFiniteError``).
"""

from __future__ import annotations

import numbers
import os
import shutil
import tempfile
from dataclasses import dataclass

import torch
from torch import nn

from radio.finite import check_finite

from .model import RadioModel, _check_feature_fmt

__all__ = ["CHECK_ATOL", "CHECK_RTOL", "OnnxCheckError", "OnnxExport", "export_onnx"]

INPUT_NAME = "pixels"  # also the name of _Flattened.forward's argument, which dynamic_shapes is keyed by


@dataclass
class OnnxExport:
    """What ``export_onnx`` wrote: the file, the output names in graph order, whether the graph
    normalises its input itself (False after ``make_preprocessor_external``), the opset, and the largest
    absolute difference between onnxruntime and PyTorch per output (empty without ``check``)."""

    path: str
    output_names: list[str]
    normalizes_input: bool
    opset: int
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


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return int(value)


def _check_resolution(model: RadioModel, height: int, width: int) -> tuple[int, int]:
    height, width = _positive_int("height", height), _positive_int("width", width)
    if (height, width) != tuple(model.get_nearest_supported_resolution(height, width)):
        step = model.min_resolution_step
        raise ValueError(
            f"height and width must be multiples of {step}, got {height} x {width}; "
            f"nearest supported: {tuple(model.get_nearest_supported_resolution(height, width))}"
        )
    return height, width


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

    ``batch_size``: the example batch traced; with ``dynamic_batch`` any batch runs (a batch of 1 is
    traced as 2: the tracer would fix a size-1 axis), without it only this one. ``opset_version``:
    None (the exporter's default, 20 with torch 2.14) or >= 18. ``check``: run the file with
    onnxruntime (CPU) on a batch of another size than the traced one (the same, with a fixed batch)
    and record the largest difference to PyTorch per output; it needs a float32 model. The model is left as it was (mode
    and attention backend restored, also when the export fails).
    """
    if not isinstance(model, RadioModel):
        raise TypeError(f"model must be a RadioModel, got {type(model).__name__}")
    check_finite(model, "an ONNX export")
    height, width = _check_resolution(model, height, width)
    batch_size = _positive_int("batch_size", batch_size)
    _check_feature_fmt("feature_fmt", feature_fmt)
    if opset_version is not None and (
        isinstance(opset_version, bool) or not isinstance(opset_version, numbers.Integral) or opset_version < 18
    ):
        raise ValueError(f"opset_version must be None or an int >= 18 (the exporter's minimum), got {opset_version!r}")
    if opset_version is not None and opset_version > (newest := _newest_opset()):
        raise ValueError(f"opset_version must be at most {newest} (the newest opset onnx knows), got {opset_version}")
    if os.path.isdir(path):
        raise ValueError(f"path {os.fspath(path)!r} is a directory; give the .onnx file to write")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)  # before the (slow) export: an impossible path fails now
    if not os.access(folder, os.W_OK):
        raise ValueError(f"path {os.fspath(path)!r}: the folder {folder!r} is not writable")
    param = next(model.parameters())
    if check:
        if param.dtype != torch.float32:
            raise ValueError(
                f"check=True compares with onnxruntime on the CPU, which needs a float32 model, got {param.dtype}; "
                "export model.float() or pass check=False"
            )
        try:
            import onnxruntime  # noqa: F401
        except ImportError as err:
            raise ImportError("check=True needs onnxruntime (pip install onnxruntime), or pass check=False") from err
    path = os.fspath(path)
    traced = max(batch_size, 2) if dynamic_batch else batch_size
    checked = traced + 1 if dynamic_batch else traced
    example = _pixels(traced, height, width, param, seed=0)
    was_training, backend = model.training, model.config.attention_backend
    wrapper = _Flattened(model, feature_fmt).eval()
    try:
        model.eval()
        model.set_attention_backend("torch")
        # Keyed by the name of the wrapper's forward argument (torch.export's convention).
        dynamic = {"pixels": {0: torch.export.Dim("batch", min=1)}} if dynamic_batch else None
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
        # Written into a temporary folder beside ``path`` and moved into place once every check passed:
        # a failed export leaves no file behind (nor a half-written one in place of an earlier export).
        # Same base name, so an external-data file (large models) keeps the name the graph refers to.
        try:
            staging = tempfile.mkdtemp(prefix=".onnx-export-", dir=folder)
        except OSError as e:
            raise ValueError(f"path {os.fspath(path)!r}: cannot write into {folder!r} ({e.strerror})") from e
        try:
            staged = os.path.join(staging, os.path.basename(path))
            program.save(staged)
            opset = program.model.opset_imports[""]  # the default ONNX domain
            if opset_version is not None and opset != opset_version:
                raise ValueError(f"opset_version {opset_version} was asked for, but the exporter wrote opset {opset}")
            diffs = (
                _compare_with_onnxruntime(staged, wrapper, _pixels(checked, height, width, param, seed=1))
                if check
                else {}
            )
            for name in os.listdir(staging):  # the graph, and its external data if any
                os.replace(os.path.join(staging, name), os.path.join(os.path.dirname(path), name))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    finally:
        model.set_attention_backend(backend)
        model.train(was_training)
    return OnnxExport(path, list(wrapper.names), not model._external_preprocessor, opset, diffs)


# The check's tolerance: |onnxruntime - torch| <= CHECK_ATOL + CHECK_RTOL * max |torch output| per output
# (float32 on the CPU; measured differences are ~5e-6).
CHECK_ATOL = 1e-4
CHECK_RTOL = 1e-4


class OnnxCheckError(RuntimeError):
    """The exported graph's outputs differ from PyTorch's beyond the stated tolerance."""


def _newest_opset() -> int:
    try:
        import onnx
    except ImportError:  # torch.onnx.export needs onnx anyway and will say so
        return 10**9
    return onnx.defs.onnx_opset_version()


def _pixels(batch: int, height: int, width: int, like: torch.Tensor, seed: int) -> torch.Tensor:
    x = torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))
    return x.to(like.device, like.dtype)


def _compare_with_onnxruntime(path: str, wrapper: _Flattened, example: torch.Tensor) -> dict[str, float]:
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = session.run(None, {INPUT_NAME: example.cpu().numpy()})
    want = wrapper(example)
    if len(got) != len(want):
        raise RuntimeError(f"onnxruntime returned {len(got)} outputs, the model {len(want)}")
    diffs = {}
    for name, g, w in zip(wrapper.names, got, want):
        w = w.float().cpu()
        diff = float((torch.from_numpy(g) - w).abs().max())
        limit = CHECK_ATOL + CHECK_RTOL * float(w.abs().max())
        if not diff <= limit:  # also NaN
            raise OnnxCheckError(
                f"onnxruntime and PyTorch disagree on output {name!r}: max |difference| {diff:.3g} > {limit:.3g} "
                f"(tolerance {CHECK_ATOL:g} + {CHECK_RTOL:g} * max |output|); the file was removed"
            )
        diffs[name] = diff
    return diffs
