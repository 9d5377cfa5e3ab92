"""Choosing a backend by name: the one place that maps ``runtime.backend`` to a class."""

from __future__ import annotations

import torch

from pl3d_ros.models.checkpoint import CheckpointHeader
from pl3d_ros.runtime.base import Backend, BackendError

BACKENDS = ("onnxruntime", "torch", "tensorrt")


def create_backend(kind: str, model: torch.nn.Module, header: CheckpointHeader, *, threads: int = 0,
                   precision: str = "fp16", cache_dir: str | None = None,
                   device: str | None = None, force_rebuild: bool = False) -> Backend:
    """A Backend of ``kind`` carrying ``model``'s weights (TensorRT imports lazily)."""
    if kind == "onnxruntime":
        from pl3d_ros.runtime.onnxruntime_backend import OnnxRuntimeBackend

        return OnnxRuntimeBackend(model, header, threads=threads)
    if kind == "torch":
        from pl3d_ros.runtime.torch_backend import TorchBackend

        return TorchBackend(model, header.input_shapes, device=device)
    if kind == "tensorrt":
        from pl3d_ros.runtime.tensorrt_backend import TensorRTBackend

        return TensorRTBackend(model, header, precision=precision, cache_dir=cache_dir,
                               force_rebuild=force_rebuild)
    raise BackendError(f"unknown backend {kind!r}; choose from {BACKENDS}")
