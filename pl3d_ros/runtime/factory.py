"""Making a backend by name (``runtime.backend``; names in ``pl3d_ros.registry.BACKENDS``, which
points at the builders below). Each builder takes the same options and uses those its backend
has; TensorRT and ONNX Runtime import lazily."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from pl3d_ros import registry
from pl3d_ros.models.checkpoint import CheckpointHeader
from pl3d_ros.runtime.base import Backend, BackendError

#: What ``runtime.precision: auto`` runs on each backend, chosen by measurement (issue 14): int8
#: is 2.2x faster than fp32 on ONNX Runtime's CPU provider for a fused-mIoU change within
#: 1 point on the dev frames; TensorRT fp16 as before; torch eager has no int8 path here.
AUTO_PRECISION = {"tensorrt": "fp16", "onnxruntime": "int8", "torch": "fp32"}

#: Calibration feeds for an int8 graph: a callable returning backend feeds (see
#: ``runtime.quantization.calibration_feeds``), asked once, when the first graph is quantized.
Calibration = Callable[[], list[dict[str, np.ndarray]]]


def resolve_precision(kind: str, precision: str) -> str:
    """``precision`` with ``auto`` replaced by ``kind``'s (AUTO_PRECISION); int8 on a backend
    that has none is a BackendError."""
    if precision == "auto":
        return AUTO_PRECISION.get(kind, "fp32")
    if precision == "int8" and kind != "onnxruntime":
        raise BackendError(f"runtime.precision int8 is the onnxruntime backend's (a calibrated QDQ graph on the CPU); "
                           f"the {kind} backend runs fp16 / fp32")
    return precision


def onnxruntime(model: torch.nn.Module, header: CheckpointHeader, *, threads: int = 0, precision: str = "fp32",
                calibration: Calibration | None = None, **_: object) -> Backend:
    from pl3d_ros.runtime.onnxruntime_backend import OnnxRuntimeBackend

    if precision == "int8" and calibration is None:
        calibration = default_calibration(header)
    return OnnxRuntimeBackend(model, header, threads=threads, precision=precision, calibration=calibration)


def torch_eager(model: torch.nn.Module, header: CheckpointHeader, *, device: str | None = None,
                **_: object) -> Backend:
    from pl3d_ros.runtime.torch_backend import TorchBackend

    return TorchBackend(model, header.input_shapes, device=device)


def tensorrt(model: torch.nn.Module, header: CheckpointHeader, *, precision: str = "fp16",
             cache_dir: str | None = None, force_rebuild: bool = False, **_: object) -> Backend:
    from pl3d_ros.runtime.tensorrt_backend import TensorRTBackend

    return TensorRTBackend(model, header, precision=precision, cache_dir=cache_dir, force_rebuild=force_rebuild)


def default_calibration(header: CheckpointHeader, spec: str = "sim:source", frames: int | None = None) -> Calibration:
    """The calibration feeds of ``spec`` (``runtime.int8_calibration``) at ``header``'s input sizes."""
    from pl3d_ros.runtime.quantization import DEFAULT_FRAMES, calibration_feeds

    m = header.model
    return lambda: calibration_feeds(spec, frames or DEFAULT_FRAMES, (m.image_width, m.image_height), header.sensor)


def create_backend(kind: str, model: torch.nn.Module, header: CheckpointHeader, *, threads: int = 0,
                   precision: str = "auto", cache_dir: str | None = None,
                   device: str | None = None, force_rebuild: bool = False,
                   calibration: Calibration | None = None) -> Backend:
    """A Backend of ``kind`` carrying ``model``'s weights (``precision`` as ``runtime.precision``;
    ``calibration`` for int8, default: ``default_calibration``)."""
    try:
        builder = registry.BACKENDS.get(kind)
    except KeyError as exc:
        raise BackendError(str(exc.args[0])) from None
    return builder(model, header, threads=threads, precision=resolve_precision(kind, precision), cache_dir=cache_dir,
                   device=device, force_rebuild=force_rebuild, calibration=calibration)
