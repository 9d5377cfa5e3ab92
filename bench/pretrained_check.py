"""Accuracy of the imported 3D-MiniNet on the SemanticKITTI frames in ../shared/data.

    PYTHONPATH=$PWD v/bin/python bench/pretrained_check.py [--knn] [--projection repo|upstream]
        [--blocks-from-config] [--frames 10] [--sequences 00 01 02 03 04 05] [--threads 1]

19-class SemanticKITTI mIoU over all points (every labelled point of every scan, ignore =
unlabeled / outlier / other-structure / other-object, as the benchmark). A point's label is the
argmax of its range-image cell, class 0 ("unlabeled") left out of the argmax; --knn uses
lidar-bonnetal's KNN vote instead (arch_cfg.yaml's post.KNN settings).

--projection upstream builds the range image the way upstream's LaserScan does (float32 angles,
farthest-to-nearest overwrite, its mask bug that drops the cell of point 0) instead of
pl3d_ros.geometry, to show whether the difference matters. --blocks-from-config builds the
network with arch_cfg.yaml's block counts and drops the weights that do not fit, which is what
upstream's strict=False load does.

These frames were in the network's training set: the figure is training-set accuracy.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np
import torch

from pl3d_ros.eval.metrics import ConfusionMatrix
from pl3d_ros.geometry import range_image_channels, range_projection
from pl3d_ros.io.kitti import KittiSequence
from pl3d_ros.labels import load_class_set
from pl3d_ros.models.mininet3d import (MiniNet3D, load_mininet3d, read_lidar_bonnetal_weights)
from pl3d_ros.models.range_knn import knn_labels

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def upstream_range_image(points: np.ndarray, rows: int, cols: int, fov_up_deg: float,
                         fov_down_deg: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Range image as upstream's LaserScan.do_range_projection + parser builds it.

    Returns (5, rows, cols) float32 (empty = 0), and per-point (row, col) int64.
    """
    xyz = points[:, :3].astype(np.float32)
    rem = points[:, 3].astype(np.float32)
    fov_up, fov_down = fov_up_deg / 180.0 * np.pi, fov_down_deg / 180.0 * np.pi
    fov = abs(fov_down) + abs(fov_up)
    depth = np.linalg.norm(xyz, 2, axis=1)
    yaw = -np.arctan2(xyz[:, 1], xyz[:, 0])
    pitch = np.arcsin(xyz[:, 2] / depth)
    px = np.clip(np.floor(0.5 * (yaw / np.pi + 1.0) * cols), 0, cols - 1).astype(np.int64)
    py = np.clip(np.floor((1.0 - (pitch + abs(fov_down)) / fov) * rows), 0, rows - 1).astype(np.int64)
    order = np.argsort(depth)[::-1]  # farthest first: the nearest point is written last
    img = np.full((5, rows, cols), -1.0, np.float32)
    idx = np.full((rows, cols), -1, np.int64)
    vals = np.concatenate([depth[:, None], xyz, rem[:, None]], axis=1)
    img[:, py[order], px[order]] = vals[order].T
    idx[py[order], px[order]] = order
    mask = idx > 0  # upstream's test: the cell won by point 0 counts as empty
    return img * mask, py, px


def build_config_blocks_model(folder: Path) -> MiniNet3D:
    """arch_cfg.yaml's block counts, the weights that fit loaded (upstream's strict=False)."""
    model = load_mininet3d(folder)  # for cfg / spec / names; then rebuild smaller
    import yaml

    arch = yaml.safe_load((folder / "arch_cfg.yaml").read_text())
    cfg = dataclasses.replace(model.cfg, enc_blocks_1=int(arch["backbone"]["block_1"]),
                              enc_blocks_2=int(arch["backbone"]["block_2"]),
                              dec_blocks_1=int(arch["decoder"]["block_1"]),
                              dec_blocks_2=int(arch["decoder"]["block_2"]))
    small = MiniNet3D(cfg, model.spec, model.class_names, model.knn)
    weights = read_lidar_bonnetal_weights(folder)
    for fname, attr in (("backbone", "backbone"), ("segmentation_decoder", "decoder"), ("segmentation_head", "head")):
        sub = getattr(small, attr)
        own = sub.state_dict()
        sub.load_state_dict({k: v for k, v in weights[fname].items() if k in own}, strict=True)
        dropped = [k for k in weights[fname] if k not in own]
        print(f"  {fname}: dropped {len(dropped)} tensors (as upstream's strict=False load)")
    return small.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(SHARED / "pretrained/3dmininet-tiny-semantickitti"))
    ap.add_argument("--data", default=str(SHARED / "data/semantickitti-mini/sequences"))
    ap.add_argument("--sequences", nargs="+", default=["00", "01", "02", "03", "04", "05"])
    ap.add_argument("--frames", type=int, default=10, help="frames per sequence")
    ap.add_argument("--knn", action="store_true", help="KNN post-processing instead of cell lookup")
    ap.add_argument("--projection", choices=["repo", "upstream"], default="repo")
    ap.add_argument("--blocks-from-config", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    folder = Path(args.model)
    model = build_config_blocks_model(folder) if args.blocks_from_config else load_mininet3d(folder)
    print(f"3D-MiniNet-{model.cfg.variant}: {model.cfg}")
    if model.config_notes:
        print(f"  note: {'; '.join(model.config_notes)}")
    classes = load_class_set("semantickitti19")
    if tuple(model.class_names[1:]) != classes.names:
        raise SystemExit(f"model classes {model.class_names[1:]} != semantickitti19 {classes.names}")
    spec, sensor = model.spec, model.spec.range_image_config()
    cm = ConfusionMatrix(classes.num_classes)
    times: dict[str, list[float]] = {"project": [], "network": [], "labels": []}
    zero_cells = occupied_cells = 0

    for seq_name in args.sequences:
        seq = KittiSequence(Path(args.data) / seq_name)
        for i in range(min(args.frames, len(seq))):
            points, raw, _ = seq.read(i)
            t0 = time.perf_counter()
            if args.projection == "repo":
                proj = range_projection(points, sensor)
                image = range_image_channels(points, proj)
                rows, cols = proj.rows.astype(np.int64), proj.cols.astype(np.int64)
                point_range = proj.range
            else:
                image, rows, cols = upstream_range_image(points, spec.rows, spec.cols,
                                                         spec.fov_up_deg, spec.fov_down_deg)
                point_range = np.linalg.norm(points[:, :3], axis=1).astype(np.float32)
            t1 = time.perf_counter()
            with torch.no_grad():
                logits = model(torch.from_numpy(image)[None])[0]
            t2 = time.perf_counter()
            occupied = image[0] > 0
            full_argmax = logits.argmax(0).numpy()
            zero_cells += int(np.count_nonzero((full_argmax == 0) & occupied))
            occupied_cells += int(np.count_nonzero(occupied))
            # "unlabeled" is not a class of the benchmark: argmax over classes 1..19.
            cell_pred = logits[1:].argmax(0) + 1
            if args.knn:
                k = model.knn
                pred = knn_labels(torch.from_numpy(image[0]), cell_pred, torch.from_numpy(point_range),
                                  torch.from_numpy(rows), torch.from_numpy(cols), model.cfg.num_classes,
                                  knn=k.knn, search=k.search, sigma=k.sigma, cutoff=k.cutoff).numpy()
            else:
                pred = cell_pred.numpy()[rows, cols]
            t3 = time.perf_counter()
            cm.update(pred - 1, classes.to_train_ids(raw))  # model id c -> semantickitti19 id c - 1
            times["project"].append(t1 - t0)
            times["network"].append(t2 - t1)
            times["labels"].append(t3 - t2)
            print(f"  {seq_name}/{seq.frame_ids[i]}: {points.shape[0]} points, running mIoU "
                  f"{cm.miou():.1f} %, network {1000 * (t2 - t1):.0f} ms", flush=True)

    frames = len(times["network"])
    print(f"\n{frames} frames, {cm.total} labelled points, projection {args.projection}, labels by "
          f"{'KNN (k=%d, S=%d)' % (model.knn.knn, model.knn.search) if args.knn else 'range cell'}")
    print(f"19-class all-points mIoU: {cm.miou():.2f} %   (overall accuracy {cm.accuracy():.2f} %)")
    present = cm.matrix.sum(1) > 0
    iou = cm.iou()
    print(f"  mIoU over the {int(present.sum())} classes with ground-truth points: "
          f"{100 * float(np.mean(iou[present])):.2f} % (the line above also averages classes only "
          f"predicted, IoU 0)")
    gt_points = cm.matrix.sum(1)
    for (name, v), n in zip(cm.iou_dict(classes.names).items(), gt_points):
        print(f"  {name:<14} {'-' if v is None else f'{v:6.2f}'}   ({n} points)")
    print(f"occupied cells whose full 20-class argmax is 'unlabeled': {100 * zero_cells / max(occupied_cells, 1):.3f} %")
    ms = {k: 1000 * np.median(v) for k, v in times.items()}
    print("median time per frame (ms, torch %d thread%s): " % (args.threads, "" if args.threads == 1 else "s")
          + ", ".join(f"{k} {v:.0f}" for k, v in ms.items()))


if __name__ == "__main__":
    main()
