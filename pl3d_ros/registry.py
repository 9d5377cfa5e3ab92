"""The names of pluggable parts: one registry per set, read by config validation, the parameter
schema and the CLI's ``choices``.

A registry maps a name to ``"module:attribute"`` and imports it only when asked, so reading the
names (``pl3d --help``, validating a params file) does not import torch or onnxruntime.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from typing import Any


class Registry:
    """An ordered set of names, each naming a lazily imported object (class or factory)."""

    def __init__(self, kind: str, entries: dict[str, str], doc: str = "") -> None:
        self.kind = kind
        self._entries = dict(entries)
        self.doc = doc

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, name: str) -> Any:
        """The object registered as ``name`` (imported now); KeyError names the choices."""
        if name not in self._entries:
            raise KeyError(f"unknown {self.kind} {name!r}; choose from {', '.join(self.names)}")
        target = self._entries[name]
        if not target:
            raise KeyError(f"{self.kind} {name!r} is a setting, not an implementation")
        module, _, attr = target.partition(":")
        return getattr(importlib.import_module(module), attr)


#: Adaptation methods (``adapt.method``), one class each in pl3d_ros/adapt/methods.py.
METHODS = Registry("adaptation method", {
    "source": "pl3d_ros.adapt.methods:Source",
    "tent": "pl3d_ros.adapt.methods:Tent",
    "pl": "pl3d_ros.adapt.methods:PseudoLabel",
    "full": "pl3d_ros.adapt.methods:Full",
}, "source (no adaptation) | tent | pl | full")

#: Components of ``full``: ``adapt.disable`` switches one off, ``adapt.enable`` one of
#: OFF_BY_DEFAULT on (the ablations, both ways). ce is the cross-entropy on the reliable
#: pseudo-labels and mla / gapp / connectivity the refinement stages that feed it; negative, erda,
#: xm and entropy (TENT's term on the fused prediction) the other loss terms; mt the mean teacher
#: (off: the teacher is the student after every step); restore the stochastic restore (METHODS.md
#: 5.4), guard the collapse guard (5.5), fusion the shift-aware branch weighting and shift_reset
#: the restore to the source when the domain changes (both in adapt/fusion.py), gate the
#: learning rate of each branch scaled by its input shift (adapt/shift_gate.py), select serving the
#: source while its branches agree more than the adapted network's (adapt/selection.py).
COMPONENTS = ("ce", "mla", "gapp", "connectivity", "negative", "erda", "xm", "mt", "restore", "guard", "fusion",
              "shift_reset", "entropy", "gate", "select")

#: The components of ``full`` that did not add 0.3 mIoU in the benchmark: they stay in the code,
#: measured as "full+X" rows of the grids, and are off unless ``adapt.enable`` names them. Every
#: component's measured effect, and why each is on or off, is in the README ("Online adaptation",
#: "Today's components, ablated again under today's defaults"); the figures live there only.
OFF_BY_DEFAULT = ("ce", "mla", "gapp", "connectivity", "erda", "xm", "gate", "restore")

#: The components that are loss terms: ``full`` needs one of them on.
LOSS_COMPONENTS = ("ce", "negative", "erda", "xm", "entropy")

#: Inference backends (``runtime.backend``): the builders in runtime/factory.py.
BACKENDS = Registry("backend", {
    "onnxruntime": "pl3d_ros.runtime.factory:onnxruntime",
    "torch": "pl3d_ros.runtime.factory:torch_eager",
    "tensorrt": "pl3d_ros.runtime.factory:tensorrt",
}, "onnxruntime | torch | tensorrt")

#: Branch architectures (``model.image_arch`` / ``model.range_arch`` of a checkpoint header): each
#: a class with ``imported`` (needs a ``branches`` entry in the header), ``check(header)`` and
#: ``build(header) -> nn.Module``. unet branches are trained by ``pl3d train``; the others are
#: pretrained networks that ``pl3d import`` brings in (pl3d_ros/models/imported.py).
IMAGE_BRANCHES = Registry("image branch architecture", {
    "unet": "pl3d_ros.models.branches:UNetImage",
    "espnetv2": "pl3d_ros.models.imported:ESPNetv2Image",
}, "unet | espnetv2")
RANGE_BRANCHES = Registry("range branch architecture", {
    "unet": "pl3d_ros.models.branches:UNetRange",
    "mininet3d": "pl3d_ros.models.imported:MiniNet3DRange",
}, "unet | mininet3d")

#: Numeric precisions (``runtime.precision``). auto: each backend's measured best (TensorRT
#: fp16, ONNX Runtime int8, torch fp32: ``runtime.factory.AUTO_PRECISION``); fp16 / fp32: the
#: TensorRT engine's (the CPU backends run fp32 for either); int8: ONNX Runtime's QDQ int8 graph
#: (runtime/quantization.py), not TensorRT's or torch's.
PRECISIONS = ("auto", "fp16", "fp32", "int8")

#: How the two branches' per-point class probabilities combine in view (``runtime.fusion``,
#: ``models.points.fuse``): product = the renormalised product (a class must be allowed by both
#: branches), entropy = Latte's mixture weighted by each branch's per-point certainty.
FUSION_RULES = ("product", "entropy")

#: Mask providers (``refine.mask_provider``); "auto" picks SAM / MobileSAM when a checkpoint is
#: set, else superpixels.
MASK_PROVIDERS = Registry("mask provider", {
    "auto": "",
    "superpixel": "pl3d_ros.refine.masks:SuperpixelProvider",
    "slic": "pl3d_ros.refine.masks:SlicProvider",
    "sam": "pl3d_ros.refine.masks:SamProvider",
    "mobile_sam": "pl3d_ros.refine.masks:MobileSamProvider",
}, "auto | superpixel | slic | sam | mobile_sam")

#: Trainable parameter sets of the student (``adapt.trainable``): normalisation affines, those
#: and the classifier heads, everything.
TRAINABLE = ("norm", "norm_heads", "all")

#: Optimizers of the student (``adapt.optimizer``).
OPTIMIZERS = ("adam", "sgd")

#: QoS presets of the node's topics (``qos.input`` / ``qos.output``): sensor_data and best_effort
#: are BEST_EFFORT, reliable is RELIABLE; all VOLATILE, KEEP_LAST.
QOS_PRESETS = ("sensor_data", "best_effort", "reliable")
