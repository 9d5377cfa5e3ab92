"""Class-agnostic image masks for pseudo-label refinement (METHODS.md section 1.1).

A ``MaskProvider`` turns an RGB image into a mask-id image: one int32 id per pixel, -1 where no
mask covers the pixel. Overlapping masks (SAM's automatic masks nest: a wheel inside a car) are
resolved so a pixel belongs to the smallest mask covering it, which keeps the finest, most
object-like mask for the label assignment.

Providers:
- ``SuperpixelProvider``: Felzenszwalb superpixels (scikit-image), the default; no model needed.
- ``SamProvider``: segment-anything automatic masks (ViT-B/L/H).
- ``MobileSamProvider``: MobileSAM automatic masks (TinyViT, "vit_t").

SAM checkpoints are loaded as plain state dicts with ``torch.load(weights_only=True)`` (or from
``.safetensors``): segment_anything's own builders call ``torch.load`` without ``weights_only``,
which would unpickle arbitrary objects from a downloaded file.
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # torch is imported lazily: the superpixel path must not pay for it
    import torch

    from pl3d_ros.config import RefineConfig

SAM_MODEL_TYPES = ("vit_b", "vit_l", "vit_h")


class MaskProviderError(RuntimeError):
    """A mask provider cannot be built: missing library, missing/corrupt/mismatched checkpoint."""


def check_image(image: np.ndarray) -> np.ndarray:
    """Validate an (H, W, 3) uint8 RGB image and return it C-contiguous.

    Raises:
        ValueError: wrong shape or dtype.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"image must have shape (H, W, 3), got {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 RGB, got {image.dtype}")
    return np.ascontiguousarray(image)


def resolve_overlaps(masks: np.ndarray | Sequence[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Flatten possibly overlapping binary masks into one mask-id image.

    A pixel covered by several masks belongs to the smallest of them (area = the mask's own
    pixel count); among equally large masks the lower index wins, so the result is
    deterministic. Masks that lose every pixel disappear and the surviving ids are renumbered
    0 .. K'-1 in order of their original index, so ids are dense (bincount-friendly downstream).

    Args:
        masks: (K, H, W) bool array or a sequence of K (H, W) bool arrays.
        shape: (H, W) of the output (needed when K = 0).

    Returns:
        (H, W) int32 mask id per pixel, -1 where no mask covers the pixel.
    """
    h, w = shape
    out = np.full((h, w), -1, dtype=np.int32)
    k = len(masks)
    if k == 0:
        return out
    areas = np.array([np.count_nonzero(m) for m in masks], dtype=np.int64)
    # Paint the largest first and the smallest last so the smallest wins; on equal areas the
    # higher index is painted first so the lower index wins. One pass per mask, O(K * H * W),
    # without the (K, H, W) temporary an argmin over a stacked array would need.
    order = np.lexsort((-np.arange(k), -areas))
    for i in order:
        m = np.asarray(masks[i], dtype=bool)
        if m.shape != (h, w):
            raise ValueError(f"mask {i} has shape {m.shape}, expected {(h, w)}")
        out[m] = i
    covered = out >= 0
    if covered.any():
        # Dense renumbering of the survivors, in original index order.
        _, inverse = np.unique(out[covered], return_inverse=True)
        out[covered] = inverse.astype(np.int32)
    return out


def mask_areas(mask_image: np.ndarray) -> np.ndarray:
    """Pixel count of every mask id.

    Args:
        mask_image: (H, W) int mask ids, -1 for no mask.

    Returns:
        (K,) int64 area in pixels of ids 0 .. K-1, K = max id + 1 (0 when there is no mask).
    """
    ids = np.asarray(mask_image).ravel()
    ids = ids[ids >= 0]
    if ids.size == 0:
        return np.zeros(0, dtype=np.int64)
    return np.bincount(ids).astype(np.int64)


class MaskProvider(ABC):
    """Class-agnostic masks of an image."""

    name: str = "abstract"

    @abstractmethod
    def masks(self, image: np.ndarray) -> np.ndarray:
        """Masks of one image.

        Args:
            image: (H, W, 3) uint8 RGB.

        Returns:
            (H, W) int32 mask id per pixel, -1 where no mask covers the pixel; a pixel covered
            by several masks belongs to the smallest.
        """


class SuperpixelProvider(MaskProvider):
    """Felzenszwalb superpixels (``skimage.segmentation.felzenszwalb``).

    Superpixels tile the image, so every pixel gets an id (no -1) and nothing overlaps.

    Args:
        scale: higher means larger segments (unitless, Felzenszwalb's k).
        sigma: Gaussian pre-smoothing width, pixels.
        min_size: minimum segment size, pixels (enforced in post-processing).
    """

    name = "superpixel"

    def __init__(self, scale: float = 200.0, sigma: float = 0.8, min_size: int = 200) -> None:
        if scale <= 0 or sigma < 0 or min_size < 1:
            raise ValueError(
                f"superpixel scale must be > 0, sigma >= 0, min_size >= 1; got {scale}, {sigma}, {min_size}"
            )
        self.scale = float(scale)
        self.sigma = float(sigma)
        self.min_size = int(min_size)

    def masks(self, image: np.ndarray) -> np.ndarray:
        from skimage.segmentation import felzenszwalb

        image = check_image(image)
        seg = felzenszwalb(image, scale=self.scale, sigma=self.sigma, min_size=self.min_size)
        return np.asarray(seg, dtype=np.int32)


class SlicProvider(MaskProvider):
    """SLIC superpixels (``skimage.segmentation.slic``): compact, near-regular segments, which
    on an image cut by thin structures (poles, lane markings) keep more LiDAR points per segment
    than Felzenszwalb's boundary-following ones.

    Args:
        segments: approximate number of segments per image.
        compactness: colour vs. space trade-off (higher: more square segments).
    """

    name = "slic"

    def __init__(self, segments: int = 150, compactness: float = 10.0) -> None:
        if segments < 1 or compactness <= 0:
            raise ValueError(f"slic segments must be >= 1 and compactness > 0; got {segments}, {compactness}")
        self.segments = int(segments)
        self.compactness = float(compactness)

    def masks(self, image: np.ndarray) -> np.ndarray:
        from skimage.segmentation import slic

        image = check_image(image)
        seg = slic(image, n_segments=self.segments, compactness=self.compactness, start_label=0)
        return np.asarray(seg, dtype=np.int32)


# -- SAM / MobileSAM ---------------------------------------------------------------------------


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint as a tensor state dict without unpickling arbitrary objects.

    ``.safetensors`` files are read with safetensors; anything else with
    ``torch.load(map_location="cpu", weights_only=True)``. A state dict nested under a
    ``"model"`` or ``"state_dict"`` key (a common training-checkpoint layout) is unwrapped.

    Raises:
        MaskProviderError: the file is missing, unreadable, corrupt, or holds no tensor dict.
    """
    import torch

    p = Path(path)
    if not p.is_file():
        raise MaskProviderError(f"SAM checkpoint {str(p)!r} not found")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(p), device="cpu")
        else:
            obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch / pickle / safetensors each raise their own error types
        raise MaskProviderError(
            f"SAM checkpoint {str(p)!r} is not a readable weights file ({type(exc).__name__}: {exc})"
        ) from exc
    def is_state_dict(o: Any) -> bool:
        return isinstance(o, dict) and bool(o) and all(isinstance(v, torch.Tensor) for v in o.values())

    if isinstance(obj, dict) and not is_state_dict(obj):
        obj = next((obj[k] for k in ("model", "state_dict") if is_state_dict(obj.get(k))), obj)
    if not is_state_dict(obj):
        raise MaskProviderError(f"SAM checkpoint {str(p)!r} does not hold a state dict of tensors")
    return obj


def _fit_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], path: str | Path, what: str) -> None:
    """Load ``state`` into ``model`` strictly; a mismatch becomes a MaskProviderError."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # missing / unexpected keys, size mismatches
        msg = str(exc).splitlines()
        brief = " ".join(line.strip() for line in msg[:4])
        raise MaskProviderError(
            f"SAM checkpoint {str(path)!r} does not fit the {what} architecture: {brief}"
        ) from exc


class _AutomaticMaskProvider(MaskProvider):
    """Shared body of the SAM-family providers: automatic mask generation + overlap resolution."""

    def __init__(
        self,
        model: torch.nn.Module,
        generator_cls: type,
        points_per_side: int,
        device: str,
        pred_iou_thresh: float,
        stability_score_thresh: float,
        points_per_batch: int,
    ) -> None:
        if points_per_side < 1:
            raise ValueError(f"points_per_side must be >= 1, got {points_per_side}")
        try:
            self.model = model.to(device).eval()
        except (RuntimeError, AssertionError) as exc:  # e.g. CUDA requested but unavailable
            raise MaskProviderError(f"cannot move the {self.name} model to device {device!r}: {exc}") from exc
        self.device = device
        self.points_per_side = int(points_per_side)
        self.generator = generator_cls(
            self.model,
            points_per_side=self.points_per_side,
            points_per_batch=points_per_batch,
            pred_iou_thresh=pred_iou_thresh,
            stability_score_thresh=stability_score_thresh,
            output_mode="binary_mask",
        )

    def masks(self, image: np.ndarray) -> np.ndarray:
        image = check_image(image)
        records = self.generator.generate(image)  # decorated with torch.no_grad() upstream
        segs = [np.asarray(r["segmentation"], dtype=bool) for r in records]
        return resolve_overlaps(segs, image.shape[:2])


class SamProvider(_AutomaticMaskProvider):
    """Segment Anything automatic masks (``segment_anything``).

    Args:
        checkpoint: path to the official ``sam_vit_*.pth`` (or a ``.safetensors`` export); ignored
            when ``model`` is given.
        model_type: "vit_b", "vit_l" or "vit_h"; must match the checkpoint.
        points_per_side: prompt grid per image side (points_per_side**2 prompts).
        device: torch device for the model.
        model: an already built ``segment_anything`` ``Sam`` (tests use random weights).
        pred_iou_thresh, stability_score_thresh, points_per_batch: SamAutomaticMaskGenerator's
            filters and batch size, with its defaults.

    Raises:
        MaskProviderError: segment_anything missing, unknown model type, checkpoint missing,
            unreadable or not fitting the architecture.
    """

    name = "sam"

    def __init__(
        self,
        checkpoint: str = "",
        model_type: str = "vit_b",
        points_per_side: int = 16,
        device: str = "cpu",
        *,
        model: torch.nn.Module | None = None,
        pred_iou_thresh: float = 0.88,
        stability_score_thresh: float = 0.95,
        points_per_batch: int = 64,
    ) -> None:
        state: dict[str, torch.Tensor] | None = None
        if model is None:
            if model_type not in SAM_MODEL_TYPES:
                raise MaskProviderError(
                    f"SAM model type must be one of {SAM_MODEL_TYPES}, got {model_type!r} "
                    "(vit_t is MobileSAM: use MobileSamProvider / mask_provider mobile_sam)"
                )
            if not checkpoint:
                raise MaskProviderError("SamProvider needs a checkpoint path (refine.sam_checkpoint)")
            # Read the file first: a missing / corrupt file fails before the library import and
            # seconds of network building.
            state = load_state_dict(checkpoint)
        try:
            from segment_anything import SamAutomaticMaskGenerator, sam_model_registry
        except ImportError as exc:
            raise MaskProviderError(f"segment_anything is not installed: {exc}") from exc
        if state is not None:
            # checkpoint=None: the upstream builder's own torch.load (no weights_only) never runs.
            model = sam_model_registry[model_type](checkpoint=None)
            _fit_state_dict(model, state, checkpoint, f"SAM {model_type}")
        self.model_type = model_type
        super().__init__(model, SamAutomaticMaskGenerator, points_per_side, device,
                         pred_iou_thresh, stability_score_thresh, points_per_batch)


class MobileSamProvider(_AutomaticMaskProvider):
    """MobileSAM automatic masks (``mobile_sam``, TinyViT encoder "vit_t").

    Args:
        checkpoint: path to ``mobile_sam.pt`` (or a ``.safetensors`` export); ignored when
            ``model`` is given.
        points_per_side: prompt grid per image side.
        device: torch device for the model.
        model: an already built ``mobile_sam`` ``Sam`` (tests use random weights).
        pred_iou_thresh, stability_score_thresh, points_per_batch: as for ``SamProvider``.

    Raises:
        MaskProviderError: mobile_sam missing, checkpoint missing, unreadable or not fitting.
    """

    name = "mobile_sam"

    def __init__(
        self,
        checkpoint: str = "",
        points_per_side: int = 16,
        device: str = "cpu",
        *,
        model: torch.nn.Module | None = None,
        pred_iou_thresh: float = 0.88,
        stability_score_thresh: float = 0.95,
        points_per_batch: int = 64,
    ) -> None:
        state: dict[str, torch.Tensor] | None = None
        if model is None:
            if not checkpoint:
                raise MaskProviderError("MobileSamProvider needs a checkpoint path (refine.sam_checkpoint)")
            state = load_state_dict(checkpoint)
        try:
            with warnings.catch_warnings():
                # mobile_sam re-registers TinyViT names in timm's registry and imports deprecated
                # timm paths: upstream noise on every start, nothing a user can act on.
                warnings.simplefilter("ignore")
                from mobile_sam import SamAutomaticMaskGenerator, sam_model_registry
        except ImportError as exc:
            raise MaskProviderError(f"mobile_sam is not installed: {exc}") from exc
        if state is not None:
            model = sam_model_registry["vit_t"](checkpoint=None)
            _fit_state_dict(model, state, checkpoint, "MobileSAM vit_t")
        super().__init__(model, SamAutomaticMaskGenerator, points_per_side, device,
                         pred_iou_thresh, stability_score_thresh, points_per_batch)


def build_mask_provider(cfg: RefineConfig, device: str = "cpu") -> MaskProvider:
    """The provider ``cfg.mask_provider`` names.

    "auto": SAM / MobileSAM when ``cfg.sam_checkpoint`` is set (MobileSAM when
    ``cfg.sam_model_type == "vit_t"``), else superpixels. "sam" and "mobile_sam" require a
    checkpoint; "mobile_sam" always builds the vit_t architecture.

    Raises:
        MaskProviderError: the SAM provider cannot be built (see the providers).
        ValueError: unknown ``cfg.mask_provider``.
    """
    kind = cfg.mask_provider
    if kind == "auto":
        if not cfg.sam_checkpoint:
            kind = "superpixel"
        else:
            kind = "mobile_sam" if cfg.sam_model_type == "vit_t" else "sam"
    if kind == "superpixel":
        return SuperpixelProvider(cfg.superpixel_scale, cfg.superpixel_sigma, cfg.superpixel_min_size)
    if kind == "slic":
        return SlicProvider(cfg.slic_segments, cfg.slic_compactness)
    if kind == "sam":
        return SamProvider(cfg.sam_checkpoint, cfg.sam_model_type, cfg.sam_points_per_side, device)
    if kind == "mobile_sam":
        return MobileSamProvider(cfg.sam_checkpoint, cfg.sam_points_per_side, device)
    raise ValueError(f"unknown mask provider {cfg.mask_provider!r}")
