"""``pl3d import``: a two-stream checkpoint composed from pretrained networks.

    range  a lidar-bonnetal model folder with a 3D-MiniNet (arch_cfg.yaml, data_cfg.yaml,
           backbone, segmentation_decoder, segmentation_head): ``import_range``
    image  an EdgeNets ESPNetv2 segmentation state dict (Cityscapes): ``import_image``
    base   an existing pl3d_ros checkpoint that supplies the branch not imported

Upstream weight files are read with ``torch.load(weights_only=True)`` and must be plain tensor
state dicts (models/pretrained.py); every tensor is loaded strictly. The header records each
imported branch's sizes, input normalisation, classes and class map, and its provenance: file
names and sha256 of the upstream files, and a licence note. The weights stay where the user has
them; nothing is bundled.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pl3d_ros import __version__
from pl3d_ros.config import ModelConfig, RangeImageConfig
from pl3d_ros.labels import ClassSet
from pl3d_ros.models.checkpoint import BranchSpec, CheckpointError, CheckpointHeader
from pl3d_ros.models.class_map import SOURCE_CLASSES, build_class_map
from pl3d_ros.models.espnetv2 import CITYSCAPES_CLASSES, IMAGE_MEAN, IMAGE_STD, load_espnetv2
from pl3d_ros.models.imported import IMAGE_CHANNELS, MININET_SIZES
from pl3d_ros.models.mininet3d import ARCH_FILE, CHANNELS, DATA_FILE, WEIGHT_FILES, load_mininet3d
from pl3d_ros.models.pretrained import PretrainedError
from pl3d_ros.models.two_stream import TwoStreamNet, build_from_header

__all__ = ["DEFAULT_IMAGE_SIZE", "ImportedPart", "compose", "import_image", "import_range", "parse_size"]

#: Image input of an imported ESPNetv2 unless --image-size says otherwise. 1024x320 scores ~4
#: points more 2D mIoU on KITTI than 640x192 (bench/pretrained_check.py image: 32.3 vs 28.6 %)
#: but costs 3.3x the image-branch time (ONNX Runtime, 1 thread: 320 vs 96 ms) while the
#: 3D-MiniNet range branch alone takes ~150 ms of a ~100-150 ms CPU budget; and fused it scores
#: less (KITTI 04 + 05, in view: 38.4 vs 41.7 %, README). 640x192 is also the `cpu` preset's input.
DEFAULT_IMAGE_SIZE = (640, 192)

#: Licence notes by the label space the weights were trained in (what the source classes say);
#: ``--range-licence`` / ``--image-licence`` replace them for weights with other terms.
LICENCE_NOTES = {
    "semantickitti": "weights trained on SemanticKITTI (CC BY-NC-SA 4.0): non-commercial use, "
                     "share-alike; research use only, not for a product",
    "cityscapes": "weights trained on Cityscapes (its terms: non-commercial purposes only); "
                  "research use only, not for a product",
}


@dataclass
class ImportedPart:
    """One imported branch: its header entry, the loaded network (in its source label space),
    the sensor its range images need (range branches) and a line for the user."""

    spec: BranchSpec
    net: nn.Module
    summary: str
    sensor: RangeImageConfig | None = None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _source_space(names: tuple[str, ...], where: str) -> str:
    """The label space ("semantickitti", "cityscapes") whose classes are exactly ``names``."""
    for space, classes in SOURCE_CLASSES.items():
        if tuple(names) == classes:
            return space
    raise PretrainedError(f"{where}: its {len(names)} classes {list(names)[:6]}... are no label space "
                          f"with a class map ({', '.join(SOURCE_CLASSES)})")


def _code_licence(folder: Path) -> str:
    """'FILE: first line' of a LICENSE* file beside the weights, else ''."""
    for path in sorted(folder.glob("LICEN[CS]E*")):
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
        return f"{path.name}: {lines[0]}" if lines else path.name
    return ""


def _parameters(net: nn.Module) -> str:
    return f"{sum(p.numel() for p in net.parameters()) / 1e6:.2f} M parameters"


def import_range(folder: str | Path, class_set: ClassSet, licence: str | None = None) -> ImportedPart:
    """A 3D-MiniNet range branch from a lidar-bonnetal folder (strict load, block counts from
    the weights: models/mininet3d.load_mininet3d)."""
    folder = Path(folder)
    net = load_mininet3d(folder)
    space = _source_space(net.class_names, str(folder / DATA_FILE))
    cmap = build_class_map(space, class_set)
    notes = [f"{n} (the weights' count is used)" for n in net.config_notes]
    if net.knn.use:
        notes.append("arch_cfg.yaml post.KNN.use is true: pl3d_ros labels each point from its range-image "
                     "cell and fuses probabilities with the image branch; the KNN label vote is not applied")
    spec = BranchSpec(
        arch="mininet3d",
        params={k: getattr(net.cfg, k) for k in MININET_SIZES},
        normalisation={"channels": list(CHANNELS), "mean": list(net.spec.means), "std": list(net.spec.stds)},
        source_classes=list(net.class_names),
        class_map={t: list(s) for t, s in cmap.sources.items()},
        source={"format": "lidar-bonnetal", "folder": folder.name, "sensor": net.spec.sensor,
                "variant": net.cfg.variant, "label_space": space,
                "sha256": {name: sha256_file(folder / name) for name in (*WEIGHT_FILES, ARCH_FILE, DATA_FILE)},
                "licence": licence or LICENCE_NOTES[space], "code_licence": _code_licence(folder)},
        notes=notes,
    )
    s = net.spec
    summary = (f"range: 3D-MiniNet-{net.cfg.variant} from {folder} ({_parameters(net)}); sensor {s.sensor} "
               f"{s.rows}x{s.cols}, fov {s.fov_up_deg:+g} / {s.fov_down_deg:+g} deg; {space} -> "
               f"{class_set.name} (left out: {', '.join(cmap.unmapped_sources) or 'none'})")
    return ImportedPart(spec, net, summary, s.range_image_config())


def import_image(path: str | Path, class_set: ClassSet, licence: str | None = None) -> ImportedPart:
    """An ESPNetv2 image branch from an EdgeNets Cityscapes state dict (width s read from it)."""
    path = Path(path)
    net = load_espnetv2(path)
    if net.num_classes != len(CITYSCAPES_CLASSES):
        raise PretrainedError(f"{path}: {net.num_classes} outputs; only Cityscapes ESPNetv2 models "
                              f"({len(CITYSCAPES_CLASSES)} outputs: 19 classes + background) have a class map")
    cmap = build_class_map("cityscapes", class_set)
    spec = BranchSpec(
        arch="espnetv2",
        params={"scale": float(net.scale)},
        normalisation={"channels": list(IMAGE_CHANNELS), "mean": list(IMAGE_MEAN), "std": list(IMAGE_STD)},
        source_classes=list(CITYSCAPES_CLASSES),
        class_map={t: list(s) for t, s in cmap.sources.items()},
        source={"format": "EdgeNets state dict", "file": path.name, "sha256": sha256_file(path),
                "label_space": "cityscapes", "licence": licence or LICENCE_NOTES["cityscapes"],
                "code_licence": _code_licence(path.parent)},
        notes=[],
    )
    summary = (f"image: ESPNetv2 s={net.scale} from {path} ({_parameters(net)}); cityscapes -> "
               f"{class_set.name} (left out: {', '.join(cmap.unmapped_sources)}; no source: "
               f"{', '.join(cmap.empty_targets) or 'none'})")
    return ImportedPart(spec, net, summary)


def parse_size(text: str) -> tuple[int, int]:
    """'640x192' -> (640, 192)."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"image size must be WIDTHxHEIGHT, e.g. 640x192; got {text!r}") from None
    if w <= 0 or h <= 0:
        raise ValueError(f"image size must be positive, got {text!r}")
    return w, h


def compose(class_set: ClassSet, *, range_part: ImportedPart | None = None,
            image_part: ImportedPart | None = None,
            base: tuple[TwoStreamNet, CheckpointHeader] | None = None,
            image_size: tuple[int, int] | None = None,
            training: dict[str, Any] | None = None) -> tuple[TwoStreamNet, CheckpointHeader]:
    """The two-stream network and header of imported parts, the missing one from ``base``.

    image_size: (w, h) of the image input; default ``DEFAULT_IMAGE_SIZE`` for an imported image
    branch, the base's size for the base's image branch. The sensor is the imported range
    branch's (its arch_cfg.yaml), else the base's.

    Raises:
        CheckpointError: a branch has no source, the base's class set differs, or the composed
            header is invalid (e.g. an image size ESPNetv2 cannot take).
    """
    if base is None and (range_part is None or image_part is None):
        raise CheckpointError("import needs both branches: give the missing one from an existing checkpoint")
    if base is not None and range_part is not None and image_part is not None:
        raise CheckpointError("both branches are imported: the base checkpoint would supply nothing")
    base_net, base_header = base if base is not None else (None, None)
    if base_header is not None and base_header.class_set.name != class_set.name:
        raise CheckpointError(f"the base checkpoint predicts class set {base_header.class_set.name!r}, "
                              f"not {class_set.name!r}")
    branches, archs, widths = {}, {}, {}
    for kind, part in (("image", image_part), ("range", range_part)):
        if part is not None:
            branches[kind], archs[kind], widths[kind] = part.spec, part.spec.arch, []
        else:
            archs[kind] = getattr(base_header.model, f"{kind}_arch")
            widths[kind] = list(getattr(base_header.model, f"{kind}_widths"))
            if kind in base_header.branches:
                branches[kind] = base_header.branches[kind]
    if image_size is None:
        m = base_header.model if image_part is None else None
        image_size = (m.image_width, m.image_height) if m is not None else DEFAULT_IMAGE_SIZE
    model = ModelConfig(preset="imported", image_width=image_size[0], image_height=image_size[1],
                        image_widths=widths["image"], range_widths=widths["range"],
                        image_arch=archs["image"], range_arch=archs["range"])
    sensor = range_part.sensor if range_part is not None else base_header.sensor
    header = CheckpointHeader(model, class_set, sensor, dict(training or {}), branches).validate("imported model")
    net = build_from_header(header)
    # Strict copies: the header-built modules must hold exactly the loaded tensors.
    for kind, part in (("image", image_part), ("range", range_part)):
        target = getattr(net, kind)
        if part is not None:
            target.net.load_state_dict(part.net.state_dict(), strict=True)
        else:
            target.load_state_dict(getattr(base_net, kind).state_dict(), strict=True)
    return net.eval(), header


def import_record(range_dir: str | None, image_file: str | None, base: str | None,
                  base_header: CheckpointHeader | None) -> dict[str, Any]:
    """The header's ``training`` entry of an imported checkpoint: what it was made from."""
    record: dict[str, Any] = {"import": {"range": range_dir, "image": image_file, "from": base,
                                         "pl3d_ros": __version__, "unix_s": round(time.time())}}
    if base_header is not None:
        record["from_training"] = base_header.training
    return record


@torch.no_grad()
def same_outputs(a: nn.Module, b: nn.Module, header: CheckpointHeader, seed: int = 0) -> bool:
    """Whether two networks give identical outputs (all four of forward_features) on one random
    input of the header's shapes (range image with empty cells), e.g. before and after a save."""
    g = torch.Generator().manual_seed(seed)
    shapes = header.input_shapes
    image = torch.rand(*shapes["image"], generator=g)
    rng = torch.rand(*shapes["range_image"], generator=g) * 30.0
    rng = rng * (torch.rand(1, 1, *shapes["range_image"][2:], generator=g) > 0.3)
    outs = [m.eval().forward_features(image, rng) for m in (a, b)]
    return all(torch.equal(x, y) for x, y in zip(*outs))
