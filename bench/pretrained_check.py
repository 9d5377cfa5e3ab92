"""Accuracy of the imported pretrained networks on the SemanticKITTI frames in ../shared/data.

    PYTHONPATH=$PWD v/bin/python bench/pretrained_check.py range [--knn] [--projection repo|upstream]
        [--blocks-from-config] [--frames 10] [--sequences 00 01 02 03 04 05] [--threads 1]
    PYTHONPATH=$PWD v/bin/python bench/pretrained_check.py image [--size pad | --size 1024x320] ...

range: 3D-MiniNet, 19-class SemanticKITTI mIoU over all points (every labelled point of every
scan; ignored: unlabeled / outlier / other-structure / other-object, as the benchmark). A point's
label is the argmax of its range-image cell, class 0 ("unlabeled") left out of the argmax; --knn
uses lidar-bonnetal's KNN vote instead (arch_cfg.yaml's post.KNN settings). --projection upstream
builds the range image the way upstream's LaserScan does (float32 angles, farthest-to-nearest
overwrite, its mask bug that drops the cell of point 0) instead of pl3d_ros.geometry, to show
whether the difference matters. --blocks-from-config builds the network with arch_cfg.yaml's
block counts and drops the weights that do not fit, which is what upstream's strict=False load
does. These frames were in the network's training set: the figure is training-set accuracy.

image: ESPNetv2 (Cityscapes), 2D accuracy at the LiDAR points that project into image_2 and have
ground truth: the 20 logits sampled bilinearly at each point's pixel, then mapped to xmuda10 by
log-sum-exp (pl3d_ros.models.class_map). --size pad: the full image, padded right/bottom to a
multiple of 16 with the mean colour (0 after normalisation); --size WxH: the whole image resized
(PIL bilinear, as EdgeNets' Resize) to W x H; --size cover:WxH: the project's pipeline
preprocessing (antialiased resize to cover W x H keeping the aspect, centre crop, camera adjusted;
points outside the crop are not scored).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np
import torch

from pl3d_ros.eval.metrics import ConfusionMatrix
from PIL import Image

from pl3d_ros.geometry import project_points, range_image_channels, range_projection
from pl3d_ros.io.kitti import KittiSequence
from pl3d_ros.labels import load_class_set
from pl3d_ros.models.class_map import build_class_map
from pl3d_ros.models.espnetv2 import IMAGE_MEAN, SIZE_MULTIPLE, load_espnetv2
from pl3d_ros.models.mininet3d import (MiniNet3D, load_mininet3d, read_lidar_bonnetal_weights)
from pl3d_ros.models.points import sample_pixels
from pl3d_ros.models.range_knn import knn_labels
from pl3d_ros.inputs import fit_camera, resize_crop

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def accuracy(cm: ConfusionMatrix) -> float:
    """Overall point accuracy in %."""
    return 100.0 * float(np.trace(cm.matrix)) / max(cm.total, 1)


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


def run_range(args: argparse.Namespace) -> None:
    folder = Path(args.model or SHARED / "pretrained/3dmininet-tiny-semantickitti")
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
                rows, cols = proj.rows, proj.cols
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
    print(f"19-class all-points mIoU: {cm.miou():.2f} %   (overall accuracy {accuracy(cm):.2f} %)")
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


def prepare_image(rgb: np.ndarray, size: str) -> tuple[torch.Tensor, tuple[float, float]]:
    """(H0, W0, 3) uint8 -> (1, 3, h, w) float RGB in [0, 1] and the (sx, sy) pixel scale."""
    h0, w0 = rgb.shape[:2]
    if size == "pad":
        h = -(-h0 // SIZE_MULTIPLE) * SIZE_MULTIPLE
        w = -(-w0 // SIZE_MULTIPLE) * SIZE_MULTIPLE
        out = np.empty((h, w, 3), np.float32)
        out[:] = IMAGE_MEAN  # normalises to 0, like the convolutions' own zero padding
        out[:h0, :w0] = rgb.astype(np.float32) / 255.0
        return torch.from_numpy(out).permute(2, 0, 1)[None].contiguous(), (1.0, 1.0)
    w, h = (int(v) for v in size.split("x"))
    resized = np.asarray(Image.fromarray(rgb).resize((w, h), Image.BILINEAR), np.float32) / 255.0
    return torch.from_numpy(resized).permute(2, 0, 1)[None].contiguous(), (w / w0, h / h0)


def run_image(args: argparse.Namespace) -> None:
    path = Path(args.model or SHARED / "pretrained/espnetv2-cityscapes/espnetv2_s_2.0_city_1024x512.pth")
    model = load_espnetv2(path)
    classes = load_class_set("xmuda10")
    cmap = build_class_map("cityscapes", classes)
    print(f"ESPNetv2 s={model.scale} from {path.name}; input {args.size}; classes -> xmuda10 "
          f"(left out: {', '.join(cmap.unmapped_sources)}; no source: {', '.join(cmap.empty_targets)})")
    cm = ConfusionMatrix(classes.num_classes)
    times: dict[str, list[float]] = {"prepare": [], "network": [], "labels": []}
    shapes = set()
    for seq_name in args.sequences:
        seq = KittiSequence(Path(args.data) / seq_name)
        for i in range(min(args.frames, len(seq))):
            points, raw, rgb = seq.read(i)
            camera = seq.camera(rgb.shape[1], rgb.shape[0])
            t0 = time.perf_counter()
            if args.size.startswith("cover:"):
                # the project's own path (pipeline.Segmenter): resize to cover, centre-crop,
                # camera adjusted; points outside the crop are out of view
                w, h = (int(v) for v in args.size[6:].split("x"))
                camera, size, offset = fit_camera(camera, w, h)
                image, (sx, sy) = resize_crop(rgb, size, offset, (w, h)).contiguous(), (1.0, 1.0)
            else:
                image, (sx, sy) = prepare_image(rgb, args.size)
            t1 = time.perf_counter()
            proj = project_points(points, camera)
            gt = classes.to_train_ids(raw)[proj.in_view]
            shapes.add(tuple(image.shape[2:]))
            t1b = time.perf_counter()
            with torch.no_grad():
                logits = model(image)
            t2 = time.perf_counter()
            with torch.no_grad():
                uv = torch.from_numpy(proj.uv[proj.in_view]).float()
                uv = torch.stack([(uv[:, 0] + 0.5) * sx - 0.5, (uv[:, 1] + 0.5) * sy - 0.5], 1)
                # sample the 20 source logits at the points, then map (N, 20) -> (N, 10): mapping
                # the whole logit image first costs ~0.5 s per frame on one core
                pred = cmap(sample_pixels(logits, uv)).argmax(1).numpy()
            t3 = time.perf_counter()
            cm.update(pred, gt)
            times["prepare"].append(t1 - t0)
            times["network"].append(t2 - t1b)
            times["labels"].append(t3 - t2)
            print(f"  {seq_name}/{seq.frame_ids[i]}: {image.shape[3]}x{image.shape[2]}, "
                  f"{proj.num_in_view} points in view, running mIoU {cm.miou():.1f} %, "
                  f"network {1000 * (t2 - t1b):.0f} ms", flush=True)
    frames = len(times["network"])
    print(f"\n{frames} images, input sizes (h, w) {sorted(shapes)}, {cm.total} labelled points in view")
    print(f"xmuda10 2D mIoU at points: {cm.miou():.2f} %   (overall accuracy {accuracy(cm):.2f} %)")
    scored = (cm.matrix.sum(1) > 0) & np.array([t not in cmap.empty_targets for t in classes.names])
    print(f"  mIoU over the {int(scored.sum())} classes with ground-truth points and a source class: "
          f"{100 * float(np.mean(cm.iou()[scored])):.2f} %")
    for (name, v), n in zip(cm.iou_dict(classes.names).items(), cm.matrix.sum(1)):
        print(f"  {name:<14} {'-' if v is None else f'{v:6.2f}'}   ({n} points)")
    ms = {k: 1000 * np.median(v) for k, v in times.items()}
    print("median time per image (ms, torch %d thread%s): " % (args.threads, "" if args.threads == 1 else "s")
          + ", ".join(f"{k} {v:.0f}" for k, v in ms.items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="branch", required=True)
    for name in ("range", "image"):
        p = sub.add_parser(name)
        p.add_argument("--model", help="lidar-bonnetal folder (range) / EdgeNets .pth (image); "
                       "default: the one in ../shared/pretrained")
        p.add_argument("--data", default=str(SHARED / "data/semantickitti-mini/sequences"))
        p.add_argument("--sequences", nargs="+", default=["00", "01", "02", "03", "04", "05"])
        p.add_argument("--frames", type=int, default=10, help="frames per sequence")
        p.add_argument("--threads", type=int, default=1)
        if name == "range":
            p.add_argument("--knn", action="store_true", help="KNN post-processing instead of cell lookup")
            p.add_argument("--projection", choices=["repo", "upstream"], default="repo")
            p.add_argument("--blocks-from-config", action="store_true")
        else:
            p.add_argument("--size", default="pad", help="'pad' (full image padded to a multiple of "
                           f"{SIZE_MULTIPLE}) or WxH to resize to (multiples of {SIZE_MULTIPLE})")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    (run_range if args.branch == "range" else run_image)(args)


if __name__ == "__main__":
    main()
