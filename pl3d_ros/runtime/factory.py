"""Making a backend by name (``runtime.backend``; names in ``pl3d_ros.registry.BACKENDS``, which
points at the builders below). Each builder takes the same options and uses those its backend
has; TensorRT and ONNX Runtime import lazily."""

from __future__ import annotations

import torch

from pl3d_ros import registry
from pl3d_ros.models.checkpoint import CheckpointHeader
from pl3d_ros.runtime.base import Backend, BackendError


def onnxruntime(model: torch.nn.Module, header: CheckpointHeader, *, threads: int = 0, **_: object) -> Backend:
    from pl3d_ros.runtime.onnxruntime_backend import OnnxRuntimeBackend

    return OnnxRuntimeBackend(model, header, threads=threads)


def torch_eager(model: torch.nn.Module, header: CheckpointHeader, *, device: str | None = None,
                **_: object) -> Backend:
    from pl3d_ros.runtime.torch_backend import TorchBackend

    return TorchBackend(model, header.input_shapes, device=device)


def tensorrt(model: torch.nn.Module, header: CheckpointHeader, *, precision: str = "fp16",
             cache_dir: str | None = None, force_rebuild: bool = False, **_: object) -> Backend:
    from pl3d_ros.runtime.tensorrt_backend import TensorRTBackend

    return TensorRTBackend(model, header, precision=precision, cache_dir=cache_dir, force_rebuild=force_rebuild)


def create_backend(kind: str, model: torch.nn.Module, header: CheckpointHeader, *, threads: int = 0,
                   precision: str = "fp16", cache_dir: str | None = None,
                   device: str | None = None, force_rebuild: bool = False) -> Backend:
    """A Backend of ``kind`` carrying ``model``'s weights."""
    try:
        builder = registry.BACKENDS.get(kind)
    except KeyError as exc:
        raise BackendError(str(exc.args[0])) from None
    return builder(model, header, threads=threads, precision=precision, cache_dir=cache_dir, device=device,
                   force_rebuild=force_rebuild)
