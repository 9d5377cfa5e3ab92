"""The adaptation methods, one class each: ``prepare(state)`` once per frame, then ``step(state)
-> StepResult`` for each step on it (names registered in ``pl3d_ros.registry.METHODS``).

``prepare`` does the frame's work (teacher and source forwards, pseudo-labels, masks, the
collapse guard) and fills the :class:`~pl3d_ros.adapt.state.FrameState`; ``step`` runs one
student update on a mini-batch of prepared frames (the newest and frames from the memory, one
batched forward) with the method's loss terms (``adapt/terms.py``), averaged over the frames;
``refresh`` re-labels a memory frame with the current teacher (forward only). Every method
exposes ``teacher`` (the network to deploy), ``reset()`` (back to the source) and
``snapshot()`` / ``rollback()`` (undo a failed step).

source  no adaptation.
tent    entropy of the fused prediction, normalisation layers only, one step per frame; the
        adapted network itself is deployed (no mean teacher).
pl      online xMUDA-PL: section 0 pseudo-labels from the deployed network, cross-entropy on
        both branches (3D on every labelled point, 2D on the labelled in-view points); no mean
        teacher.
full    sections 0-5 with a mean teacher; each component can be switched off through
        cfg.adapt.disable (registry.COMPONENTS).
"""

from __future__ import annotations

import functools
from contextlib import nullcontext
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from pl3d_ros import registry
from pl3d_ros.adapt import terms as T
from pl3d_ros.adapt.consistency import BranchConsistency
from pl3d_ros.adapt.fusion import BranchShift, ShiftChangeDetector
from pl3d_ros.adapt.pseudo_labels import PseudoLabeler
from pl3d_ros.adapt.reliability import reliability_split
from pl3d_ros.adapt.selection import SourceSelector, branch_agreement
from pl3d_ros.adapt.shift_gate import ShiftGate, reference_shift
from pl3d_ros.adapt.state import FrameState, PseudoLabels, StepResult, TeacherOutput
from pl3d_ros.adapt.teacher import CollapseGuard, TeacherStudent
from pl3d_ros.config import Config
from pl3d_ros.inputs import NetworkInputs, PointOutputs, forward_points, point_outputs
from pl3d_ros.models.checkpoint import CheckpointHeader
from pl3d_ros.models.points import Fusion


@functools.lru_cache(maxsize=None)
def _cpu_has_bf16() -> bool:
    """AVX512-BF16 or AMX-BF16 in /proc/cpuinfo (Linux); elsewhere: no."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 arithmetic is native on ``device`` (without it autocast emulates and is slower)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    return device.type == "cpu" and _cpu_has_bf16()


class NonFiniteOutputs(FloatingPointError):
    """The deployed network computes NaN / inf on a frame: its weights are unusable."""


class Method:
    """Shared plumbing: the teacher/student pair, the optimizer step, undo and reset."""

    name: ClassVar[str] = "base"
    adapts: ClassVar[bool] = True  # False: no weights ever change, nothing to hand to the backend
    teacher_momentum: ClassVar[float | None] = None  # None: cfg.adapt.teacher_momentum
    trainable: ClassVar[str | None] = None  # None: cfg.adapt.trainable
    deploy: ClassVar[str | None] = None  # None: cfg.adapt.deploy

    def __init__(self, cfg: Config, source: torch.nn.Module, header: CheckpointHeader, *,
                 initial_state: dict[str, torch.Tensor] | None = None,
                 generator: torch.Generator | None = None, mask_provider: Any = None) -> None:
        a = cfg.adapt
        self.cfg = cfg
        self.header = header
        self.num_classes = header.class_set.num_classes
        self.generator = generator
        momentum = self.momentum(cfg)
        self.models = TeacherStudent(source, trainable=self.trainable or a.trainable, optimizer=a.optimizer,
                                     lr=a.lr, momentum=momentum, initial_state=initial_state,
                                     other_lr_scale=a.other_lr_scale, deploy=self.deploy or a.deploy,
                                     bn_prior=a.bn_prior_steps, bn_floor=a.bn_momentum_floor)
        self.terms: list[T.LossTerm] = []
        self.bf16 = a.precision == "bf16" or (a.precision == "auto" and native_bf16(self.device))
        self.fusion = Fusion.of(cfg.runtime.fusion, header)  # the deployed segmenter's (models.points.fuse)
        self.fusion_bias: torch.Tensor | None = None  # branch log-weights of the fusion (None: plain)

    @property
    def loss_bias(self) -> torch.Tensor | None:
        """The branch log-weights of the fused prediction the loss terms see: the deployed
        fusion's, or none (adapt.loss_fusion plain: the branches' plain product, as tent's)."""
        return self.fusion_bias if self.cfg.adapt.loss_fusion == "deployed" else None

    def momentum(self, cfg: Config) -> float:
        """The teacher's EMA momentum (0: the teacher is the student after every step)."""
        return cfg.adapt.teacher_momentum if self.teacher_momentum is None else self.teacher_momentum

    @property
    def teacher(self) -> torch.nn.Module:
        """The network deployed to the backend (see TeacherStudent.deployed)."""
        return self.models.deployed

    @property
    def device(self) -> torch.device:
        return next(self.models.student.parameters()).device

    def prepare(self, state: FrameState) -> None:
        """The frame's work, once, before its steps (nothing by default)."""

    def step(self, states: FrameState | list[FrameState]) -> StepResult:
        """One student step on prepared frames (the first is the newest)."""
        raise NotImplementedError

    def refresh(self, state: FrameState) -> None:
        """Re-label a memory frame with the current teacher (nothing to do by default)."""

    def autocast(self):
        """bf16 autocast of forwards and backwards when ``adapt.precision`` is bf16."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def reset(self) -> None:
        """Back to the source weights with every piece of online state cleared."""
        self.models.restore_source()
        for term in self.terms:
            term.reset()

    def snapshot(self) -> Any:
        return self.models.snapshot()

    def rollback(self, snap: Any) -> None:
        self.models.rollback(snap)

    def _student_step(self, states: FrameState | list[FrameState], split_fn=None
                      ) -> tuple[list[T.StepContext], torch.Tensor, dict[str, float]]:
        """One batched student forward over ``states``, ``split_fn(ctx)`` per frame (the
        reliability split, where the method has one), the method's terms per frame averaged over
        the frames, optimizer step and teacher EMA; counts the step on every frame."""
        states = [states] if isinstance(states, FrameState) else list(states)
        self.models.before_student_forward()
        with self.autocast():
            outs = forward_points_batch(self.models.student, [st.inputs for st in states])
        ctxs, total, values = [], None, {}
        for st, out in zip(states, outs):
            out = out.float()
            _, _, qf = out.probs(st.in_view, self.loss_bias, rule=self.fusion)
            ctx = T.StepContext(st, out, qf)
            if split_fn is not None:
                split_fn(ctx)
            loss, vals = T.total_loss(self.terms, ctx)
            if loss is not None:
                total = loss if total is None else total + loss
            for k, v in vals.items():
                values[k] = values.get(k, 0.0) + v / len(states)
            ctxs.append(ctx)
        if total is None:  # nothing to learn on these frames: no update at all
            total = torch.zeros((), device=self.device)
        else:
            if len(states) > 1:
                total = total / len(states)
            self._optimise(total)
        for st in states:
            st.steps += 1
        return ctxs, total, values

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
        # A finite loss can still have NaN gradients (or an lr that overflows the update): such
        # weights must never reach the backend. Raising makes the adapter roll the frame back.
        bad = self.models.nonfinite()
        if bad:
            raise FloatingPointError(f"{self.name}: non-finite weights after the step ({', '.join(bad[:3])}"
                                     f"{', ...' if len(bad) > 3 else ''})")


class Source(Method):
    """No adaptation: the source network stays deployed."""

    name = "source"
    adapts = False

    def step(self, state: FrameState) -> StepResult:
        raise RuntimeError("the source method does not adapt")


class Tent(Method):
    """TENT on the fused prediction: minimise its mean entropy; norm layers only, one step."""

    name = "tent"
    teacher_momentum = 0.0
    trainable = "norm"
    deploy = "teacher"  # = the student after every step (momentum 0)

    def __init__(self, cfg: Config, source: torch.nn.Module, header: CheckpointHeader, **kw: Any) -> None:
        super().__init__(cfg, source, header, **kw)
        self.terms = [T.FusedEntropy(margin=cfg.adapt.entropy_margin)]

    def step(self, states: FrameState | list[FrameState]) -> StepResult:
        _, total, values = self._student_step(states)
        return StepResult(float(total.detach()), values)


def teacher_pass(method: Method, state: FrameState) -> TeacherOutput:
    """The teacher's probabilities on the frame (no gradient). Non-finite outputs (finite
    weights can still overflow on an input) raise NonFiniteOutputs."""
    with torch.no_grad(), method.autocast():
        out = forward_points(method.models.teacher, state.inputs).float()
    with torch.no_grad():
        p2, p3, pf = out.probs(state.in_view, method.fusion_bias, rule=method.fusion)
    if not (bool(torch.isfinite(pf).all()) and bool(torch.isfinite(p2).all())):
        raise NonFiniteOutputs("the deployed network's outputs on this frame are not finite")
    return TeacherOutput(p2, p3, pf)


class PseudoLabel(Method):
    """Online xMUDA-PL: section 0 pseudo-labels, cross-entropy, no mean teacher."""

    name = "pl"
    teacher_momentum = 0.0
    deploy = "teacher"  # = the student after every step (momentum 0)

    def __init__(self, cfg: Config, source: torch.nn.Module, header: CheckpointHeader, **kw: Any) -> None:
        super().__init__(cfg, source, header, **kw)
        pl = cfg.pseudo_labels
        self.labeler = PseudoLabeler(self.num_classes, pl.median_window_frames, pl.confidence_cap)
        self.terms = [T.PseudoLabelCE()]

    def reset(self) -> None:
        super().reset()
        self.labeler.reset()

    def prepare(self, state: FrameState) -> None:
        state.teacher = teacher_pass(self, state)
        labels, state.thresholds = self.labeler(state.teacher.fused)
        state.labels = PseudoLabels(labels, labels, labels, labels)
        state.stats["threshold_mean"] = float(np.mean(state.thresholds))

    def refresh(self, state: FrameState) -> None:
        """The current teacher's labels under the current class-wise thresholds (the running
        window is not fed again: the frame was counted when it was new)."""
        state.teacher = teacher_pass(self, state)
        labels = self.labeler.relabel(state.teacher.fused)
        state.labels = PseudoLabels(labels, labels, labels, labels)

    def step(self, states: FrameState | list[FrameState]) -> StepResult:
        ctxs, total, values = self._student_step(states)
        labels = ctxs[0].state.train_labels
        n = max(1, ctxs[0].state.num_points)
        return StepResult(float(total.detach()), values,
                          {"density": int((labels >= 0).sum()) / n,
                           "threshold_mean": ctxs[0].state.stats.get("threshold_mean", float("nan"))})


class Full(Method):
    """Sections 0-5 (see METHODS.md and the module docstrings of each part).

    prepare: teacher forward (eval: the deployed network) and, when needed, a source forward
    (collapse guard, prototype initialisation); the collapse check, restoring the source when it
    fires (then the frame gets no steps); section 0 pseudo-labels; masks + MLA/GAPP when due.
    First step on a frame: the connectivity filter with the student's per-point loss. Every step:
    student forward, reliability split, the loss terms (CE on the reliable points, negative
    learning in the first ``negative_rounds`` steps, ERDA, cross-modal KL), optimizer step,
    teacher EMA, stochastic restore, prototype EMA.

    Components (registry.COMPONENTS; cfg.adapt.enable / disable, AdaptConfig.enabled): mla off =
    no refinement at all (GAPP needs MLA's mask classes); gapp off = naive MLA (every point of a
    kept mask takes its class); mt off = teacher momentum 0 (the teacher is the student); ce,
    connectivity, negative, erda, xm, entropy, restore (the stochastic restore), guard (the
    collapse guard), fusion and shift_reset each drop their own part; select serves the frozen
    source while its branches agree more than the adapted network's, or while a change of domain
    is suspected (adapt/selection.py); gate (off by default) scales each branch's learning rate by
    how far its input moved from the source data (adapt/shift_gate.py).
    """

    name = "full"

    def __init__(self, cfg: Config, source: torch.nn.Module, header: CheckpointHeader, *,
                 mask_provider: Any = None, **kw: Any) -> None:
        super().__init__(cfg, source, header, **kw)
        a, pl = cfg.adapt, cfg.pseudo_labels
        on = {c: a.enabled(c) for c in registry.COMPONENTS}
        self.components = on
        self.labeler = PseudoLabeler(self.num_classes, pl.median_window_frames, pl.confidence_cap)
        dev = self.device
        self.refinement = None
        if on["mla"]:  # mla off: no refinement at all (GAPP needs MLA's mask classes)
            from pl3d_ros.adapt.refinement import RefinementStage

            self.refinement = RefinementStage(cfg, header.sensor, gapp=on["gapp"], connectivity=on["connectivity"],
                                              mask_provider=mask_provider, device=str(dev))
        student = self.models.student
        self.erda = (T.ErdaSoftLoss(a.weight_erda, a.erda_tau, a.erda_lambda, a.prototype_momentum,
                                    self.num_classes, student.image.feature_dim, student.range.feature_dim, dev)
                     if on["erda"] else None)
        self.terms = [T.ReliableCE(a.weight_ce, a.ce_class_balanced)] if on["ce"] else []
        if on["negative"]:
            self.terms.append(T.NegativeLearning(a.weight_negative, a.negative_max_prob, a.negative_rounds))
        if self.erda is not None:
            self.terms.append(self.erda)
        if on["xm"]:
            self.terms.append(T.CrossModalKL(a.weight_xm))
        if on["entropy"]:
            self.terms.append(T.BranchEntropy(a.weight_entropy) if a.entropy_of == "branches"
                              else T.FusedEntropy(a.weight_entropy, a.entropy_margin))
        self.guard = (CollapseGuard(self.num_classes, a.collapse_window, a.collapse_max_class_share,
                                    a.collapse_max_disagreement) if on["guard"] else None)
        needs_shift = on["fusion"] or on["shift_reset"] or on["gate"]
        self.shift = BranchShift(self.models.source, a.fusion_momentum) if needs_shift else None
        # the source data's own shift, for the gate and the reference-relative fusion (measured once)
        self.shift_reference = (self._reference_shift(cfg, header)
                                if on["gate"] or (on["fusion"] and a.fusion_reference) else None)
        self.gate = ShiftGate(self.shift_reference, a.gate_full_ratio) if on["gate"] else None
        self.selector = SourceSelector(a.select_momentum, a.select_margin) if on["select"] else None
        self.change = (ShiftChangeDetector(a.shift_reset_min_jump, a.shift_reset_min_ratio)
                       if on["shift_reset"] else None)
        self.domain_resets = 0
        if on["fusion"]:
            self.fusion_bias = torch.zeros(2, device=dev)
        self._shift_bias = self.fusion_bias
        self.consistency = (BranchConsistency(self.num_classes, a.consistency_voxel_m, a.fusion_momentum)
                            if a.fusion_consistency > 0 else None)
        self._compose_bias()
        self.collapses = 0

    def _compose_bias(self) -> None:
        """fusion_bias = the shift term (fusion on) + the consistency term (fusion_consistency > 0)."""
        if self.consistency is None:
            self.fusion_bias = self._shift_bias
            return
        cons = self.consistency.bias(self.cfg.adapt.fusion_consistency).to(self.device)
        self.fusion_bias = cons if self._shift_bias is None else self._shift_bias + cons

    def _reference_shift(self, cfg: Config, header: CheckpointHeader) -> torch.Tensor:
        """The source data's (image, range) shift (2,), measured on the frozen source over frames
        of the model's training data (adapt.gate_reference, else runtime.int8_calibration)."""
        from pl3d_ros.runtime.quantization import calibration_feeds

        a, m = cfg.adapt, header.model
        spec = a.gate_reference or cfg.runtime.int8_calibration
        feeds = calibration_feeds(spec, a.gate_reference_frames, (m.image_width, m.image_height), header.sensor)
        return reference_shift(self.models.source, feeds)

    def momentum(self, cfg: Config) -> float:
        """mt off: momentum 0, the teacher is the student after every step (what is deployed)."""
        return cfg.adapt.teacher_momentum if cfg.adapt.enabled("mt") else 0.0

    def reset(self) -> None:
        super().reset()
        self.labeler.reset()
        if self.shift is not None:
            self.shift.reset()
        if self._shift_bias is not None:
            self._shift_bias = torch.zeros_like(self._shift_bias)
        if self.consistency is not None:
            self.consistency.reset()
        self._compose_bias()
        if self.guard is not None:
            self.guard.reset()
        if self.refinement is not None:
            self.refinement.reset()
        if self.selector is not None:
            self.selector.reset()

    def prepare(self, state: FrameState) -> None:
        st = state.stats
        source_out = source_fused = None
        source_probs = None
        if (self.guard is not None or self.shift is not None or self.selector is not None
                or (self.erda is not None and self.erda.needs_source)):
            with torch.no_grad(), self.autocast(), (self.shift if self.shift is not None else nullcontext()):
                source_out = forward_points(self.models.source, state.inputs).float()
            if self.shift is not None:
                frame_shift = self.shift.frame_shift()
                if self.change is not None and frame_shift is not None and self.change.observe(frame_shift):
                    # A new domain: what was adapted to the last one is worse than the source
                    # here, so start again from the source (this frame's shift seeds the new one).
                    self.reset()
                    self.domain_resets += 1
                    state.domain_reset = True
                    st["domain_reset"] = True
                shift = self.shift.update()
                if self._shift_bias is not None:
                    reference = self.shift_reference if self.cfg.adapt.fusion_reference else None
                    self._shift_bias = self.shift.bias(self.cfg.adapt.fusion_beta, reference).to(self.device)
                    self._compose_bias()
                st.update(shift_2d=float(shift[0]), shift_3d=float(shift[1]))
                if self.gate is not None:
                    gains = self.gate.gains(shift)
                    self.models.set_branch_gains(gains, statistics=self.cfg.adapt.gate_statistics)
                    st.update(gate_2d=gains["image"], gate_3d=gains["range"])
            with torch.no_grad():
                source_probs = source_out.probs(state.in_view, self.fusion_bias, rule=self.fusion)
                source_fused = source_probs[2]
        state.teacher = teacher = teacher_pass(self, state)
        if self.guard is not None:
            check = self.guard.observe(teacher.fused.argmax(1), source_fused.argmax(1))
            st.update(class_share=check.class_share, disagreement=check.disagreement)
            if check.triggered:
                # The deployed network collapsed: back to the source, and no update on this frame,
                # so what goes to the backend now is exactly the source.
                self.reset()
                self.collapses += 1
                state.collapsed = True
                st["collapse"] = True
                return
        st["collapse"] = False
        if self.selector is not None and source_probs is not None:
            self._select(state, source_probs)
        if self.consistency is not None:
            self._observe_consistency(state)

        base, state.thresholds = self.labeler(teacher.fused)
        base = self._viewed(base, state)
        refined, state.component = base, torch.full_like(base, -1)
        if self.refinement is not None and self.refinement.due(state.index):
            refined, state.component, rstats = self.refinement.refine(state, base)
            st.update({f"refine_{k}": v for k, v in rstats.items() if isinstance(v, (int, float, bool))})
        if self.erda is not None and source_out is not None:
            self.erda.observe_source(source_out, source_fused.argmax(1), state.in_view)
        state.labels = PseudoLabels(base, refined)
        st["threshold_mean"] = float(np.mean(state.thresholds))

    def _select(self, state: FrameState, source_probs: tuple[torch.Tensor, ...]) -> None:
        """Source selection: serve the source while its branches agree more than the adapted
        network's (adapt/selection.py); a change is handed to the backend at once."""
        view = state.in_view
        s2, s3, _ = source_probs
        agree_source = branch_agreement(s2, s3[view])
        agree_adapted = branch_agreement(state.teacher.p2, state.teacher.p3[view])
        suspected = self.change is not None and self.change.suspected
        if self.selector.observe(agree_source, agree_adapted, suspected):
            self.models.serve_source = self.selector.serve_source
            state.redeploy = True
        state.stats.update(agree_source=agree_source, agree_adapted=agree_adapted,
                           serve_source=self.models.serve_source, change_suspected=suspected)

    def _observe_consistency(self, state: FrameState) -> None:
        """The deployed network's branch labels on this frame against the last frame's: the
        consistency term of the fusion that this frame's steps and the next frames use."""
        frame, view, t = state.frame, state.in_view, state.teacher
        frame_value = self.consistency.update(frame.points[view.cpu().numpy(), :3], frame.pose, frame.stamp_ns,
                                              t.p2.argmax(1).cpu().numpy(), t.p3[view].argmax(1).cpu().numpy())
        self._compose_bias()
        if frame_value is not None:
            state.stats.update(consistency_2d=float(frame_value[0]), consistency_3d=float(frame_value[1]))

    def refresh(self, state: FrameState) -> None:
        """A memory frame re-labelled by the current teacher: base labels under the current
        thresholds, MLA + GAPP again on the frame's stored masks; the connectivity filter and the
        negative classes start over at the frame's next step."""
        state.teacher = teacher_pass(self, state)
        base = self._viewed(self.labeler.relabel(state.teacher.fused), state)
        refined, component = base, torch.full_like(base, -1)
        if self.refinement is not None and state.masks is not None:
            refined, component, _ = self.refinement.relabel(state, base)
        state.component = component
        state.labels = PseudoLabels(base, refined)
        state.veto = state.negatives_used = None

    def _viewed(self, base: torch.Tensor, state: FrameState) -> torch.Tensor:
        """Base labels (N,) without the points outside the camera when pseudo_labels.out_of_view
        is off (there only the 3D branch votes)."""
        if self.cfg.pseudo_labels.out_of_view:
            return base
        return torch.where(state.in_view, base, torch.full_like(base, -1))

    def _filter_components(self, state: FrameState, q_fused: torch.Tensor) -> dict[str, Any]:
        """Connectivity filter (first step on a frame): drop the noisy components' labels and
        veto them from the reliable set, so they go to negative learning."""
        labels = state.labels.refined
        state.labels.filtered = labels
        if self.refinement is None or not self.components["connectivity"]:
            return {}
        lab = labels.clamp_min(0)
        point_loss = -torch.log(q_fused.detach().gather(1, lab[:, None])[:, 0].clamp_min(1e-12))
        point_loss = torch.where(labels >= 0, point_loss, torch.zeros_like(point_loss))
        keep, fstats = self.refinement.filter(state.component, labels, point_loss)
        dropped = (labels >= 0) & ~keep
        state.labels.filtered = torch.where(dropped, torch.full_like(labels, -1), labels)
        state.veto = dropped
        return {f"connectivity_{k}": v for k, v in fstats.items()}

    def step(self, states: FrameState | list[FrameState]) -> StepResult:
        a = self.cfg.adapt
        stats: dict[str, Any] = {}
        first = states if isinstance(states, FrameState) else states[0]

        def split(ctx: T.StepContext) -> None:
            state = ctx.state
            if state.labels.filtered is None:
                fstats = self._filter_components(state, ctx.q_fused)
                if state is first:
                    stats.update(fstats)
            labels = state.labels.filtered
            ctx.split = reliability_split(state.teacher.fused, ctx.q_fused, labels, min_confidence=a.reliable_confidence,
                                          max_variance=a.reliable_variance, veto=state.veto)
            if state.labels.trained is None:
                state.labels.trained = ctx.split.target
            if state is first:
                n = max(1, state.num_points)
                stats.update(reliable=int(ctx.split.reliable.sum()) / n, density=int((labels >= 0).sum()) / n)

        ctxs, total, values = self._student_step(states, split)
        if self.components["restore"]:
            stats["restored_elements"] = self.models.restore_elements(a.restore_prob, self.generator)
        for ctx in ctxs:
            for term in self.terms:
                term.after_step(ctx)
        stats.update(ctxs[0].stats)
        return StepResult(float(total.detach()), values, stats)


def forward_points_batch(model: torch.nn.Module, inputs: list[NetworkInputs]) -> list[PointOutputs]:
    """One forward of ``model`` over several frames (stacked: the inputs share their shapes), then
    each frame's per-point outputs. BatchNorm in train mode normalises over the whole batch."""
    if len(inputs) == 1:
        return [forward_points(model, inputs[0])]
    l2, l3, f2, f3 = model.forward_features(torch.cat([x.image for x in inputs]),
                                            torch.cat([x.range_image for x in inputs]))
    return [point_outputs(x, l2[i:i + 1], l3[i:i + 1], f2[i:i + 1], f3[i:i + 1]) for i, x in enumerate(inputs)]


def build_method(cfg: Config, source: torch.nn.Module, header: CheckpointHeader, *,
                 initial_state: dict[str, torch.Tensor] | None = None, generator: torch.Generator | None = None,
                 mask_provider: Any = None) -> Method:
    """The method named by cfg.adapt.method (``registry.METHODS``). ``source`` is copied, never
    modified."""
    cls = registry.METHODS.get(cfg.adapt.method)
    kw: dict[str, Any] = {"initial_state": initial_state, "generator": generator}
    if cls is Full:
        kw["mask_provider"] = mask_provider
    return cls(cfg, source, header, **kw)
