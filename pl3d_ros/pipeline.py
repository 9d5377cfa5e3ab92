"""Segmenter: Frame -> Prediction, over any Backend.

preprocess   ``inputs.prepare``: image resized + centre-cropped to the network's input size (camera
             K adjusted the same way), points projected into that image, spherical range image
inference    backend.run: both branches in one graph (one engine launch on a GPU)
postprocess  per-point logits (``inputs.point_outputs``: range cell of each point, bilinear image
             sample at each in-view point's pixel), softmax, entropy-weighted fusion (with the
             branch log-weights the adapter deploys, see ``deploy``), labels and confidence
"""

from __future__ import annotations

import time

import numpy as np
import torch

from pl3d_ros.frame import Frame, Prediction
from pl3d_ros.inputs import NetworkInputs, PointOutputs, point_outputs, prepare
from pl3d_ros.models.checkpoint import CheckpointHeader
from pl3d_ros.runtime.base import Backend


#: The key of a deployment's fusion log-weights (2,) beside the network's state dict.
FUSION_KEY = "pl3d.fusion_bias"


class Segmenter:
    """Runs a two-stream network on Frames. Thread-safe as its backend is (see runtime.base).

    ``fusion_bias``: the log-weights (2D, 3D) added to the branches' -entropy in the fusion; an
    adapted checkpoint carries the ones it was adapted with (header training.adaptation)."""

    def __init__(self, backend: Backend, header: CheckpointHeader) -> None:
        self.backend = backend
        self.header = header
        self.num_classes = header.class_set.num_classes
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
        return prepare(frame, (m.image_width, m.image_height), self.header.sensor)

    def postprocess(self, inputs: NetworkInputs, outputs: dict[str, np.ndarray]) -> PointOutputs:
        """Backend outputs -> per-point logits of both branches."""
        return point_outputs(inputs, torch.from_numpy(outputs["logits_2d"]), torch.from_numpy(outputs["logits_3d"]))

    def infer(self, frame: Frame) -> Prediction:
        """Label every point of ``frame``; the Prediction keeps the inputs (``prediction.inputs``)."""
        t0 = time.perf_counter()
        inputs = self.preprocess(frame)
        t1 = time.perf_counter()
        outputs = self.backend.run(inputs.arrays())
        t2 = time.perf_counter()
        prob_2d, prob_3d, fused = self.postprocess(inputs, outputs).probs(inputs.in_view, self.fusion_bias)
        confidence, labels = fused.max(-1)
        t3 = time.perf_counter()
        timings = {"preprocess": (t1 - t0) * 1e3, "inference": (t2 - t1) * 1e3,
                   "postprocess": (t3 - t2) * 1e3, "total": (t3 - t0) * 1e3}
        return Prediction(labels.numpy().astype(np.uint8), confidence.numpy(), inputs.in_view.numpy(),
                          prob_2d.numpy(), prob_3d.numpy(), timings, frame.stamp_ns, inputs=inputs)
