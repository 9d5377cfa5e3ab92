"""ONNX Runtime backend: CPU, plus the CUDA and TensorRT execution providers where installed."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch

from pl3d_ros.models.checkpoint import CheckpointHeader
from pl3d_ros.runtime.base import OUTPUT_NAMES, Backend, BackendError
from pl3d_ros.runtime.export import export_onnx

PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


class OnnxRuntimeBackend(Backend):
    """An InferenceSession over the exported graph.

    A weight swap re-exports the graph from a copy of the torch module carrying the new weights
    (the exporter folds BatchNorm into the convolutions, so initializer names do not map 1:1 to
    the state dict) and builds a new session, off the hot path, then swaps the reference.
    """

    name = "onnxruntime"

    def __init__(self, model: torch.nn.Module, header: CheckpointHeader,
                 providers: list[str] | None = None, threads: int = 0) -> None:
        import onnxruntime as ort

        super().__init__(header.input_shapes)
        self.header = header
        self._template = copy.deepcopy(model).cpu().eval()
        available = ort.get_available_providers()
        self.providers = [p for p in (providers or PREFERRED_PROVIDERS) if p in available]
        if not self.providers:
            raise BackendError(f"none of the providers {providers} is available (have {available})")
        self.threads = threads
        self._engine = self._session(export_onnx(self._template, header))

    def _session(self, onnx_bytes: bytes):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.threads:
            opts.intra_op_num_threads = self.threads
        # ORT's workers spin between runs by default, burning the cores the adaptation thread
        # would use while the node waits for the next frame.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return ort.InferenceSession(onnx_bytes, opts, providers=self.providers)

    def _build_engine(self, state_dict: dict[str, torch.Tensor]):
        return self._session(export_onnx(self._template_with(state_dict), self.header))

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.check_inputs(inputs)
        session = self._engine
        outs = session.run(list(OUTPUT_NAMES), {k: inputs[k] for k in self.input_shapes})
        return dict(zip(OUTPUT_NAMES, outs))

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "providers": self.providers}
