"""Mapping a pretrained network's source classes onto this project's class sets.

A ``ClassMap`` turns (B, S, ...) source logits into (B, T, ...) target logits. The logits of the
source classes that make one target class are combined by log-sum-exp, so that after a softmax
over the targets each target's probability is the sum of its sources' probabilities (renormalised
over the mapped sources: unmapped ones such as sky or unlabeled are left out).

Computed as m + log(M @ exp(x - m)) with M the (T, S') 0/1 membership matrix of the S' mapped
sources and m their per-position maximum (a stable log-sum-exp: the target holding the maximum
source has a sum >= 1). Sums below ``FLOOR`` are clamped to it, so a target with no source
(parking for a Cityscapes model) or whose sources are all ~70 nats below the best one gets the
finite logit m + log(FLOOR): probability <= 1e-30 relative to the best class, and no -inf to turn
into NaN downstream (entropy, losses). ONNX: Gather (fixed indices), ReduceMax, Sub, Exp, MatMul,
Max, Log, Add; no Python loop over points or pixels. Keep it in fp32 (FLOOR is 0 in fp16).

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

__all__ = ["CLASS_MAPS", "FLOOR", "SEMANTICKITTI_CLASSES", "SOURCE_CLASSES", "ClassMap",
           "ClassMapError", "build_class_map"]

#: Smallest per-target sum of exp(logit - max) kept: target logits are at least max + log(FLOOR).
FLOOR = 1.0e-30

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
        mapped: (S',) int64 buffer, the source channels some target uses.
        membership: (T, S') float buffer, 1 where mapped source j belongs to target t.
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
        if not owner:
            raise ClassMapError("class map maps no source class")
        self.sources = {t: tuple(mapping.get(t, ())) for t in self.target_names}
        mapped = [i for i, n in enumerate(self.source_names) if n in owner]
        member = torch.zeros(len(self.target_names), len(mapped))
        for j, i in enumerate(mapped):
            member[self.target_names.index(owner[self.source_names[i]]), j] = 1.0
        self.register_buffer("mapped", torch.tensor(mapped, dtype=torch.int64), persistent=False)
        self.register_buffer("membership", member, persistent=False)

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
        if logits.dim() < 2 or logits.shape[1] != len(self.source_names):
            raise ValueError(f"logits must be (B, {len(self.source_names)}, ...), got {tuple(logits.shape)}")
        b, rest = logits.shape[0], logits.shape[2:]
        x = logits.index_select(1, self.mapped)
        m = x.amax(dim=1, keepdim=True)
        if logits.dim() == 2:  # per-point (N, S): one (N, S') @ (S', T) product
            sums = torch.exp(x - m) @ self.membership.to(x.dtype).t()
            return m + torch.log(sums.clamp_min(FLOOR))
        e = torch.exp(x - m).reshape(b, x.shape[1], -1)  # (B, S', R)
        sums = torch.matmul(self.membership.to(e.dtype), e)  # (B, T, R)
        out = m.reshape(b, 1, -1) + torch.log(sums.clamp_min(FLOOR))
        return out.reshape(b, len(self.target_names), *rest)


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
