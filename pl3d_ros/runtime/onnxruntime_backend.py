"""ONNX Runtime backend: CPU (fp32 or INT8), plus the CUDA, TensorRT and OpenVINO execution
providers where installed.

Session settings, measured on the cpu preset (bundled model, 2-core AVX512 EPYC; the issue-14
report has the numbers): graph optimisation ORT_ENABLE_ALL (its NCHWc layout transform makes the
convolutions 1.8x faster than ENABLE_EXTENDED / BASIC), sequential execution with all threads
intra-op (running the two branches in parallel with one thread each was 1.6-1.8x slower), memory
pattern on (off: 1.03-1.07x slower; it is ONNX Runtime's default), no spinning (spinning workers
were 1.2-1.5x slower on the loaded machine and would burn the cores the adaptation thread needs
between frames). Intra-op threads: ``runtime.threads`` (0 = all cores); on the loaded machine one
thread was as fast as two, which says more about the load than about an idle robot computer.
With onnxruntime-openvino installed in place of onnxruntime, int8 runs on OpenVINO's execution
provider (1.3-1.4x faster than the CPU provider's int8 in two loaded runs; its fp32 was no
faster than the CPU provider's, so fp32 keeps the default list).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from pl3d_ros.models.checkpoint import CheckpointHeader
from pl3d_ros.runtime.base import OUTPUT_NAMES, Backend, BackendError
from pl3d_ros.runtime.export import export_onnx

PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")

#: Providers that run the QDQ int8 graph as int8 on a CPU.
INT8_PROVIDERS = ("OpenVINOExecutionProvider", "CPUExecutionProvider")

#: What this backend can run (``runtime.precision``; fp16 is TensorRT's and runs fp32 here).
PRECISIONS = ("fp32", "fp16", "int8")


class OnnxRuntimeBackend(Backend):
    """An InferenceSession over the exported graph, fp32 or QDQ int8 (``precision``).

    A weight swap re-exports the graph from a copy of the torch module carrying the new weights
    (the exporter folds BatchNorm into the convolutions, so initializer names do not map 1:1 to
    the state dict), quantizes it with the start-up calibration when int8
    (``runtime.quantization``), and builds a new session, off the hot path, then swaps the
    reference.

    calibration: called once, for int8, for the calibration feeds (``quantization.Feeds``).
    """

    name = "onnxruntime"

    def __init__(self, model: torch.nn.Module, header: CheckpointHeader,
                 providers: list[str] | None = None, threads: int = 0, precision: str = "fp32",
                 calibration: Callable[[], list[dict[str, np.ndarray]]] | None = None) -> None:
        import onnxruntime as ort

        super().__init__(header.input_shapes)
        if precision not in PRECISIONS:
            raise BackendError(f"onnxruntime runs {', '.join(PRECISIONS)}, not {precision!r}")
        self.header = header
        self.precision = "int8" if precision == "int8" else "fp32"
        self._template = copy.deepcopy(model).cpu().eval()
        available = ort.get_available_providers()
        wanted = providers or PREFERRED_PROVIDERS
        if self.precision == "int8":
            wanted = [p for p in wanted if p in INT8_PROVIDERS] or list(INT8_PROVIDERS)
        self.providers = [p for p in wanted if p in available]
        if not self.providers:
            raise BackendError(f"none of the providers {list(wanted)} is available (have {available})")
        self.threads = threads
        self.quantizer = None
        if self.precision == "int8":
            from pl3d_ros.runtime.quantization import Int8Quantizer

            if calibration is None:
                raise BackendError("int8 needs calibration frames (runtime.int8_calibration)")
            self.quantizer = Int8Quantizer(calibration)
        self._engine = self._session(self._graph(self._template))

    def _graph(self, model: torch.nn.Module) -> bytes:
        """The serialised graph this backend runs for ``model``'s weights."""
        data = export_onnx(model, self.header)
        return self.quantizer.quantize(data) if self.quantizer is not None else data

    def _session(self, onnx_bytes: bytes):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        if self.threads:
            opts.intra_op_num_threads = self.threads
        # ORT's workers spin between runs by default, burning the cores the adaptation thread
        # would use while the node waits for the next frame (and were not faster, measured).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return ort.InferenceSession(onnx_bytes, opts, providers=self.providers)

    def _build_engine(self, state_dict: dict[str, torch.Tensor]):
        return self._session(self._graph(self._template_with(state_dict)))

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.check_inputs(inputs)
        session = self._engine
        outs = session.run(list(OUTPUT_NAMES), {k: inputs[k] for k in self.input_shapes})
        return dict(zip(OUTPUT_NAMES, outs))

    def describe(self) -> dict[str, Any]:
        out = {**super().describe(), "providers": self.providers, "precision": self.precision}
        if self.quantizer is not None:
            out["int8_calibrations"] = self.quantizer.calibrations
        return out
