"""What an adaptation method keeps about one target frame, and what one step returns.

A method ``prepare``s a frame into a :class:`FrameState` once (teacher forward, pseudo-labels,
masks: the frame's work) and then runs ``step``s on it, each returning a :class:`StepResult`.
Ground truth (``gt``) is only ever read for reporting pseudo-label quality, never for training.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pl3d_ros.frame import Frame
from pl3d_ros.geometry import project_points
from pl3d_ros.inputs import NetworkInputs, prepare
from pl3d_ros.labels import ClassSet
from pl3d_ros.models.checkpoint import CheckpointHeader


@dataclass
class TeacherOutput:
    """The deployed network's probabilities on the frame: p2 (M, C) image branch at the in-view
    points, p3 (N, C) range branch at every point, fused (N, C) as inference fuses them."""

    p2: torch.Tensor
    p3: torch.Tensor
    fused: torch.Tensor


@dataclass
class PseudoLabels:
    """The pseudo-labels of one frame by stage, (N,) int64 each, -1 = none.

    base: section 0 (class-wise thresholds); refined: after mask refinement (MLA + GAPP; = base
    without it); filtered: after the connectivity filter (None until the first step has
    filtered); trained: the cross-entropy targets of the first step on the frame, i.e. the
    filtered labels the reliability split kept (where the method has one).
    """

    base: torch.Tensor
    refined: torch.Tensor
    filtered: torch.Tensor | None = None
    trained: torch.Tensor | None = None  # the hard targets of the first step (after the reliability split)

    def stages(self) -> dict[str, torch.Tensor]:
        out = {"base": self.base, "refined": self.refined}
        if self.filtered is not None:
            out["filtered"] = self.filtered
        if self.trained is not None:
            out["trained"] = self.trained
        return out


@dataclass
class CameraPixels:
    """The points in the frame's own (full-resolution) image, where masks are computed:
    pixels (N, 2) int64 (u, v) clipped into the image, depth (N,) float32 metres, in_view (N,)."""

    pixels: np.ndarray
    depth: np.ndarray
    in_view: np.ndarray


@dataclass
class FrameState:
    """One target frame between a method's steps.

    inputs: the network inputs on the adaptation device; gt: (N,) int64 train ids, -1 unknown
    (None without labels); index: running frame number in the adapter; steps: steps taken on
    this frame so far. The rest is filled by the method's ``prepare`` and steps:
    teacher outputs, pseudo-labels by stage, class-wise thresholds (C,), mask components (N,)
    int64 (-1 none), the connectivity filter's veto (N,) bool, the negative classes used so far
    (N, C) bool, ``collapsed`` when the collapse guard restored the source on this frame (no
    steps follow), and the frame's numbers for the log (``stats``).
    """

    frame: Frame
    inputs: NetworkInputs
    gt: torch.Tensor | None
    index: int = 0
    steps: int = 0
    teacher: TeacherOutput | None = None
    labels: PseudoLabels | None = None
    thresholds: np.ndarray | None = None
    component: torch.Tensor | None = None
    veto: torch.Tensor | None = None
    negatives_used: torch.Tensor | None = None
    collapsed: bool = False
    domain_reset: bool = False  # the domain changed at this frame: adaptation restarted from the source
    redeploy: bool = False  # the network to serve changed at this frame (source selection): hand it over now
    masks: Any = None  # refine.PointMasks of the frame, when masks were computed
    stats: dict[str, Any] = field(default_factory=dict)
    _pixels: CameraPixels | None = field(default=None, repr=False)

    @property
    def num_points(self) -> int:
        return self.inputs.num_points

    @property
    def in_view(self) -> torch.Tensor:
        return self.inputs.in_view

    @property
    def device(self) -> torch.device:
        return self.inputs.device

    @property
    def train_labels(self) -> torch.Tensor:
        """The labels steps train on: filtered once the filter ran, refined before."""
        assert self.labels is not None, "prepare() has not labelled this frame"
        return self.labels.filtered if self.labels.filtered is not None else self.labels.refined

    def camera_pixels(self) -> CameraPixels:
        """Projection into the frame's own image (the one masks are computed on), computed once."""
        if self._pixels is None:
            cam = self.frame.camera
            proj = project_points(self.frame.points[:, :3], cam)
            self._pixels = CameraPixels(proj.pixels(cam.width, cam.height), proj.depth.astype(np.float32),
                                        proj.in_view)
        return self._pixels


def ground_truth(frame: Frame, class_set: ClassSet) -> np.ndarray | None:
    """(N,) int64 train ids of a labeled frame, -1 where unknown or ignored; None without labels."""
    if frame.labels is None:
        return None
    ids = class_set.to_train_ids(frame.labels).astype(np.int64)
    ids[ids == class_set.ignore_index] = -1
    return ids


def frame_state(frame: Frame, header: CheckpointHeader, device: torch.device | str, index: int = 0,
                inputs: NetworkInputs | None = None) -> FrameState:
    """A fresh FrameState: ``inputs`` as inference prepared them (prepared here when None), moved
    to the adaptation device."""
    if inputs is None:
        m = header.model
        inputs = prepare(frame, (m.image_width, m.image_height), header.sensor)
    dev = torch.device(device)
    gt = ground_truth(frame, header.class_set)
    return FrameState(frame, inputs.to(dev), None if gt is None else torch.from_numpy(gt).to(dev), index)


@dataclass
class StepResult:
    """What one step did: the total loss, each loss term (``loss_<name>``), and other numbers
    (reliable share, label density, ...). ``as_dict`` flattens it for logs and health."""

    loss: float
    terms: dict[str, float] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"loss": self.loss, **{f"loss_{k}": v for k, v in self.terms.items()}, **self.stats}
