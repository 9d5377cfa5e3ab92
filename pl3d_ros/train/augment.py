"""Training augmentations, drawn from one numpy Generator so a seed fixes them all.

The two branches are augmented independently, as in xMUDA: the range branch sees rotated,
flipped, scaled and jittered points; the image branch sees a randomly scaled and cropped,
possibly mirrored, colour-jittered image. The point -> pixel correspondence is always computed
from the original points and the (augmented) camera, so labels stay exact on both sides.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pl3d_ros.frame import CameraModel
from pl3d_ros.inputs import cover_size, resize_crop


@dataclass
class AugmentConfig:
    """Ranges of each augmentation; ``none()`` turns them all off (validation)."""

    flip_y: float = 0.5  # probability of mirroring the cloud across the x-z plane
    rotate_z_deg: float = 45.0  # uniform in [-a, a]
    scale: tuple[float, float] = (0.95, 1.05)
    jitter_m: float = 0.01  # Gaussian sigma, clipped at 5 sigma
    image_flip: float = 0.5
    image_zoom: tuple[float, float] = (1.0, 1.3)  # extra scale over "just covers the input"
    brightness: float = 0.3
    contrast: float = 0.3
    saturation: float = 0.3

    @classmethod
    def none(cls) -> AugmentConfig:
        return cls(0.0, 0.0, (1.0, 1.0), 0.0, 0.0, (1.0, 1.0), 0.0, 0.0, 0.0)


def augment_points(points: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """(N, 4) x y z intensity -> (N, 4) augmented copy (metres); intensity untouched."""
    out = points.copy()
    xyz = out[:, :3].astype(np.float64)
    if rng.random() < cfg.flip_y:
        xyz[:, 1] = -xyz[:, 1]
    a = np.radians(rng.uniform(-cfg.rotate_z_deg, cfg.rotate_z_deg))
    c, s = np.cos(a), np.sin(a)
    xyz[:, :2] = xyz[:, :2] @ np.array([[c, s], [-s, c]])
    xyz *= rng.uniform(*cfg.scale)
    if cfg.jitter_m > 0:
        xyz += np.clip(rng.normal(0.0, cfg.jitter_m, xyz.shape), -5 * cfg.jitter_m, 5 * cfg.jitter_m)
    out[:, :3] = xyz
    return out


@dataclass
class ImageCrop:
    """How an image was brought to the network's input size: resize to ``size`` then crop at
    ``offset``, optionally mirrored; ``camera`` is the resulting input camera (before mirroring)."""

    camera: CameraModel
    size: tuple[int, int]
    offset: tuple[int, int]
    flip: bool


def random_crop(camera: CameraModel, width: int, height: int, cfg: AugmentConfig,
                rng: np.random.Generator) -> ImageCrop:
    """Scale to cover width x height times a random zoom, then crop at a random offset."""
    rw, rh = cover_size(camera, width, height, rng.uniform(*cfg.image_zoom))
    x0 = int(rng.integers(0, rw - width + 1))
    y0 = int(rng.integers(0, rh - height + 1))
    cam = camera.resized(rw, rh).cropped(x0, y0, width, height)
    return ImageCrop(cam, (rw, rh), (x0, y0), bool(rng.random() < cfg.image_flip))


def jitter_colour(image: torch.Tensor, cfg: AugmentConfig, rng: np.random.Generator) -> torch.Tensor:
    """(3, H, W) RGB in [0, 1] -> brightness, contrast and saturation jittered, clamped to [0, 1]."""
    b = 1.0 + rng.uniform(-cfg.brightness, cfg.brightness)
    c = 1.0 + rng.uniform(-cfg.contrast, cfg.contrast)
    s = 1.0 + rng.uniform(-cfg.saturation, cfg.saturation)
    out = image * b
    mean = out.mean()
    out = (out - mean) * c + mean
    grey = (0.299 * out[0] + 0.587 * out[1] + 0.114 * out[2])[None]
    out = (out - grey) * s + grey
    return out.clamp_(0.0, 1.0)


def crop_image(image: np.ndarray, crop: ImageCrop, width: int, height: int) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, height, width) float32 in [0, 1] as ``crop`` says (mirroring included)."""
    t = resize_crop(image, crop.size, crop.offset, (width, height))[0]
    return t.flip(-1) if crop.flip else t
