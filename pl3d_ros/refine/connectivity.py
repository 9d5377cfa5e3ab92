"""Connectivity noise filter (SeCo, METHODS.md section 2).

The points one mask labeled (a "component", from ``refine_pseudo_labels``) are right or wrong
together, so they are judged together: a component's loss is the current student's mean
per-point loss against the component's label. A sliding buffer keeps the (loss, class) of the
components of the last ``buffer_frames`` frames. With at least ``min_components`` components in
the buffer, a two-component 1-D Gaussian mixture is fitted to the buffered losses and a
component is clean when its posterior for the low-mean Gaussian is >= ``clean_posterior``; with
fewer, the median rule: drop a component whose loss exceeds both its class's median and the
mean of the class medians. Points of noisy components lose their label; points that belong to
no component (component -1: base pseudo-labels, unlabeled points) are always kept.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from pl3d_ros.config import ConnectivityConfig

_LOG_2PI = float(np.log(2.0 * np.pi))


@dataclass(frozen=True)
class Gmm1d:
    """A two-component 1-D Gaussian mixture, components sorted by mean (index 0 = low mean).

    Attributes:
        weights: (2,) mixing weights, summing to 1.
        means: (2,) means, ascending.
        variances: (2,) variances (> 0).
        iterations: EM iterations run.
    """

    weights: np.ndarray
    means: np.ndarray
    variances: np.ndarray
    iterations: int

    def log_joint(self, x: np.ndarray) -> np.ndarray:
        """(M, 2) log(weight_j * N(x | mean_j, var_j)) for (M,) values x."""
        x = np.asarray(x, dtype=np.float64)[:, None]
        return (
            np.log(self.weights)[None, :]
            - 0.5 * (_LOG_2PI + np.log(self.variances)[None, :])
            - 0.5 * (x - self.means[None, :]) ** 2 / self.variances[None, :]
        )

    def posterior_low(self, x: np.ndarray) -> np.ndarray:
        """(M,) posterior probability of the low-mean component for (M,) values x."""
        lj = self.log_joint(x)
        # Softmax over the two components in log space: stable for values far in the tails.
        return 1.0 / (1.0 + np.exp(np.clip(lj[:, 1] - lj[:, 0], -700.0, 700.0)))


def fit_gmm_1d(x: np.ndarray, max_iter: int = 100, tol: float = 1e-5) -> Gmm1d | None:
    """Fit a two-component 1-D Gaussian mixture with EM (vectorised numpy, deterministic).

    Initialisation is deterministic: a 2-means split started at the minimum and maximum, which
    places one component on each mode of a bimodal sample even when the modes are unequal in
    size (quantile starts can both land in the larger mode). Variances are floored
    (1e-6 + 1e-4 * sample variance) so a component cannot collapse onto repeated values.

    Args:
        x: (M,) finite samples.
        max_iter: EM iteration cap.
        tol: stop when the mean log-likelihood improves by less than this.

    Returns:
        The mixture, or None when the sample has fewer than two distinct values (no split).
    """
    x = np.asarray(x, dtype=np.float64).ravel()
    x = x[np.isfinite(x)]
    if x.size < 2 or not x.max() > x.min():
        return None
    var_floor = 1e-6 + 1e-4 * float(x.var())

    # 2-means initialisation from the extremes; converges in a handful of steps in 1-D.
    centres = np.array([x.min(), x.max()])
    for _ in range(50):
        high = np.abs(x - centres[1]) < np.abs(x - centres[0])
        new = np.array([x[~high].mean(), x[high].mean()])
        if np.allclose(new, centres):
            break
        centres = new
    # ~high is non-empty (contains the minimum) and high contains the maximum.
    resp = np.stack([~high, high], axis=1).astype(np.float64)

    prev_ll = -np.inf
    it = 0
    gmm = None
    for it in range(1, max_iter + 1):
        # M-step from the current responsibilities.
        nk = resp.sum(axis=0) + 1e-12
        weights = nk / nk.sum()
        means = (resp * x[:, None]).sum(axis=0) / nk
        variances = np.maximum((resp * (x[:, None] - means[None, :]) ** 2).sum(axis=0) / nk, var_floor)
        gmm = Gmm1d(weights, means, variances, it)
        # E-step.
        lj = gmm.log_joint(x)
        top = lj.max(axis=1, keepdims=True)
        log_norm = top + np.log(np.exp(lj - top).sum(axis=1, keepdims=True))
        resp = np.exp(lj - log_norm)
        ll = float(log_norm.mean())
        if ll - prev_ll < tol:
            break
        prev_ll = ll
    assert gmm is not None
    order = np.argsort(gmm.means, kind="stable")
    return Gmm1d(gmm.weights[order], gmm.means[order], gmm.variances[order], it)


def component_losses(
    component: np.ndarray, labels: np.ndarray, point_loss: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Mean loss and class of every component.

    Args:
        component: (N,) int64 component id, -1 for none.
        labels: (N,) int64 label per point.
        point_loss: (N,) float per-point loss.

    Returns:
        (ids, loss, cls, inverse): (C,) component ids, (C,) float64 mean loss, (C,) int64 class
        (the label of the component's first point: one mask labels its component with a
        single class), and (M,) index into ids for the M points with component >= 0.
    """
    sel = component >= 0
    ids, first, inverse = np.unique(component[sel], return_index=True, return_inverse=True)
    counts = np.bincount(inverse, minlength=ids.shape[0])
    sums = np.bincount(inverse, weights=point_loss[sel].astype(np.float64), minlength=ids.shape[0])
    loss = sums / np.maximum(counts, 1)
    cls = labels[sel][first].astype(np.int64)
    return ids, loss, cls, inverse


class ComponentFilter:
    """SeCo's component-level noise filter with a sliding buffer over frames.

    Args:
        cfg: ``buffer_frames``, ``min_components``, ``clean_posterior``.

    Attributes:
        last_stats: stats of the last ``filter`` call: ``components``, ``dropped``,
            ``points_dropped``, ``mode`` ("gmm", "median" or "none"), ``buffered``.
    """

    def __init__(self, cfg: ConnectivityConfig) -> None:
        cfg.validate()
        self.cfg = cfg
        self._buffer: deque[tuple[np.ndarray, np.ndarray]] = deque(maxlen=int(cfg.buffer_frames))
        self.last_stats: dict[str, Any] = {}
        self.reset()

    def reset(self) -> None:
        """Forget the buffer (e.g. after a collapse restore or a scene change)."""
        self._buffer.clear()
        self.last_stats = {"components": 0, "dropped": 0, "points_dropped": 0, "mode": "none", "buffered": 0}

    @property
    def buffered(self) -> int:
        """Components held in the buffer."""
        return int(sum(loss.shape[0] for loss, _ in self._buffer))

    def filter(self, component: np.ndarray, labels: np.ndarray, point_loss: np.ndarray) -> np.ndarray:
        """Judge this frame's components and buffer them.

        Args:
            component: (N,) int64 component id per point (``RefineResult.component``), -1 none.
            labels: (N,) int64 (refined) pseudo-label per point.
            point_loss: (N,) float32 the student's per-point loss against ``labels`` (e.g.
                cross-entropy); only read for points with a component.

        Returns:
            (N,) bool keep: False for the points of components judged noisy; True for all
            others, including every point with component -1.
        """
        component = np.asarray(component, dtype=np.int64)
        labels = np.asarray(labels, dtype=np.int64)
        point_loss = np.asarray(point_loss)
        n = component.shape[0]
        if component.ndim != 1 or labels.shape != (n,) or point_loss.shape != (n,):
            raise ValueError(
                f"component, labels and point_loss must be (N,) of equal length, got "
                f"{component.shape}, {labels.shape}, {point_loss.shape}"
            )
        keep = np.ones(n, dtype=bool)
        ids, loss, cls, inverse = component_losses(component, labels, point_loss)
        finite = np.isfinite(loss)
        # A component whose loss is not finite carries no usable evidence: drop it and keep it
        # out of the buffer so it cannot poison the mixture.
        self._buffer.append((loss[finite], cls[finite]))
        buf_loss = np.concatenate([b[0] for b in self._buffer])
        buf_cls = np.concatenate([b[1] for b in self._buffer])

        clean = np.zeros(ids.shape[0], dtype=bool)
        mode = "none"
        if finite.any():
            if buf_loss.size >= self.cfg.min_components:
                mode = "gmm"
                clean[finite] = self._gmm_clean(buf_loss, loss[finite])
            else:
                mode = "median"
                clean[finite] = self._median_clean(buf_loss, buf_cls, loss[finite], cls[finite])
            keep[np.flatnonzero(component >= 0)] = clean[inverse]

        self.last_stats = {
            "components": int(ids.shape[0]),
            "dropped": int(np.count_nonzero(~clean)),
            "points_dropped": int(np.count_nonzero(~keep)),
            "mode": mode,
            "buffered": int(buf_loss.size),
        }
        return keep

    def _gmm_clean(self, buf_loss: np.ndarray, loss: np.ndarray) -> np.ndarray:
        gmm = fit_gmm_1d(buf_loss)
        if gmm is None:  # all buffered losses equal: no evidence of a noisy mode
            return np.ones(loss.shape[0], dtype=bool)
        post = gmm.posterior_low(loss)
        # Below the clean mean a loss is clean whatever the posterior says: with a narrow clean
        # and a wide noisy Gaussian the wide one wins again in the far low tail, which would
        # drop the best components.
        return (post >= self.cfg.clean_posterior) | (loss <= gmm.means[0])

    @staticmethod
    def _median_clean(
        buf_loss: np.ndarray, buf_cls: np.ndarray, loss: np.ndarray, cls: np.ndarray
    ) -> np.ndarray:
        # Per-class medians over the buffer (which includes this frame), vectorised by sorting
        # on (class, loss) and reading each class's middle element(s).
        order = np.lexsort((buf_loss, buf_cls))
        sl, sc = buf_loss[order], buf_cls[order]
        classes, start, count = np.unique(sc, return_index=True, return_counts=True)
        lo = sl[start + (count - 1) // 2]
        hi = sl[start + count // 2]
        medians = 0.5 * (lo + hi)
        mean_of_medians = float(medians.mean())
        pos = np.searchsorted(classes, cls)  # every current class is in the buffer
        return ~((loss > medians[pos]) & (loss > mean_of_medians))
