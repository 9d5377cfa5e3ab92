"""The adaptation methods, one class each with one entry point ``step(batch) -> stats``.

``step`` runs ONE inner step on a batch (``batch.round`` counts the inner steps of its frame);
work that belongs to the frame rather than to the step (teacher and source forwards, pseudo-
labels, masks, the connectivity filter, the collapse guard) runs in round 0 and is cached in
``batch.cache``. Every method exposes ``teacher`` (the network to deploy), ``reset()`` (back to
the source) and ``snapshot()`` / ``rollback()`` (undo a failed step).

source  no adaptation.
tent    entropy of the fused prediction, normalisation layers only, one step per frame; the
        adapted network itself is deployed (no mean teacher).
pl      online xMUDA-PL: section 0 pseudo-labels from the deployed network, cross-entropy on
        both branches (3D on every labelled point, 2D on the labelled in-view points); no mean
        teacher.
full    sections 0-5 with a mean teacher; each component can be switched off through
        cfg.adapt.disable (mla, gapp, connectivity, negative, erda, xm, restore, guard).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from pl3d_ros.adapt import losses
from pl3d_ros.adapt.batch import Batch, PointOutputs, forward_points
from pl3d_ros.adapt.prototypes import PrototypeBank
from pl3d_ros.adapt.pseudo_labels import PseudoLabeler
from pl3d_ros.adapt.reliability import reliability_split
from pl3d_ros.adapt.teacher import CollapseGuard, TeacherStudent
from pl3d_ros.config import Config
from pl3d_ros.models.checkpoint import CheckpointHeader


class Method:
    """Shared plumbing: the teacher/student pair and the undo/reset hooks."""

    name: ClassVar[str] = "base"
    adapts: ClassVar[bool] = True  # False: no weights ever change, nothing to hand to the backend
    max_rounds: ClassVar[int | None] = None  # cap on inner steps per frame (None: the config's)
    teacher_momentum: ClassVar[float | None] = None  # None: cfg.adapt.teacher_momentum
    trainable: ClassVar[str | None] = None  # None: cfg.adapt.trainable

    def __init__(self, cfg: Config, source: torch.nn.Module, header: CheckpointHeader, *,
                 initial_state: dict[str, torch.Tensor] | None = None,
                 generator: torch.Generator | None = None, mask_provider: Any = None) -> None:
        a = cfg.adapt
        self.cfg = cfg
        self.header = header
        self.num_classes = header.class_set.num_classes
        self.generator = generator
        momentum = a.teacher_momentum if self.teacher_momentum is None else self.teacher_momentum
        self.models = TeacherStudent(source, trainable=self.trainable or a.trainable, optimizer=a.optimizer,
                                     lr=a.lr, momentum=momentum, initial_state=initial_state)

    @property
    def teacher(self) -> torch.nn.Module:
        return self.models.teacher

    def step(self, batch: Batch) -> dict[str, Any]:
        raise NotImplementedError

    def reset(self) -> None:
        """Back to the source weights with every piece of online state cleared."""
        self.models.restore_source()

    def snapshot(self) -> Any:
        return self.models.snapshot()

    def rollback(self, snap: Any) -> None:
        self.models.rollback(snap)

    def _optimise(self, loss: torch.Tensor) -> None:
        """One optimizer step on ``loss`` then the teacher's EMA update. A non-finite loss raises
        before anything changes (the adapter counts it as a failed step)."""
        if not bool(torch.isfinite(loss)):
            raise FloatingPointError(f"{self.name}: non-finite adaptation loss {float(loss.detach())}")
        opt = self.models.optimizer
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        self.models.update_teacher()


class Source(Method):
    """No adaptation: the source network stays deployed."""

    name = "source"
    adapts = False

    def step(self, batch: Batch) -> dict[str, Any]:
        return {}


class Tent(Method):
    """TENT on the fused prediction: minimise its mean entropy; norm layers only, one step."""

    name = "tent"
    max_rounds = 1
    teacher_momentum = 0.0
    trainable = "norm"

    def step(self, batch: Batch) -> dict[str, Any]:
        out = forward_points(self.models.student, batch)
        _, _, fused = out.probs(batch.in_view)
        loss = losses.entropy(fused)
        self._optimise(loss)
        value = float(loss.detach())
        return {"loss": value, "loss_entropy": value}


def _teacher_pass(models: TeacherStudent, batch: Batch) -> tuple[PointOutputs, tuple[torch.Tensor, ...]]:
    with torch.no_grad():
        out = forward_points(models.teacher, batch)
        return out, out.probs(batch.in_view)


def _branch_ce(out: PointOutputs, target: torch.Tensor, in_view: torch.Tensor) -> torch.Tensor:
    """CE of the 3D branch on every labelled point plus the 2D branch on the labelled in-view ones."""
    return losses.cross_entropy(out.logits_3d, target) + losses.cross_entropy(out.logits_2d, target[in_view])


class PseudoLabel(Method):
    """Online xMUDA-PL: section 0 pseudo-labels, cross-entropy, no mean teacher."""

    name = "pl"
    teacher_momentum = 0.0

    def __init__(self, cfg: Config, source: torch.nn.Module, header: CheckpointHeader, **kw: Any) -> None:
        super().__init__(cfg, source, header, **kw)
        pl = cfg.pseudo_labels
        self.labeler = PseudoLabeler(self.num_classes, pl.median_window_frames, pl.confidence_cap)

    def reset(self) -> None:
        super().reset()
        self.labeler.reset()

    def step(self, batch: Batch) -> dict[str, Any]:
        if batch.round == 0:
            _, (_, _, fused) = _teacher_pass(self.models, batch)
            labels, thr = self.labeler(fused)
            batch.cache["labels"] = labels
            batch.cache["stages"] = {"base": labels}
            batch.cache["thresholds"] = thr
        labels = batch.cache["labels"]
        out = forward_points(self.models.student, batch)
        loss = _branch_ce(out, labels, batch.in_view)
        self._optimise(loss)
        n = max(1, batch.num_points)
        return {"loss": float(loss.detach()), "loss_ce": float(loss.detach()), "density": int((labels >= 0).sum()) / n,
                "threshold_mean": float(np.mean(batch.cache["thresholds"]))}


class Full(Method):
    """Sections 0-5 (see METHODS.md and the module docstrings of each part).

    Round 0 of a frame: teacher forward (eval: the deployed network) and source forward (collapse
    guard, prototype initialisation); collapse check, restoring the source when it fires; section
    0 pseudo-labels; masks + MLA/GAPP when due; the connectivity filter with the student's
    per-point loss. Every round: student forward, reliability split, CE + negative learning
    (rounds < negative_rounds) + ERDA + cross-modal KL, optimizer step, teacher EMA, stochastic
    restore, prototype EMA.

    Components (cfg.adapt.disable): mla off = no refinement at all (GAPP needs MLA's mask
    classes); gapp off = naive MLA (every point of a kept mask takes its class); connectivity,
    negative, erda, xm, restore (the stochastic restore) and guard (the collapse guard) each drop
    their own term. Hard-label losses (CE, negative learning) act on both branches: the 3D branch
    at every point, the 2D branch at the in-view points. Negative learning runs in the first
    ``negative_rounds`` inner steps of a frame (one new class per point per round), so with the
    default steps_per_frame = 1 it is one round per frame.
    """

    name = "full"

    def __init__(self, cfg: Config, source: torch.nn.Module, header: CheckpointHeader, *,
                 mask_provider: Any = None, **kw: Any) -> None:
        super().__init__(cfg, source, header, **kw)
        a, pl = cfg.adapt, cfg.pseudo_labels
        self.on = {c: a.enabled(c) for c in ("mla", "gapp", "connectivity", "negative", "erda", "xm",
                                             "restore", "guard")}
        self.labeler = PseudoLabeler(self.num_classes, pl.median_window_frames, pl.confidence_cap)
        dev = next(self.models.student.parameters()).device
        self.refinement = None
        if self.on["mla"]:  # mla off: no refinement at all (GAPP needs MLA's mask classes)
            from pl3d_ros.adapt.refinement import RefinementStage

            self.refinement = RefinementStage(cfg, gapp=self.on["gapp"], connectivity=self.on["connectivity"],
                                              mask_provider=mask_provider, device=str(dev))
        self.banks = {
            "2d": PrototypeBank(self.num_classes, self.models.student.image.feature_dim, a.prototype_momentum, dev),
            "3d": PrototypeBank(self.num_classes, self.models.student.range.feature_dim, a.prototype_momentum, dev),
        }
        self.guard = CollapseGuard(self.num_classes, a.collapse_window, a.collapse_max_class_share,
                                   a.collapse_max_disagreement)
        self.collapses = 0

    def reset(self) -> None:
        super().reset()
        self.labeler.reset()
        for bank in self.banks.values():
            bank.reset()
        self.guard.reset()
        if self.refinement is not None:
            self.refinement.reset()

    # -- round 0: everything that belongs to the frame -------------------------------------------

    def _prepare_frame(self, batch: Batch) -> dict[str, Any]:
        stats: dict[str, Any] = {}
        in_view = batch.in_view
        _, (p2, p3, pf) = _teacher_pass(self.models, batch)
        need_source = self.on["guard"] or (self.on["erda"] and not all(bool(b.initialised.all())
                                                                        for b in self.banks.values()))
        source_out = source_fused = None
        if need_source:
            with torch.no_grad():
                source_out = forward_points(self.models.source, batch)
                _, _, source_fused = source_out.probs(in_view)
        if self.on["guard"]:
            check = self.guard.observe(pf.argmax(1), source_fused.argmax(1))
            stats.update(class_share=check.class_share, disagreement=check.disagreement)
            if check.triggered:
                # The deployed network collapsed: back to the source, and no update on this frame,
                # so what goes to the backend now is exactly the source.
                self.reset()
                self.collapses += 1
                batch.cache["skip"] = True
                stats["collapse"] = True
                return stats
        stats["collapse"] = False

        base, thr = self.labeler(pf)
        refined, component = base, torch.full_like(base, -1)
        if self.refinement is not None and self.refinement.due(batch.index):
            refined, component, rstats = self.refinement.refine(batch, base)
            stats.update({f"refine_{k}": v for k, v in rstats.items() if isinstance(v, (int, float, bool))})
        if self.on["erda"] and source_out is not None:
            src_labels = source_fused.argmax(1)
            self.banks["3d"].init_missing(source_out.feat_3d, src_labels)
            self.banks["2d"].init_missing(source_out.feat_2d, src_labels[in_view])
        batch.cache["full"] = {
            "p2": p2, "p3": p3, "pf": pf, "labels": refined, "component": component,
            "used": torch.zeros_like(pf, dtype=torch.bool), "veto": None,
        }
        batch.cache["stages"] = {"base": base, "refined": refined}
        batch.cache["thresholds"] = thr
        stats["threshold_mean"] = float(np.mean(thr))
        return stats

    def _filter_components(self, fr: dict[str, Any], q_fused: torch.Tensor) -> dict[str, Any]:
        """Connectivity filter (round 0): drop the noisy components' labels and veto them from the
        reliable set, so they go to negative learning."""
        labels, component = fr["labels"], fr["component"]
        if self.refinement is None or not self.on["connectivity"]:
            return {}
        lab = labels.clamp_min(0)
        point_loss = -torch.log(q_fused.detach().gather(1, lab[:, None])[:, 0].clamp_min(1e-12))
        point_loss = torch.where(labels >= 0, point_loss, torch.zeros_like(point_loss))
        keep, fstats = self.refinement.filter(component, labels, point_loss)
        dropped = (labels >= 0) & ~keep
        fr["labels"] = torch.where(dropped, torch.full_like(labels, -1), labels)
        fr["veto"] = dropped
        return {f"connectivity_{k}": v for k, v in fstats.items()}

    # -- every round ----------------------------------------------------------------------------

    def step(self, batch: Batch) -> dict[str, Any]:
        a = self.cfg.adapt
        stats: dict[str, Any] = {}
        if batch.round == 0:
            stats.update(self._prepare_frame(batch))
        if batch.cache.get("skip"):
            return stats
        fr = batch.cache["full"]
        in_view = batch.in_view
        out = forward_points(self.models.student, batch)
        _, _, qf = out.probs(in_view)
        if batch.round == 0:
            stats.update(self._filter_components(fr, qf))
            batch.cache["stages"]["filtered"] = fr["labels"]
        labels = fr["labels"]

        split = reliability_split(fr["pf"], qf, labels, min_confidence=a.reliable_confidence,
                                  max_variance=a.reliable_variance, veto=fr["veto"])
        target = split.target
        loss_ce = _branch_ce(out, target, in_view)
        total = loss_ce
        n = max(1, batch.num_points)
        stats.update(reliable=int(split.reliable.sum()) / n, density=int((labels >= 0).sum()) / n)

        if self.on["negative"] and batch.round < a.negative_rounds:
            classes, fr["used"] = losses.select_negative_classes(fr["pf"], fr["used"], split.unreliable,
                                                                 a.negative_max_prob)
            loss_neg = (losses.negative_learning(out.logits_3d, classes)
                        + losses.negative_learning(out.logits_2d, classes[in_view]))
            total = total + a.weight_negative * loss_neg
            stats.update(loss_negative=float(loss_neg.detach()), negative=int((classes >= 0).sum()) / n)

        if self.on["erda"] and self.banks["3d"].ready:
            b2, b3 = self.banks["2d"], self.banks["3d"]
            loss_erda = losses.erda(out.feat_3d, b3.vectors, out.logits_3d, tau=a.erda_tau, lam=a.erda_lambda,
                                    valid=b3.initialised)
            if b2.ready:
                loss_erda = loss_erda + losses.erda(out.feat_2d, b2.vectors, out.logits_2d, tau=a.erda_tau,
                                                    lam=a.erda_lambda, valid=b2.initialised)
            total = total + a.weight_erda * loss_erda
            stats["loss_erda"] = float(loss_erda.detach())

        if self.on["xm"]:
            loss_xm = losses.cross_modal_kl(out.logits_2d, out.logits_3d[in_view], fr["p2"], fr["p3"][in_view])
            total = total + a.weight_xm * loss_xm
            stats["loss_xm"] = float(loss_xm.detach())

        self._optimise(total)
        if self.on["restore"]:
            stats["restored_elements"] = self.models.restore_elements(a.restore_prob, self.generator)
        if self.on["erda"]:
            self.banks["3d"].update(out.feat_3d.detach(), target)
            self.banks["2d"].update(out.feat_2d.detach(), target[in_view])
        stats.update(loss=float(total.detach()), loss_ce=float(loss_ce.detach()))
        return stats


METHODS: dict[str, type[Method]] = {m.name: m for m in (Source, Tent, PseudoLabel, Full)}


def build_method(cfg: Config, source: torch.nn.Module, header: CheckpointHeader, *,
                 initial_state: dict[str, torch.Tensor] | None = None, generator: torch.Generator | None = None,
                 mask_provider: Any = None) -> Method:
    """The method named by cfg.adapt.method. ``source`` is copied, never modified."""
    cls = METHODS[cfg.adapt.method]
    kw: dict[str, Any] = {"initial_state": initial_state, "generator": generator}
    if cls is Full:
        kw["mask_provider"] = mask_provider
    return cls(cfg, source, header, **kw)
