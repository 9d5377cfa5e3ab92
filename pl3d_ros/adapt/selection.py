"""Serve the source network while it fits the target better than the adapted one (component
``select`` of ``full``), judged without labels by cross-modal agreement.

Adaptation can make a network worse on a domain the source model already fits: on the continual
sim drive every adaptive method falls below the source in the ``layout`` domain (README "Online
adaptation"). Where two branches that see different sensors agree, they are more often right
(on the five real shifts, pseudo-labels where the adapted branches agree are 89-93 % precise
against 50-68 % where they disagree), so the share of in-view points whose image and range
branches pick the same class is a label-free proxy of accuracy that can compare two networks on
the same frames. Probed on the bundled simulator model (20 frames per sim domain, seed 0): the
source's agreement exceeds the adapted network's only in ``layout`` (0.79 against 0.73; mIoU
47.1 against 44.9); in fog, night, sensor and mixed adaptation raises it (fog 0.32 -> 0.64).

Entropy minimisation on the fused prediction pulls the branches together, so the adapted
network's agreement is biased upwards: when the source still agrees more, adaptation has made
things worse. The selector smooths both agreements over frames and serves the source while its
agreement leads by ``margin``; it goes back to the adapted network as soon as that one leads
(hysteresis). Adaptation goes on either way, so the adapted network can win the target back.

A change of domain is only confirmed on the second adapted frame whose input shift jumped
(adapt/fusion.py ``ShiftChangeDetector``); until then the network adapted to the last domain is
served, and on the continual drive that is most of what `full` loses at a change (night after
fog: a few frames at 14 mIoU against the source's 52). So the source is also served as soon as a
change is suspected (the first outlier), until the change is confirmed (the reset serves the
source anyway) or the outlier rejoins its domain.
"""

from __future__ import annotations

import math

import torch


def branch_agreement(p2: torch.Tensor, p3_in_view: torch.Tensor) -> float:
    """Share of in-view points whose branches' most probable classes agree: p2 (M, C) image
    branch, p3_in_view (M, C) range branch at the same points -> [0, 1] (nan when M = 0)."""
    if p2.shape[0] == 0:
        return float("nan")
    return float((p2.argmax(1) == p3_in_view.argmax(1)).float().mean())


class SourceSelector:
    """Which network to serve: the adapted one, or the source while it agrees with itself more.

    momentum: smoothing of each network's per-frame agreement over frames (a share over thousands
    of in-view points, so little frame noise: the smoothing is for scenes); margin: the lead of the
    source's smoothed agreement that switches to it (back as soon as it no longer leads).
    """

    def __init__(self, momentum: float = 0.7, margin: float = 0.02) -> None:
        self.momentum, self.margin = float(momentum), float(margin)
        self.switches = 0
        self.reset()

    def reset(self) -> None:
        """After the adapted network went back to the source: nothing to compare yet."""
        self.source: float | None = None
        self.adapted: float | None = None
        self.by_agreement = False
        self.serve_source = False

    def _smooth(self, old: float | None, new: float) -> float:
        return new if old is None else self.momentum * old + (1.0 - self.momentum) * new

    def observe(self, source_agreement: float, adapted_agreement: float, suspected_change: bool = False) -> bool:
        """Fold one frame's agreements in (nan: the frame had no point in view) -> True when what
        to serve changed at this frame. suspected_change: the domain may have changed here."""
        if not (math.isnan(source_agreement) or math.isnan(adapted_agreement)):
            self.source = self._smooth(self.source, source_agreement)
            self.adapted = self._smooth(self.adapted, adapted_agreement)
        leads = self.source is not None and self.adapted is not None
        lead = self.source - self.adapted if leads else 0.0
        self.by_agreement = leads and (lead > self.margin if not self.by_agreement else lead > 0.0)
        serve = self.by_agreement or suspected_change
        changed = serve != self.serve_source
        self.serve_source = serve
        self.switches += int(changed)
        return changed
