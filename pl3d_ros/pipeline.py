"""Segmenter: Frame -> Prediction, over any Backend.

preprocess   ``inputs.prepare``: image resized + centre-cropped to the network's input size (camera
             K adjusted the same way), points projected into that image, spherical range image;
             on the backend's device (numpy on a CPU, torch on a GPU: ``inputs.prepare_on``)
inference    backend.run: both branches in one graph (one engine launch on a GPU); on a GPU
             backend ``run_device`` takes and returns device tensors
postprocess  per-point labels (``inputs.point_predictions``: range cell of each point, bilinear
             image sample at each in-view point's pixel), entropy-weighted fusion in view (with
             the branch log-weights the adapter deploys, see ``deploy``), labels and confidence,
             on the outputs' device (numpy kernels on a CPU)

On a GPU backend a frame's points and image go to the device once, and nothing comes back
until the per-point results (labels, confidence, each branch's labels).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from pl3d_ros.cpu_budget import one_torch_thread
from pl3d_ros.frame import Frame, Prediction
from pl3d_ros.inputs import (NetworkInputs, PointOutputs, PointPredictions, load_cpu_kernels, point_outputs,
                             point_predictions, prepare)
from pl3d_ros.models.checkpoint import CheckpointHeader
from pl3d_ros.models.points import Fusion
from pl3d_ros.runtime.base import Backend


#: The key of a deployment's fusion log-weights (2,) beside the network's state dict.
FUSION_KEY = "pl3d.fusion_bias"


class Segmenter:
    """Runs a two-stream network on Frames. Thread-safe as its backend is (see runtime.base).

    ``fusion``: how the branches combine (``runtime.fusion``; ``models.points.Fusion`` with the
    header's classes that only one branch outputs);
    ``fusion_bias``: the fusion's branch log-weights (2D, 3D); an adapted checkpoint carries the
    ones it was adapted with (header training.adaptation).
    ``device``: where pre- and postprocessing run, the backend's (``Backend.device``)."""

    def __init__(self, backend: Backend, header: CheckpointHeader, fusion: str) -> None:
        self.backend = backend
        self.header = header
        self.fusion = Fusion.of(fusion, header)
        self.num_classes = header.class_set.num_classes
        self.device = torch.device(getattr(backend, "device", "cpu"))
        # One helper thread for the camera half of the CPU preprocess (inputs.prepare) and the 2D
        # half of the postprocess: two cores work on a frame's numpy / torch loops, which release
        # the GIL. The thread starts with the first infer, on the inference thread, so it shares
        # its priority.
        self._helper = ThreadPoolExecutor(1, thread_name_prefix="pl3d-prepare")
        if self.device.type == "cpu":
            load_cpu_kernels()
        saved = header.training.get("adaptation", {}).get("fusion_bias")
        self.fusion_bias: tuple[float, float] | None = tuple(float(v) for v in saved) if saved else None

    def deploy(self, update: dict[str, torch.Tensor]) -> None:
        """Deploy what the adapter hands over: a state dict for the backend (swapped atomically),
        with an optional ``FUSION_KEY`` entry for the fusion (set with one assignment)."""
        if FUSION_KEY in update:
            update = dict(update)
            bias = update.pop(FUSION_KEY)
            self.fusion_bias = (float(bias[0]), float(bias[1]))
        if update:
            self.backend.swap_weights(update)

    def preprocess(self, frame: Frame) -> NetworkInputs:
        m = self.header.model
        return prepare(frame, (m.image_width, m.image_height), self.header.sensor, self.device, self._helper)

    def run(self, inputs: NetworkInputs) -> dict[str, torch.Tensor]:
        """The backend's dense outputs for ``inputs``, as tensors on ``device`` (a CPU backend's
        numpy outputs wrapped without a copy)."""
        if self.device.type == "cpu":
            return {k: torch.from_numpy(v) for k, v in self.backend.run(inputs.arrays()).items()}
        return self.backend.run_device({"image": inputs.image, "range_image": inputs.range_image})

    def postprocess(self, inputs: NetworkInputs, outputs: dict[str, np.ndarray | torch.Tensor]) -> PointOutputs:
        """Backend outputs -> per-point logits of both branches (what the adapter and training
        use; inference takes ``predict``)."""
        l2, l3 = (torch.as_tensor(outputs[k]) for k in ("logits_2d", "logits_3d"))
        return point_outputs(inputs, l2, l3)

    def predict(self, inputs: NetworkInputs, outputs: dict[str, torch.Tensor]) -> PointPredictions:
        """Backend outputs -> per-point probabilities, fused labels and confidence."""
        helper = self._helper if self.device.type == "cpu" else None  # a GPU queues the work anyway
        return point_predictions(inputs, outputs["logits_2d"], outputs["logits_3d"], self.fusion_bias, helper,
                                 rule=self.fusion)

    def _sync(self) -> None:
        # GPU work is asynchronous: a stage's time is only known once its kernels are done.
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def infer(self, frame: Frame) -> Prediction:
        """Label every point of ``frame``; the Prediction keeps the inputs (``prediction.inputs``)."""
        t0 = time.perf_counter()
        with one_torch_thread(self.device):
            inputs = self.preprocess(frame)
        self._sync()
        t1 = time.perf_counter()
        outputs = self.run(inputs)
        self._sync()
        t2 = time.perf_counter()
        with one_torch_thread(self.device):
            pred = self.predict(inputs, outputs)
            labels = pred.labels.to(torch.uint8).cpu().numpy()
            confidence = pred.confidence.cpu().numpy()
            labels_2d = pred.labels_2d.to(torch.uint8).cpu().numpy()
            labels_3d = pred.labels_3d.to(torch.uint8).cpu().numpy()
            in_view = inputs.in_view.cpu().numpy()
        t3 = time.perf_counter()
        timings = {"preprocess": (t1 - t0) * 1e3, "inference": (t2 - t1) * 1e3,
                   "postprocess": (t3 - t2) * 1e3, "total": (t3 - t0) * 1e3}
        return Prediction(labels, confidence, in_view, labels_2d, labels_3d, timings, frame.stamp_ns, inputs=inputs)
