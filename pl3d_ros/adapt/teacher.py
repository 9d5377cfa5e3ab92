"""Mean teacher, trainable-parameter selection, stochastic restore and the collapse guard
(METHODS.md section 5).

BatchNorm. The student runs in train mode: BN normalises with the frame's own batch statistics
(as TENT, MM-TTA and Latte do at test time) and updates its running statistics with BN's
momentum, so the running statistics follow the target domain. The teacher is the EMA of the
student's trainable parameters *and* of its BN running statistics, and always runs in eval mode,
i.e. with running statistics: exactly what the deployed backend computes (the ONNX export folds
BN with the running statistics). The teacher produces the pseudo-labels and is what is handed to
``on_weights`` and checkpointed, so the pseudo-labels always come from the deployed network, and
the deployed normalisation is the running average of the statistics the affine parameters were
learned under.
"""

from __future__ import annotations

import copy
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)


def norm_parameter_names(model: nn.Module) -> set[str]:
    """Affine parameters of the normalisation layers."""
    names: set[str] = set()
    for mname, module in model.named_modules():
        if isinstance(module, NORM_TYPES):
            for pname, _ in module.named_parameters(recurse=False):
                names.add(f"{mname}.{pname}" if mname else pname)
    return names


def select_trainable(model: nn.Module, mode: str) -> list[str]:
    """Set requires_grad for ``mode`` and return the trainable parameter names (in
    ``named_parameters`` order): "norm" the affine parameters of normalisation layers (TENT),
    "norm_heads" those and the per-pixel classifier heads (parameters under a module named
    ``head``), "all" everything."""
    if mode not in ("norm", "norm_heads", "all"):
        raise ValueError(f"trainable mode must be norm, norm_heads or all, got {mode!r}")
    if mode == "all":
        names = {n for n, _ in model.named_parameters()}
    else:
        names = norm_parameter_names(model)
        if mode == "norm_heads":
            names |= {n for n, _ in model.named_parameters() if "head" in n.split(".")[:-1]}
    ordered = []
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)
        if n in names:
            ordered.append(n)
    return ordered


def state_buffers(model: nn.Module) -> list[str]:
    """Names of the buffers that are part of the state dict (BN running statistics and counters;
    not the non-persistent input normalisation constants)."""
    keys = set(model.state_dict().keys())
    return [n for n, _ in model.named_buffers() if n in keys]


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float, params: list[str],
               buffers: list[str]) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student for ``params``; ``buffers`` (BN
    running statistics and counters) are copied from the student.

    Only the named parameters are averaged: the frozen ones are identical in both networks, and
    averaging x with itself in float32 is not always exactly x.
    """
    tp, sp = dict(teacher.named_parameters()), dict(student.named_parameters())
    for n in params:
        tp[n].mul_(momentum).add_(sp[n].detach(), alpha=1.0 - momentum)
    # BN running statistics are copied, not averaged: they already are an exponential average
    # (BN momentum 0.1) of the student's target-domain batches, and averaging them again at 0.999
    # would deploy gamma/beta learned under target statistics on top of ~source statistics.
    tb, sb = dict(teacher.named_buffers()), dict(student.named_buffers())
    for n in buffers:
        tb[n].copy_(sb[n])


@torch.no_grad()
def stochastic_restore(student: nn.Module, source: nn.Module, params: list[str], prob: float,
                       generator: torch.Generator | None = None) -> int:
    """CoTTA: reset each element of the ``params`` of ``student`` to its ``source`` value with
    probability ``prob`` -> number of elements reset."""
    if prob <= 0.0:
        return 0
    sp, src = dict(student.named_parameters()), dict(source.named_parameters())
    restored = 0
    for n in params:
        p = sp[n]
        # drawn on the generator's device (a CPU generator keeps CPU and CUDA runs identical)
        gen_device = generator.device if generator is not None else p.device
        mask = (torch.rand(p.shape, generator=generator, device=gen_device) < prob).to(p.device)
        p.copy_(torch.where(mask, src[n], p))
        restored += int(mask.sum())
    return restored


def make_optimizer(params: list[nn.Parameter] | list[dict], kind: str, lr: float) -> torch.optim.Optimizer:
    """adam (TENT's and Latte's choice for online TTA) or sgd with momentum 0.9; ``params`` may
    be parameter groups with their own ``lr``."""
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999))
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    raise ValueError(f"optimizer must be adam or sgd, got {kind!r}")


class TeacherStudent:
    """The frozen source, the trainable student and its EMA teacher, plus their optimizer.

    source: the source network; a private frozen copy (eval mode, requires_grad False) is kept.
    initial_state: weights to start teacher and student from (a resumed adapted checkpoint);
    None starts from the source. Restores always go back to ``source``.
    momentum: teacher EMA momentum; 0 makes the teacher a copy of the student after every step
    (the TENT and PL baselines, which have no mean teacher). other_lr_scale: learning rate of
    trainable parameters that are not normalisation affines, relative to ``lr``. deploy: which
    network goes to the backend (``deployed``). bn_prior: 0 keeps BN's own momentum for the
    student's running statistics; > 0 makes them a cumulative average of the batch statistics
    since the source, the source's weighted as ``bn_prior`` batches (momentum
    max(1 / (bn_prior + n + 1), bn_floor) at the n-th student forward): in a long domain the
    deployed statistics are then the domain's average rather than the last ~10 frames'.
    """

    def __init__(self, source: nn.Module, *, trainable: str = "norm", optimizer: str = "adam",
                 lr: float = 1e-4, momentum: float = 0.999,
                 initial_state: dict[str, torch.Tensor] | None = None, other_lr_scale: float = 0.1,
                 deploy: str = "teacher", bn_prior: float = 0.0, bn_floor: float = 0.02) -> None:
        self.source = copy.deepcopy(source).eval()  # our own copy: the caller's model is left as is
        for p in self.source.parameters():
            p.requires_grad_(False)
        self.student = copy.deepcopy(source)
        self.teacher = copy.deepcopy(source)
        if initial_state is not None:
            self.student.load_state_dict(initial_state, strict=True)
            self.teacher.load_state_dict(initial_state, strict=True)
        self.params = select_trainable(self.student, trainable)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.buffers = state_buffers(self.student)
        self.student.train()  # batch statistics + running-stat updates (module docstring)
        for m in self.student.modules():  # ... but no dropout: a step must see the deployed network
            if isinstance(m, nn.modules.dropout._DropoutNd):
                m.eval()
        self.teacher.eval()
        self.optimizer_kind, self.lr, self.momentum = optimizer, float(lr), float(momentum)
        self.other_lr_scale = float(other_lr_scale)
        if deploy not in ("teacher", "student"):
            raise ValueError(f"deploy must be teacher or student, got {deploy!r}")
        self.deploy = deploy
        self.serve_source = False  # the source is served instead (full's component select)
        self.optimizer = self._new_optimizer()
        self.updates = 0  # teacher updates since the source (EMA warm-up)
        # the student's BN layers with their momenta before any gain or schedule, and their branch
        self._bn = [(m, float(m.momentum), n.split(".")[0]) for n, m in self.student.named_modules()
                    if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.momentum is not None]
        self.bn_prior, self.bn_floor = float(bn_prior), float(bn_floor)
        self.bn_updates = 0  # student forwards since the source (the cumulative average's count)
        self._stat_gains: dict[str, float] = {}  # per-branch gains of the BN momentum (shift gate)

    def _new_optimizer(self) -> torch.optim.Optimizer:
        """Normalisation parameters at ``lr``, any other trainable ones at ``lr * other_lr_scale``
        (heads and convolutions move the network further per step than BN affines do)."""
        named = dict(self.student.named_parameters())
        norm = norm_parameter_names(self.student)
        groups = []
        # One group per (branch, kind): set_branch_gains scales a branch's rate (the shift gate).
        for branch in sorted({n.split(".")[0] for n in self.params}):
            for is_norm, lr in ((True, self.lr), (False, self.lr * self.other_lr_scale)):
                params = [named[n] for n in self.params if n.split(".")[0] == branch and (n in norm) == is_norm]
                if params:
                    groups.append({"params": params, "lr": lr, "base_lr": lr, "branch": branch})
        return make_optimizer(groups, self.optimizer_kind, self.lr)

    def set_branch_gains(self, gains: Mapping[str, float], statistics: bool = False) -> None:
        """Learning rate of each branch's parameters = its base rate x ``gains[branch]`` (a
        top-level module name: "image", "range"); a branch not named keeps its base rate. Until
        the next restore_source, which starts again at the base rates. statistics: scale the
        momentum of the branch's BN running statistics too (gain 0: they stay where they are)."""
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * float(gains.get(group["branch"], 1.0))
        self._stat_gains = {k: float(v) for k, v in gains.items()} if statistics else {}
        self._set_bn_momentum()

    def _set_bn_momentum(self) -> None:
        """Each student BN's momentum for its next forward: BN's own, or the cumulative
        average's (``bn_prior`` in the class docstring), times its branch's statistics gain."""
        scheduled = max(1.0 / (self.bn_prior + self.bn_updates + 1.0), self.bn_floor) if self.bn_prior > 0 else None
        for module, base, branch in self._bn:
            module.momentum = (base if scheduled is None else scheduled) * self._stat_gains.get(branch, 1.0)

    def before_student_forward(self) -> None:
        """Called before each train-mode student forward: sets the BN momenta it updates its
        running statistics with, and counts it."""
        if self.bn_prior > 0:
            self._set_bn_momentum()
        self.bn_updates += 1

    @torch.no_grad()
    def nonfinite(self) -> list[str]:
        """Names of trainable parameters or state buffers of student or teacher holding a NaN or
        an infinity (empty when all are finite)."""
        bad = []
        for tag, net in (("student", self.student), ("teacher", self.teacher)):
            named_p, named_b = dict(net.named_parameters()), dict(net.named_buffers())
            for n in self.params:
                if not bool(torch.isfinite(named_p[n]).all()):
                    bad.append(f"{tag}.{n}")
            for n in self.buffers:
                t = named_b[n]
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    bad.append(f"{tag}.{n}")
        return bad

    def update_teacher(self) -> None:
        """EMA with the Mean Teacher warm-up: momentum min(m, 1 - 1/(t + 1)) at update t, so on a
        short stream the teacher follows the student instead of staying ~source for ~1/(1-m)
        steps (0.999: a thousand frames)."""
        m = min(self.momentum, 1.0 - 1.0 / (self.updates + 1))
        ema_update(self.teacher, self.student, m, self.params, self.buffers)
        self.updates += 1

    def restore_elements(self, prob: float, generator: torch.Generator | None = None) -> int:
        return stochastic_restore(self.student, self.source, self.params, prob, generator)

    @torch.no_grad()
    def restore_source(self) -> None:
        """Teacher and student back to the source weights, optimizer state cleared."""
        state = self.source.state_dict()
        self.student.load_state_dict(state, strict=True)
        self.teacher.load_state_dict(state, strict=True)
        self.optimizer = self._new_optimizer()
        self.updates = 0
        self.bn_updates = 0
        self.serve_source = False  # the adapted network is the source again
        self._stat_gains = {}
        self._set_bn_momentum()

    @property
    def adapted(self) -> nn.Module:
        """The adapted network to deploy: the teacher, or the student (``deploy="student"``: the
        teacher then only makes pseudo-labels)."""
        return self.student if self.deploy == "student" else self.teacher

    @property
    def deployed(self) -> nn.Module:
        """The network handed to the backend: ``adapted``, or the frozen source while
        ``serve_source`` is set (adapt/selection.py)."""
        return self.source if self.serve_source else self.adapted

    def teacher_state(self) -> dict[str, torch.Tensor]:
        """The deployed network's full state dict as detached CPU copies (safe to hand to another
        thread)."""
        return {k: v.detach().to("cpu", copy=True) for k, v in self.deployed.state_dict().items()}

    @torch.no_grad()
    def snapshot(self) -> dict[str, dict[str, torch.Tensor]]:
        """Copies of everything a step can change (trainable parameters and state buffers of both
        networks). Small for trainable=norm."""
        out = {}
        for tag, net in (("student", self.student), ("teacher", self.teacher)):
            named_p, named_b = dict(net.named_parameters()), dict(net.named_buffers())
            snap = {n: named_p[n].detach().clone() for n in self.params}
            snap.update({n: named_b[n].detach().clone() for n in self.buffers})
            out[tag] = snap
        out["counters"] = {"updates": torch.tensor(self.updates)}
        return out

    @torch.no_grad()
    def rollback(self, snap: dict[str, dict[str, torch.Tensor]]) -> None:
        """Back to a ``snapshot``; the optimizer state is cleared (its moments may hold the
        failed step)."""
        for tag, net in (("student", self.student), ("teacher", self.teacher)):
            tensors = {**dict(net.named_parameters()), **dict(net.named_buffers())}
            for n, v in snap[tag].items():
                tensors[n].copy_(v)
        self.updates = int(snap["counters"]["updates"])
        self.optimizer = self._new_optimizer()


@dataclass
class CollapseCheck:
    """One frame's verdict: shares over the window (NaN until the window is full)."""

    triggered: bool
    class_share: float
    source_class_share: float
    disagreement: float


class CollapseGuard:
    """Section 5.5 over a window of ``window`` frames.

    Per frame it records the histogram of the teacher's predicted classes, the source model's
    histogram and the number of points where the two disagree. Once the window is full it
    triggers when
    - the most frequent teacher class holds more than ``max_class_share`` of the window's points
      while the source's own most frequent class does not (a scene that really is 96 % road must
      not restore the source forever), or
    - the mean disagreement with the source exceeds ``max_disagreement``.
    The caller restores the networks; the guard clears its window after a trigger.
    """

    def __init__(self, num_classes: int, window: int, max_class_share: float, max_disagreement: float) -> None:
        self.num_classes = int(num_classes)
        self.window = int(window)
        self.max_class_share = float(max_class_share)
        self.max_disagreement = float(max_disagreement)
        self._frames: deque[tuple[np.ndarray, np.ndarray, int, int]] = deque(maxlen=self.window)
        self.triggers = 0

    def reset(self) -> None:
        self._frames.clear()

    def observe(self, teacher_labels: torch.Tensor | np.ndarray, source_labels: torch.Tensor | np.ndarray) -> CollapseCheck:
        """teacher_labels, source_labels: (N,) int predicted classes of one frame -> CollapseCheck."""
        t = np.asarray(teacher_labels.cpu() if isinstance(teacher_labels, torch.Tensor) else teacher_labels, np.int64)
        s = np.asarray(source_labels.cpu() if isinstance(source_labels, torch.Tensor) else source_labels, np.int64)
        self._frames.append((np.bincount(t, minlength=self.num_classes),
                             np.bincount(s, minlength=self.num_classes),
                             int(np.count_nonzero(t != s)), int(t.size)))
        if len(self._frames) < self.window:
            nan = float("nan")
            return CollapseCheck(False, nan, nan, nan)
        hist_t = sum(f[0] for f in self._frames)
        hist_s = sum(f[1] for f in self._frames)
        n = max(1, sum(f[3] for f in self._frames))
        share_t = float(hist_t.max() / n)
        share_s = float(hist_s.max() / n)
        disagreement = float(sum(f[2] for f in self._frames) / n)
        triggered = ((share_t > self.max_class_share and share_s <= self.max_class_share)
                     or disagreement > self.max_disagreement)
        if triggered:
            self.triggers += 1
            self._frames.clear()
        return CollapseCheck(triggered, share_t, share_s, disagreement)
