"""Supervised source training of the two-stream network (``pl3d train``).

Each branch is trained with class-weighted cross-entropy on the labeled points it sees: the range
branch on every point (logits of the point's range-image cell, as at inference), the image branch
on the points in the camera's view (logits sampled bilinearly at the point's pixel). Class weights
are 1 / log(1.2 + frequency) of the training points (ENet / xMUDA), normalised to mean 1.

Determinism: epoch e draws its shuffling and augmentations from Generator([seed, e]) and seeds
torch with (seed, e), so a run resumed at an epoch boundary is the run that never stopped.
Resuming: after every epoch the checkpoint (weights + header) and a training-state file beside it
(optimizer moments, epoch, history; safetensors + JSON, no pickle) are written atomically.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pl3d_ros.atomic_write import atomic_write
from pl3d_ros.config import ModelConfig, RangeImageConfig
from pl3d_ros.eval.metrics import IGNORE, ConfusionMatrix
from pl3d_ros.frame import Frame
from pl3d_ros.geometry import project_points, range_image_channels, range_projection
from pl3d_ros.inputs import NetworkInputs, PointOutputs, point_outputs
from pl3d_ros.labels import ClassSet
from pl3d_ros.models.checkpoint import CheckpointError, CheckpointHeader, load_checkpoint, save_checkpoint
from pl3d_ros.models.two_stream import TwoStreamNet, build_model
from pl3d_ros.train.augment import AugmentConfig, augment_points, crop_image, jitter_colour, random_crop

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    epochs: int = 40
    batch_size: int = 2
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 20
    seed: int = 0
    val_every: int = 5  # epochs; the last epoch is always validated
    time_limit_min: float = 0.0  # stop after the epoch that crosses it (0 = none)
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class Sample:
    """One augmented training frame: its network inputs and per-point targets.

    target (N,) int64 train ids of every point (IGNORE = unlabeled); target_2d (M,) those of the
    in-view points.
    """

    inputs: NetworkInputs
    target: torch.Tensor
    target_2d: torch.Tensor


def make_sample(frame: Frame, train_ids: np.ndarray, model: ModelConfig, sensor: RangeImageConfig,
                aug: AugmentConfig, rng: np.random.Generator) -> Sample:
    """Augment one frame (see augment.py) and build its inputs and targets."""
    w, h = model.image_width, model.image_height
    crop = random_crop(frame.camera, w, h, aug, rng)
    proj = project_points(frame.points, crop.camera)
    uv = proj.uv[proj.in_view].copy()
    if crop.flip:
        uv[:, 0] = (w - 1) - uv[:, 0]
    image = jitter_colour(crop_image(frame.image, crop, w, h), aug, rng)
    pts = augment_points(frame.points, aug, rng)
    rp = range_projection(pts, sensor)
    rimg = range_image_channels(pts, rp)
    target = torch.from_numpy(train_ids.astype(np.int64))
    in_view = torch.from_numpy(proj.in_view)
    inputs = NetworkInputs(image.contiguous()[None], torch.from_numpy(np.ascontiguousarray(rimg, np.float32))[None],
                           torch.from_numpy(rp.rows), torch.from_numpy(rp.cols),
                           torch.from_numpy(uv), in_view, crop.camera)
    return Sample(inputs, target, target[in_view])


def class_weights(train_ids: Sequence[np.ndarray], num_classes: int) -> torch.Tensor:
    """(C,) 1 / log(1.2 + frequency), mean 1 over the classes present; 0 for absent classes."""
    counts = np.zeros(num_classes, np.float64)
    for t in train_ids:
        counts += np.bincount(t[t != IGNORE].astype(np.int64), minlength=num_classes)[:num_classes]
    freq = counts / max(counts.sum(), 1.0)
    w = np.where(counts > 0, 1.0 / np.log(1.2 + freq), 0.0)
    present = counts > 0
    if present.any():
        w[present] /= w[present].mean()
    return torch.tensor(w, dtype=torch.float32)


def point_logits(model: TwoStreamNet, batch: list[Sample], device: torch.device) -> list[PointOutputs]:
    """Forward a batch (one stacked forward); -> per sample its per-point logits."""
    inputs = [s.inputs.to(device) for s in batch]
    logits_2d, logits_3d = model(torch.cat([i.image for i in inputs]), torch.cat([i.range_image for i in inputs]))
    return [point_outputs(i, logits_2d[b:b + 1], logits_3d[b:b + 1]) for b, i in enumerate(inputs)]


def state_path(checkpoint: Path) -> Path:
    return checkpoint.with_name(checkpoint.name + ".train-state")


def save_train_state(path: Path, optimizer: torch.optim.Optimizer, meta: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{k}"] = v
    info = {"meta": meta, "param_groups": sd["param_groups"], "scalars": scalars}
    metadata = {"pl3d_train": json.dumps(info)}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def load_train_state(path: Path, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            info = json.loads(f.metadata()["pl3d_train"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise CheckpointError(f"training state {path} is unreadable: {exc}") from exc
    state: dict[int, dict[str, Any]] = {}
    for key, value in list(tensors.items()) + list(info["scalars"].items()):
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": info["param_groups"]})
    return info["meta"]


# -- the loop ----------------------------------------------------------------------------------

def _lr(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to 1% of the base rate (stateless, so resumable)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def train(frames: list[Frame], out: str | Path, class_set: ClassSet, model_cfg: ModelConfig,
          sensor: RangeImageConfig, cfg: TrainConfig, *,
          validate: Callable[[TwoStreamNet, CheckpointHeader], dict[str, float]] | None = None,
          data_summary: dict[str, Any] | None = None, resume: bool = False,
          device: str | torch.device | None = None, progress: bool = True,
          init: tuple[TwoStreamNet, CheckpointHeader] | None = None) -> dict[str, Any]:
    """Train, checkpointing after every epoch; returns the history.

    frames: labeled Frames (raw ids, mapped with ``class_set``). validate(model, header) -> mIoU
    dict, called every ``cfg.val_every`` epochs and after the last one. init: (network, header)
    to fine-tune instead of a fresh unet network (``pl3d train --init``, e.g. an imported model);
    its header's model and sensor must be ``model_cfg`` / ``sensor``, and its branches (imported
    sizes, class maps, provenance) are kept in the written checkpoints.
    """
    from tqdm import tqdm

    out = Path(out)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    train_ids = [class_set.to_train_ids(f.labels) for f in frames]
    weights = class_weights(train_ids, class_set.num_classes).to(device)
    torch.manual_seed(cfg.seed)
    if init is not None:
        init_model, init_header = init
        if (init_header.model, init_header.sensor, init_header.class_set.name) != (model_cfg, sensor, class_set.name):
            raise ValueError("train(init=...): model_cfg, sensor and class_set must be the init checkpoint's")
        header = CheckpointHeader(model_cfg, class_set, sensor, {}, dict(init_header.branches))
        model = copy.deepcopy(init_model).to(device)
    else:
        header = CheckpointHeader(model_cfg, class_set, sensor, {})
        model = build_model(model_cfg, class_set.num_classes).to(device)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    steps_per_epoch = math.ceil(len(frames) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    history: list[dict[str, Any]] = []
    start_epoch, elapsed0 = 0, 0.0
    if resume and out.is_file() and state_path(out).is_file():
        loaded, _ = load_checkpoint(out, class_set=class_set.name, sensor=sensor)
        model.load_state_dict(loaded.state_dict())
        meta = load_train_state(state_path(out), optimizer)
        start_epoch, history, elapsed0 = meta["epoch"] + 1, meta["history"], meta["elapsed_s"]
        log.info("resuming %s after epoch %d", out, meta["epoch"])
    t_start = time.perf_counter() - elapsed0

    for epoch in range(start_epoch, cfg.epochs):
        rng = np.random.default_rng([cfg.seed, epoch])
        torch.manual_seed(cfg.seed * 100_003 + epoch)
        order = rng.permutation(len(frames))
        model.train()
        cm_3d, cm_2d = ConfusionMatrix(class_set.num_classes), ConfusionMatrix(class_set.num_classes)
        losses = []
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step",
                   disable=not progress, dynamic_ncols=True)
        for step_in_epoch in bar:
            idx = order[step_in_epoch * cfg.batch_size:(step_in_epoch + 1) * cfg.batch_size]
            batch = [make_sample(frames[i], train_ids[i], model_cfg, sensor, cfg.augment, rng) for i in idx]
            step = epoch * steps_per_epoch + step_in_epoch
            for g in optimizer.param_groups:
                g["lr"] = _lr(step, total_steps, cfg)
            loss = torch.zeros((), device=device)
            for s, po in zip(batch, point_logits(model, batch, device)):
                l3, l2 = po.logits_3d, po.logits_2d
                t3, t2 = s.target.to(device), s.target_2d.to(device)
                loss = loss + F.cross_entropy(l3, t3, weight=weights, ignore_index=IGNORE)
                if len(t2) and (t2 != IGNORE).any():
                    loss = loss + F.cross_entropy(l2, t2, weight=weights, ignore_index=IGNORE)
                cm_3d.update(l3.argmax(1).cpu().numpy(), s.target.numpy())
                cm_2d.update(l2.argmax(1).cpu().numpy(), s.target_2d.numpy())
            loss = loss / len(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{np.mean(losses[-10:]):.3f}", miou3d=f"{cm_3d.miou():.1f}",
                            miou2d=f"{cm_2d.miou():.1f}")
        bar.close()
        record: dict[str, Any] = {"epoch": epoch + 1, "loss": round(float(np.mean(losses)), 4),
                                  "train_miou": {"3d": round(cm_3d.miou(), 2), "2d": round(cm_2d.miou(), 2)},
                                  "elapsed_s": round(time.perf_counter() - t_start, 1)}
        out_of_time = cfg.time_limit_min > 0 and record["elapsed_s"] > cfg.time_limit_min * 60
        last = epoch + 1 == cfg.epochs or out_of_time
        model.eval()
        if validate is not None and ((epoch + 1) % cfg.val_every == 0 or last):
            record["val_miou"] = validate(model, header)
        history.append(record)
        log.info("epoch %d: %s", epoch + 1, json.dumps(record))
        header.training = {"data": data_summary or {}, "frames": len(frames),
                           "config": _jsonable(asdict(cfg)), "epochs_done": epoch + 1,
                           "history": history, "device": str(device)}
        save_checkpoint(out, model, header)
        save_train_state(state_path(out), optimizer,
                         {"epoch": epoch, "history": history, "elapsed_s": record["elapsed_s"]})
        if out_of_time:
            log.warning("time limit of %.1f min reached after epoch %d of %d",
                        cfg.time_limit_min, epoch + 1, cfg.epochs)
            break
    return {"history": history, "checkpoint": str(out), "device": str(device),
            "class_weights": [round(float(w), 3) for w in weights]}


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=list))
