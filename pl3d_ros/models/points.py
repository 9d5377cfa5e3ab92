"""From dense branch outputs to per-point values, and the 2D/3D fusion (METHODS.md section 0).

Training and adaptation run these in torch (gradients flow through them); inference's
postprocess (``predict_points``) runs the same formulas as compiled loops on CPU arrays
(``cpu_kernels``) and in torch on a device. A runtime's numpy outputs are wrapped with
``torch.from_numpy``, no copy.
"""

from __future__ import annotations

from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pl3d_ros import cpu_kernels
from pl3d_ros.registry import FUSION_RULES


def gather_cells(grid: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Per-point values of a range-image grid.

    grid: (1, C, H, W); rows, cols: (N,) int64 cell of each point -> (N, C).
    """
    return grid[0][:, rows, cols].transpose(0, 1)


def sample_pixels(grid: torch.Tensor, uv: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Bilinear sample of an image grid at continuous pixel coordinates.

    grid: (1, C, h, w); uv: (M, 2) pixels of an image of ``size`` (H, W) (default: the grid's
    own), pixel (0, 0)'s centre at (0, 0) -> (M, C). A grid coarser than that image (features
    at stride 2, say) is sampled at the same places: in align_corners=False coordinates both
    cover the same extent. Samples beyond the outer pixel centres clamp to the border.
    """
    return _sample_pixels_cm(grid, uv, size).transpose(0, 1)


def _sample_pixels_cm(grid: torch.Tensor, uv: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
    """``sample_pixels`` in the class-major layout grid_sample produces: (C, M), contiguous."""
    h, w = size if size is not None else grid.shape[-2:]
    if grid.dtype in (torch.float16, torch.bfloat16):
        # grid_sample takes the coordinates in the grid's dtype, and bf16's 8 bits would move a
        # sample at u = 600 by up to 1.2 px: sample a float32 copy (gradients pass through it)
        grid = grid.float()
    norm = torch.empty_like(uv, dtype=grid.dtype)
    norm[:, 0] = (uv[:, 0] + 0.5) * (2.0 / w) - 1.0  # align_corners=False convention
    norm[:, 1] = (uv[:, 1] + 0.5) * (2.0 / h) - 1.0
    out = F.grid_sample(grid, norm.view(1, 1, -1, 2), mode="bilinear", padding_mode="border",
                        align_corners=False)
    return out[0, :, 0]


def entropy(p: torch.Tensor, eps: float = 1e-12, dim: int = -1) -> torch.Tensor:
    """(..., C) probabilities -> (...,) Shannon entropy in nats (classes along ``dim``)."""
    return -(p * torch.log(p.clamp_min(eps))).sum(dim)


#: ``Fusion.owner`` values: a class both branches output, one only the image branch outputs, one
#: only the range branch outputs.
SHARED, IMAGE_ONLY, RANGE_ONLY = 0, 1, 2


@dataclass(frozen=True)
class Fusion:
    """How the two branches' per-point class probabilities combine in view.

    rule: ``registry.FUSION_RULES`` (``runtime.fusion``). owner: per class, ``SHARED`` or the one
    branch that can output it (an imported branch whose class map has no source for a class:
    parking for a Cityscapes image network); () = every class shared. The product rule lets only
    the branch that knows such a class decide its probability (``fuse``).
    """

    rule: str
    owner: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.rule not in FUSION_RULES:
            raise ValueError(f"fusion rule must be one of {', '.join(FUSION_RULES)}, got {self.rule!r}")
        if self.owner and SHARED not in self.owner:
            raise ValueError("the fusion needs at least one class that both branches output")

    @classmethod
    def of(cls, rule: "str | Fusion", header: Any = None) -> "Fusion":
        """``rule`` as a Fusion; with a checkpoint header, the classes an imported branch has
        no output for (an empty entry of its class map) belong to the other branch."""
        if isinstance(rule, Fusion):
            return rule
        branches = getattr(header, "branches", None) or {}
        if not branches:
            return cls(rule)
        names = header.class_set.names
        knows = {kind: [not spec or bool(spec.class_map.get(n)) for n in names]
                 for kind, spec in ((k, branches.get(k)) for k in ("image", "range"))}
        owner = tuple(SHARED if i and r else IMAGE_ONLY if i else RANGE_ONLY
                      for i, r in zip(knows["image"], knows["range"]))
        return cls(rule, () if all(o == SHARED for o in owner) else owner)

    def owner_array(self, num_classes: int) -> np.ndarray:
        """(C,) uint8 ``owner`` (all SHARED when empty)."""
        if not self.owner:
            return np.zeros(num_classes, np.uint8)
        if len(self.owner) != num_classes:
            raise ValueError(f"the fusion knows {len(self.owner)} classes, the outputs have {num_classes}")
        return np.asarray(self.owner, np.uint8)


def product_exponents(bias: torch.Tensor | tuple[float, float] | None) -> tuple[float, float] | torch.Tensor:
    """The product rule's branch exponents from the branch log-weights ``bias`` (2,): 2 x
    softmax(bias), so that equal log-weights (or None) give the plain product (1, 1) and only
    their difference moves weight between the branches."""
    if bias is None:
        return (1.0, 1.0)
    return 2.0 * torch.softmax(torch.as_tensor(bias, dtype=torch.float32).reshape(2), 0)


def _product(prob_2d: torch.Tensor, prob_3d: torch.Tensor, bias: torch.Tensor | tuple[float, float] | None,
             dim: int, owner: tuple[int, ...]) -> torch.Tensor:
    """The product rule of ``fuse`` along ``dim``."""
    a = product_exponents(bias)
    a2, a3 = (a[0].to(prob_2d.device), a[1].to(prob_2d.device)) if torch.is_tensor(a) else a
    # the log of a softmax that underflowed to 0 stays finite: the class is only improbable
    tiny = torch.finfo(prob_2d.dtype).tiny
    z = a2 * torch.log(prob_2d.clamp_min(tiny)) + a3 * torch.log(prob_3d.clamp_min(tiny))
    if not owner:
        return torch.softmax(z, dim=dim)
    shape = [1] * prob_2d.dim()
    shape[dim] = len(owner)
    own = torch.as_tensor(owner, device=prob_2d.device).view(shape)
    solo_2d, solo_3d = (own == IMAGE_ONLY).to(prob_2d.dtype), (own == RANGE_ONLY).to(prob_2d.dtype)
    shared = torch.softmax(z.masked_fill(own != SHARED, float("-inf")), dim=dim)
    # each one-branch class takes that branch's probability; the shared classes share the rest
    rest = (1.0 - (prob_3d * solo_3d).sum(dim, keepdim=True)) * (1.0 - (prob_2d * solo_2d).sum(dim, keepdim=True))
    w = shared * rest + prob_3d * solo_3d + prob_2d * solo_2d
    return w / w.sum(dim, keepdim=True)


def _fusion(prob_2d: torch.Tensor, prob_3d: torch.Tensor, bias: torch.Tensor | tuple[float, float] | None,
            dim: int, fusion: Fusion) -> torch.Tensor:
    """The in-view fusion of ``fuse`` on matching (M, C) / (C, M) tensors, classes along ``dim``."""
    if fusion.rule == "product":
        return _product(prob_2d, prob_3d, bias, dim, fusion.owner)
    e2, e3 = -entropy(prob_2d, dim=dim), -entropy(prob_3d, dim=dim)
    if bias is not None:
        b = torch.as_tensor(bias, dtype=e2.dtype, device=e2.device)
        e2, e3 = e2 + b[0], e3 + b[1]
    w2, w3 = torch.exp(e2).unsqueeze(dim), torch.exp(e3).unsqueeze(dim)
    return (w2 * prob_2d + w3 * prob_3d) / (w2 + w3)


def fuse(prob_2d: torch.Tensor, prob_3d: torch.Tensor, in_view: torch.Tensor,
         bias: torch.Tensor | tuple[float, float] | None = None, *, rule: str | Fusion) -> torch.Tensor:
    """The fusion of the branches: (M, C), (N, C), (N,) bool -> (N, C) probabilities. Out of view
    the 3D branch stands alone; in view ``rule`` (a ``Fusion`` or its rule's name):

    * product: softmax(a_2d log p_2d + a_3d log p_3d), the branches' distributions multiplied
      and renormalised (two experts, either can rule a class out), with exponents
      a = 2 softmax(bias) (``product_exponents``; (1, 1) without bias). A class only one branch
      outputs (``Fusion.owner``) takes that branch's probability, and the shared classes divide
      the rest by the product: the other branch has no say about it, rather than a veto.
    * entropy: Latte's mixture, each branch weighted by exp(-entropy + bias_b), normalised.

    ``bias`` (2,): the branch log-weights of the 2D and 3D branch (the shift-aware fusion of
    ``adapt.fusion``; None or zeros: none). Why product is the default: the mixture follows
    whichever branch is the more confident, and under the real shifts the Cityscapes image
    branch is confident about classes that are not there (README, "Fusion rule").
    """
    fused = prob_3d.clone()
    fused[in_view] = _fusion(prob_2d, prob_3d[in_view], bias, -1, Fusion.of(rule))
    return fused


def max_argmax(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, K) -> (max (K,), argmax (K,) int64) over the class axis, the first maximal class on
    ties (as ``torch.max``; a column holding a NaN gets class C - 1).

    The maxima are marked with descending class weights C..1 and one byte-wise max over the
    classes finds the first: every step is a vectorised sweep over contiguous rows. torch's own
    max / argmax over a leading axis do not vectorise (3.4 / 15.7 ms for 10 x 124k values, one
    thread), and on a CPU even its float comparison is 6x numpy's, so CPU tensors go through
    numpy (no copy): 0.4 ms, against 2.8 for the row-by-row marking this replaces.
    """
    if _numpy_ok(x):
        top, arg = _max_argmax_np(x.numpy())
        return torch.from_numpy(top), torch.from_numpy(arg)
    c = x.shape[0]
    top = x.amax(0)
    first = ((x == top) * _class_weights(c, torch, x.device)[:, None]).amax(0)
    return top, (c - first.long()).clamp_max_(c - 1)


def _numpy_ok(x: torch.Tensor) -> bool:
    """Whether ``x`` can go through the numpy kernels: a CPU float tensor numpy has (not bf16 /
    fp16 autocast output) without autograd history."""
    return x.device.type == "cpu" and not x.requires_grad and x.dtype in (torch.float32, torch.float64)


def _class_weights(c: int, xp, device=None):
    """C, C-1, ..., 1 in the smallest integer type that holds C (numpy or torch)."""
    if xp is np:
        return np.arange(c, 0, -1, dtype=np.uint8 if c < 256 else np.int32)
    return torch.arange(c, 0, -1, dtype=torch.uint8 if c < 256 else torch.int32, device=device)


def _max_argmax_np(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``max_argmax`` on a (C, K) numpy array -> (max (K,), argmax (K,) int64)."""
    c = x.shape[0]
    top = x.max(0)
    first = ((x == top) * _class_weights(c, np)[:, None]).max(0)
    arg = c - first.astype(np.int64)
    np.minimum(arg, c - 1, out=arg)
    return top, arg


def top_class(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, K) logits -> (argmax (K,) int64, softmax maximum (K,) float32) over the classes,
    without the (C, K) softmax: the maximum of a softmax is 1 / sum_c exp(l_c - max_c l_c)."""
    if _numpy_ok(logits) and logits.shape[0] < 256:
        arg, conf = _top_class_np(logits.numpy())
        return torch.from_numpy(arg.astype(np.int64)), torch.from_numpy(conf)
    top, arg = max_argmax(logits)
    return arg, (logits - top).exp_().sum(0).reciprocal_()


def _top_class_np(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``top_class`` of a (C, K) numpy array, C < 256, compiled -> (argmax (K,) uint8, max (K,)
    float32)."""
    x = np.ascontiguousarray(logits, dtype=np.float32)
    k = x.shape[1]
    arg, conf = np.empty(k, np.uint8), np.empty(k, np.float32)
    cpu_kernels.top_class(x, arg, conf, np.empty(k, np.float32), np.empty(k, np.float32))
    return arg, conf


def predict_points(logits_2d: torch.Tensor, logits_3d: torch.Tensor, uv: torch.Tensor, cells: torch.Tensor,
                   in_view: torch.Tensor, size: tuple[int, int],
                   bias: torch.Tensor | tuple[float, float] | None = None, executor: Executor | None = None, *,
                   rule: str | Fusion) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inference's per-point postprocess: each branch's top class and the fused labels.

    logits_2d (1, C, H, W) sampled bilinearly at uv (M, 2) pixels of an image of ``size`` (H, W)
    (``sample_pixels``); logits_3d (1, C, rows, cols) read at cells
    (N,) int64 = row * cols + col (``gather_cells``); in_view (N,) bool; bias and rule as ``fuse``.

    Returns (labels_2d (M,), labels_3d (N,), labels (N,), all uint8, confidence (N,) float32):
    the argmax of each branch's softmax, and the argmax / max of the fusion (``fuse``). Only the M in-view points need the branches' full softmax (for the fusion's
    entropies); out of view the fusion is the 3D branch itself, whose top class and its
    probability come from the range image's cells (``top_class``, no (C, N) softmax) and are
    read per point. Class-major (C, K) buffers keep every step a sweep over contiguous rows.
    ``executor``: the cells' top classes are found there while the caller samples the 2D
    branch and fuses the in-view points. On a CPU both halves are compiled loops
    (``cpu_kernels.top_class`` / ``fuse_in_view`` / ``spread_cells``); elsewhere torch.
    """
    if logits_3d.dtype in (torch.float16, torch.bfloat16):  # a half-precision backend: float32 arithmetic
        logits_2d, logits_3d = logits_2d.float(), logits_3d.float()
    c = logits_3d.shape[1]
    if c >= 256:
        raise ValueError(f"labels are uint8: at most 255 classes, got {c}")
    rule = Fusion.of(rule)
    if all(_numpy_ok(t) for t in (logits_2d, logits_3d, uv)):
        return _predict_points_np(logits_2d.numpy()[0], logits_3d.numpy()[0], uv.numpy(), cells.numpy(),
                                  in_view.numpy(), size, bias, executor, rule)
    grid = logits_3d.reshape(c, -1)
    if executor is not None:
        cells_top = executor.submit(top_class, grid)
    view = torch.nonzero(in_view).squeeze(1)
    p2 = _sample_pixels_cm(logits_2d, uv, size).softmax(0)
    p3 = grid.index_select(1, cells[view]).softmax(0)
    labels_2d = max_argmax(p2)[1]
    cell_label, cell_conf = cells_top.result() if executor is not None else top_class(grid)
    labels_3d = cell_label.index_select(0, cells)
    labels, confidence = labels_3d.clone(), cell_conf.index_select(0, cells)
    conf_v, labels_v = max_argmax(_fusion(p2, p3, bias, 0, rule))
    confidence[view] = conf_v
    labels[view] = labels_v
    return labels_2d.to(torch.uint8), labels_3d.to(torch.uint8), labels.to(torch.uint8), confidence


def _predict_points_np(logits_2d: np.ndarray, logits_3d: np.ndarray, uv: np.ndarray, cells: np.ndarray,
                       in_view: np.ndarray, size: tuple[int, int], bias: torch.Tensor | tuple[float, float] | None,
                       executor: Executor | None, rule: Fusion
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``predict_points`` of CPU float32 arrays (C, h, w) / (C, rows, cols), compiled: the
    cells' top classes (on ``executor`` when given), the in-view fusion, then one pass that
    reads every point's cell and writes the in-view results over it."""
    c = logits_3d.shape[0]
    grid = np.ascontiguousarray(logits_3d, dtype=np.float32).reshape(c, -1)
    job = executor.submit(_top_class_np, grid) if executor is not None else None
    view = np.flatnonzero(in_view)
    m, n = view.shape[0], cells.shape[0]
    image = np.ascontiguousarray(logits_2d, dtype=np.float32)
    product = rule.rule == "product"
    if product:
        w2, w3 = (float(v) for v in product_exponents(None if bias is None else torch.as_tensor(bias).detach().cpu()))
    else:
        w2, w3 = (0.0, 0.0) if bias is None else (float(v) for v in torch.as_tensor(bias).detach().cpu().double())
    labels_2d, labels_v, conf_v = np.empty(m, np.uint8), np.empty(m, np.uint8), np.empty(m, np.float32)
    cpu_kernels.fuse_in_view(image, 2.0 / size[1], 2.0 / size[0],
                             np.ascontiguousarray(uv, dtype=np.float64), np.ascontiguousarray(cells[view], dtype=np.int64),
                             grid, product, rule.owner_array(c), w2, w3, labels_2d, labels_v, conf_v)
    cell_label, cell_conf = job.result() if job is not None else _top_class_np(grid)
    labels_3d, labels, confidence = np.empty(n, np.uint8), np.empty(n, np.uint8), np.empty(n, np.float32)
    cpu_kernels.spread_cells(cell_label, cell_conf, np.ascontiguousarray(cells, dtype=np.int64), view, labels_v, conf_v,
                             labels_3d, labels, confidence)
    return tuple(map(torch.from_numpy, (labels_2d, labels_3d, labels, confidence)))
