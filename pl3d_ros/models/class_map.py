"""Mapping a pretrained network's source classes onto this project's class sets.

A ``ClassMap`` turns (B, S, ...) source logits into (B, T, ...) target logits. The logits of the
source classes that make one target class are combined by log-sum-exp, so that after a softmax
over the targets each target's probability is the sum of its sources' probabilities (renormalised
over the mapped sources: unmapped ones such as sky or unlabeled are left out). A target with no
source (parking for a Cityscapes model) gets the finite logit ``EMPTY_LOGIT``: probability 0 after a
softmax, but no -inf to turn into NaN downstream (entropy, losses, fp16).

Implemented as one fixed-index Gather over the class axis and a numerically stable log-sum-exp
(ReduceMax, Sub, Exp, ReduceSum, Log, Add), which exports to ONNX and TensorRT as is; no Python
loop over points or pixels.

The maps (``CLASS_MAPS``) are the table of ``shared/pretrained/README.md``:

* SemanticKITTI 19 -> xmuda10: car; truck + other-vehicle -> truck; bicycle + motorcycle +
  bicyclist + motorcyclist -> bike; person; road; parking; sidewalk; building; vegetation + trunk
  + terrain -> nature; fence + pole + traffic-sign -> other-objects; other-ground ignored.
* Cityscapes 19 -> xmuda10: car; truck + bus + train -> truck; bicycle + motorcycle + rider ->
  bike; person; road; sidewalk; building; vegetation + terrain -> nature; wall + fence + pole +
  traffic light + traffic sign -> other-objects; sky ignored; no source for parking.
* SemanticKITTI 19 -> semantickitti19: the identity (train id = network id - 1).
* Cityscapes 19 -> semantickitti19 is *not* in that table; ``cityscapes->semantickitti19`` here
  maps only classes with the same meaning (bus and train -> other-vehicle, as SemanticKITTI's own
  learning map does for bus and on-rails) and leaves rider, wall, traffic light and sky out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from pl3d_ros.labels import ClassSet, load_class_set
from pl3d_ros.models.espnetv2 import CITYSCAPES_CLASSES

__all__ = ["CLASS_MAPS", "EMPTY_LOGIT", "SEMANTICKITTI_CLASSES", "SOURCE_CLASSES", "ClassMap",
           "ClassMapError", "build_class_map"]

#: Logit of a target class that no source class maps to (exp underflows to 0 against any real
#: logit; finite, and representable in fp16).
EMPTY_LOGIT = -1.0e4

#: Outputs of lidar-bonnetal SemanticKITTI networks (data_cfg.yaml learning_map_inv order).
SEMANTICKITTI_CLASSES = (
    "unlabeled", "car", "bicycle", "motorcycle", "truck", "other-vehicle", "person", "bicyclist",
    "motorcyclist", "road", "parking", "sidewalk", "other-ground", "building", "fence",
    "vegetation", "trunk", "terrain", "pole", "traffic-sign",
)
SOURCE_CLASSES: dict[str, tuple[str, ...]] = {
    "semantickitti": SEMANTICKITTI_CLASSES,
    "cityscapes": CITYSCAPES_CLASSES,
}

#: (source, target class set) -> {target class: source classes}. Source classes listed nowhere
#: are left out.
CLASS_MAPS: dict[tuple[str, str], dict[str, tuple[str, ...]]] = {
    ("semantickitti", "xmuda10"): {
        "car": ("car",),
        "truck": ("truck", "other-vehicle"),
        "bike": ("bicycle", "motorcycle", "bicyclist", "motorcyclist"),
        "person": ("person",),
        "road": ("road",),
        "parking": ("parking",),
        "sidewalk": ("sidewalk",),
        "building": ("building",),
        "nature": ("vegetation", "trunk", "terrain"),
        "other-objects": ("fence", "pole", "traffic-sign"),
    },
    ("semantickitti", "semantickitti19"): {name: (name,) for name in SEMANTICKITTI_CLASSES[1:]},
    ("cityscapes", "xmuda10"): {
        "car": ("car",),
        "truck": ("truck", "bus", "train"),
        "bike": ("bicycle", "motorcycle", "rider"),
        "person": ("person",),
        "road": ("road",),
        "parking": (),
        "sidewalk": ("sidewalk",),
        "building": ("building",),
        "nature": ("vegetation", "terrain"),
        "other-objects": ("wall", "fence", "pole", "traffic light", "traffic sign"),
    },
    ("cityscapes", "semantickitti19"): {
        "car": ("car",),
        "bicycle": ("bicycle",),
        "motorcycle": ("motorcycle",),
        "truck": ("truck",),
        "other-vehicle": ("bus", "train"),
        "person": ("person",),
        "road": ("road",),
        "sidewalk": ("sidewalk",),
        "building": ("building",),
        "fence": ("fence",),
        "vegetation": ("vegetation",),
        "terrain": ("terrain",),
        "pole": ("pole",),
        "traffic-sign": ("traffic sign",),
    },
}


class ClassMapError(ValueError):
    """A class map names unknown classes or maps a source class twice."""


class ClassMap(nn.Module):
    """Source logits -> target logits by log-sum-exp over each target's source classes.

    forward(logits (B, S, *rest)) -> (B, T, *rest), S = len(source_names), T = len(target_names);
    any trailing dims (H, W for images, none for per-point (N, S) logits).

    Attributes:
        index: (T, K) int64 buffer, the source channels of each target, padded with S (a constant
            EMPTY_LOGIT channel) up to K = the largest number of sources of one target.
    """

    def __init__(self, source_names: Sequence[str], target_names: Sequence[str],
                 mapping: Mapping[str, Sequence[str]]) -> None:
        super().__init__()
        self.source_names, self.target_names = tuple(source_names), tuple(target_names)
        src = {n: i for i, n in enumerate(self.source_names)}
        unknown_t = [t for t in mapping if t not in self.target_names]
        unknown_s = sorted({s for ss in mapping.values() for s in ss if s not in src})
        if unknown_t or unknown_s:
            raise ClassMapError(f"class map names unknown targets {unknown_t} / sources {unknown_s}")
        owner: dict[str, str] = {}
        for t, ss in mapping.items():
            for s in ss:
                if s in owner:
                    raise ClassMapError(f"source class {s!r} mapped to both {owner[s]!r} and {t!r}")
                owner[s] = t
        self.sources = {t: tuple(mapping.get(t, ())) for t in self.target_names}
        k = max(1, max(len(v) for v in self.sources.values()))
        pad = len(self.source_names)
        index = [[src[s] for s in self.sources[t]] + [pad] * (k - len(self.sources[t])) for t in self.target_names]
        self.register_buffer("index", torch.tensor(index, dtype=torch.int64), persistent=False)

    @property
    def unmapped_sources(self) -> tuple[str, ...]:
        """Source classes that no target uses (left out of the softmax)."""
        used = {s for ss in self.sources.values() for s in ss}
        return tuple(s for s in self.source_names if s not in used)

    @property
    def empty_targets(self) -> tuple[str, ...]:
        """Target classes with no source (always EMPTY_LOGIT)."""
        return tuple(t for t, ss in self.sources.items() if not ss)

    def to_dict(self) -> dict:
        """JSON-friendly description (for checkpoint headers)."""
        return {"source": list(self.source_names), "target": list(self.target_names),
                "map": {t: list(ss) for t, ss in self.sources.items()}}

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        if logits.shape[1] != len(self.source_names):
            raise ValueError(f"logits have {logits.shape[1]} classes, the map expects {len(self.source_names)}")
        b, rest = logits.shape[0], logits.shape[2:]
        pad = torch.full((b, 1, *rest), EMPTY_LOGIT, dtype=logits.dtype, device=logits.device)
        t, k = self.index.shape
        x = torch.cat([logits, pad], 1).index_select(1, self.index.reshape(-1))
        x = x.reshape(b, t, k, *rest)
        # Stable log-sum-exp written out: ONNX ReduceLogSumExp is exp-then-log in TensorRT,
        # which overflows in fp16 for logits above ~11.
        m = x.amax(dim=2, keepdim=True)
        return (m + torch.log(torch.exp(x - m).sum(dim=2, keepdim=True))).squeeze(2)


def build_class_map(source: str, target: str | ClassSet) -> ClassMap:
    """The shipped map from a source label space ("semantickitti", "cityscapes") to a class set.

    Args:
        source: key of ``SOURCE_CLASSES``.
        target: a class-set name ("xmuda10", "semantickitti19") or a loaded ``ClassSet``.

    Raises:
        ClassMapError: no map for that pair.
    """
    cs = target if isinstance(target, ClassSet) else load_class_set(target)
    key = (source, cs.name)
    if key not in CLASS_MAPS:
        raise ClassMapError(f"no class map from {source!r} to {cs.name!r}; known: {sorted(CLASS_MAPS)}")
    return ClassMap(SOURCE_CLASSES[source], cs.names, CLASS_MAPS[key])
