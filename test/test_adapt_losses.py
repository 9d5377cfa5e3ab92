"""Adaptation building blocks against hand-computed values: losses, class-wise thresholds,
reliability split, negative-class selection, prototypes, EMA, stochastic restore, collapse guard."""

import math

import numpy as np
import pytest
import torch

from pl3d_ros.adapt import losses
from pl3d_ros.adapt.prototypes import PrototypeBank, class_means
from pl3d_ros.adapt.pseudo_labels import ClasswiseThresholds, PseudoLabeler
from pl3d_ros.adapt.reliability import reliability_split
from pl3d_ros.adapt.teacher import (CollapseGuard, TeacherStudent, ema_update, select_trainable,
                                    stochastic_restore)
from fakes import small_model

LN3 = math.log(3.0)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def approx(x, rel=1e-5, abs=1e-6):
    return pytest.approx(x, rel=rel, abs=abs)


# -- losses -------------------------------------------------------------------------------------


def test_cross_entropy_ignores_unlabelled_points():
    # logits (0, ln 3) -> q = (1/4, 3/4); target 1 -> -ln(3/4) = 0.287682; the -1 row is ignored
    logits = torch.tensor([[0.0, LN3], [5.0, -5.0]], requires_grad=True)
    loss = losses.cross_entropy(logits, torch.tensor([1, -1]))
    assert loss.item() == approx(-math.log(0.75))
    none = losses.cross_entropy(logits, torch.tensor([-1, -1]))
    none.backward()  # an all-ignored frame is a zero that still backpropagates
    assert none.item() == 0.0 and torch.all(logits.grad == 0)


def test_class_balanced_cross_entropy_weights_rare_classes_up():
    # 9 points of class 0 predicted right, 1 of class 1 predicted wrong: balancing makes the
    # rare class's error count more than its 1/10 share.
    logits = torch.zeros(10, 3)
    logits[:9, 0] = 4.0
    logits[9, 0] = 4.0
    target = torch.tensor([0] * 9 + [1])
    plain = losses.cross_entropy(logits, target)
    bal = losses.cross_entropy(logits, target, balanced=True)
    w = 1.0 / np.log(1.2 + np.array([0.9, 0.1]))
    per = torch.nn.functional.cross_entropy(logits, target, reduction="none").numpy()
    expected = (w[0] * per[:9].sum() + w[1] * per[9]) / (9 * w[0] + w[1])
    assert float(bal) == pytest.approx(expected, rel=1e-5)
    assert float(bal) > float(plain)


def test_negative_learning_value():
    # q = (1/4, 3/4) for both rows. Row 0 negative class 1: -ln(1 - 3/4) = ln 4 = 1.386294;
    # row 1 negative class 0: -ln(1 - 1/4) = -ln(3/4) = 0.287682; row 2 has none. Mean 0.836988.
    logits = torch.tensor([[0.0, LN3], [0.0, LN3], [0.0, LN3]])
    loss = losses.negative_learning(logits, torch.tensor([1, 0, -1]))
    assert loss.item() == approx((math.log(4.0) - math.log(0.75)) / 2)
    # stable where q_c -> 1: finite, about 40 (= -log(1 - sigmoid(40)))
    big = losses.negative_learning(torch.tensor([[40.0, 0.0]]), torch.tensor([0]))
    assert math.isfinite(big.item()) and big.item() == approx(40.0, rel=1e-4)


def test_negative_selection_picks_lowest_unused_class_and_never_reuses():
    p = torch.tensor([[0.05, 0.15, 0.80],   # rounds: class 0 (0.05), then 1 (0.15), then none (0.8 > 0.2)
                      [0.30, 0.30, 0.40],   # lowest 0.30 > 0.2: never a negative class
                      [0.01, 0.01, 0.98]])  # not a candidate (reliable): untouched
    candidates = torch.tensor([True, True, False])
    used = torch.zeros(3, 3, dtype=torch.bool)
    c1, used = losses.select_negative_classes(p, used, candidates, 0.2)
    assert c1.tolist() == [0, -1, -1]
    c2, used = losses.select_negative_classes(p, used, candidates, 0.2)
    assert c2.tolist() == [1, -1, -1]
    c3, used = losses.select_negative_classes(p, used, candidates, 0.2)
    assert c3.tolist() == [-1, -1, -1]
    assert used.tolist() == [[True, True, False], [False] * 3, [False] * 3]


def test_erda_value_and_gradient_through_the_soft_label():
    # prototypes e1, e2; feature (2, 0) -> cos = (1, 0); tau = 1 -> p = (e, 1) / (e + 1)
    # q = softmax(0, ln 3) = (1/4, 3/4)
    # lam = 1: -(p1 ln 1/4 + p2 ln 3/4) = 0.731059 * 1.386294 + 0.268941 * 0.287682 = 1.090867
    # lam = 0: KL(p || q) = 1.090867 + (p1 ln p1 + p2 ln p2) = 1.090867 - 0.582203 = 0.508664
    protos = torch.eye(2)
    feat = torch.tensor([[2.0, 0.0]], requires_grad=True)
    logits = torch.tensor([[0.0, LN3]], requires_grad=True)
    p1 = math.e / (math.e + 1)
    p2 = 1 - p1
    ce = -(p1 * math.log(0.25) + p2 * math.log(0.75))
    loss = losses.erda(feat, protos, logits, tau=1.0, lam=1.0)
    assert loss.item() == approx(ce)
    kl = losses.erda(feat, protos, logits, tau=1.0, lam=0.0)
    assert kl.item() == approx(ce + p1 * math.log(p1) + p2 * math.log(p2))
    loss.backward()
    # no stop-gradient on p: the feature receives gradient (d/dy of the cosine to e2 is nonzero)
    assert feat.grad is not None and feat.grad.abs().sum() > 0
    assert logits.grad.abs().sum() > 0


def test_erda_skips_classes_without_prototype_without_nan():
    # class 1 has no prototype: p = (1, 0) -> lam * 0 + KL = -ln q0 = -ln(1/4)
    protos = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    feat = torch.tensor([[0.3, 0.7]], requires_grad=True)
    logits = torch.tensor([[0.0, LN3]], requires_grad=True)
    loss = losses.erda(feat, protos, logits, valid=torch.tensor([True, False]))
    assert loss.item() == approx(math.log(4.0))
    loss.backward()
    assert torch.isfinite(feat.grad).all() and torch.isfinite(logits.grad).all()


def test_cross_modal_kl_value():
    # teacher p2d = (1/2, 1/2), p3d = (1/4, 3/4); student q3d = (1/4, 3/4), q2d = (1/2, 1/2)
    # KL(p2d || q3d) = 1/2 ln 2 + 1/2 ln(2/3) = 1/2 ln(4/3) = 0.143841
    # KL(p3d || q2d) = 1/4 ln(1/2) + 3/4 ln(3/2) = 0.130812; sum 0.274653
    loss = losses.cross_modal_kl(torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, LN3]]),
                                 torch.tensor([[0.5, 0.5]]), torch.tensor([[0.25, 0.75]]))
    expected = 0.5 * math.log(4 / 3) + 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    assert loss.item() == approx(expected)


def test_entropy_value():
    # H(1/2, 1/2) = ln 2, H(1, 0) = 0: mean ln(2) / 2 = 0.346574
    assert losses.entropy(torch.tensor([[0.5, 0.5], [1.0, 0.0]])).item() == approx(math.log(2) / 2)


def test_branch_entropy_is_the_mean_of_the_branches_and_ignores_the_fusion():
    from pl3d_ros.adapt.terms import BranchEntropy, FusedEntropy, StepContext
    from pl3d_ros.inputs import PointOutputs

    # 2D: one in-view point at (1/2, 1/2) -> ln 2; 3D: two points, certain -> 0
    out = PointOutputs(torch.zeros(1, 2), torch.tensor([[30.0, 0.0], [0.0, 30.0]]))
    fused_certain = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # a fusion that trusted 3D entirely
    ctx = StepContext(state=None, out=out, q_fused=fused_certain)
    assert BranchEntropy().loss(ctx).item() == approx(0.5 * math.log(2))
    assert FusedEntropy().loss(ctx).item() == approx(0.0)  # nothing left to sharpen in the fused one


# -- section 0: class-wise thresholds -----------------------------------------------------------


def test_classwise_threshold_running_median_over_a_bounded_window():
    # values sit mid-bin (bins of 1e-3) so the bin-resolved median is exact to 1e-3
    w = ClasswiseThresholds(num_classes=3, window_frames=2, cap=0.9)
    w.update(np.array([0, 0, 0, 1]), np.array([0.5005, 0.6005, 0.7005, 0.9505]))
    # class 0 median 0.6005 -> 0.600; class 1 median 0.95 -> capped at 0.9; class 2 unseen -> cap
    np.testing.assert_allclose(w.thresholds(), [0.600, 0.9, 0.9], atol=1e-9)
    w.update(np.array([0, 0]), np.array([0.8005, 0.8505]))
    # window {0.5005, 0.6005, 0.7005, 0.8005, 0.8505}: median 0.7005
    assert w.thresholds()[0] == approx(0.700)
    w.update(np.array([0]), np.array([0.3005]))
    # the first frame left the window: {0.8005, 0.8505, 0.3005} -> 0.8005; class 1 gone -> cap
    assert len(w) == 2
    np.testing.assert_allclose(w.thresholds(), [0.800, 0.9, 0.9], atol=1e-9)
    # even count: the lower median. {0.2005, 0.4005} -> 0.2005
    w2 = ClasswiseThresholds(2, 5, 0.9)
    w2.update(np.array([1, 1]), np.array([0.4005, 0.2005]))
    assert w2.thresholds()[1] == approx(0.200)


def test_pseudo_labeler_thresholds_each_class_by_its_own_median():
    fused = torch.tensor([[0.95, 0.05], [0.55, 0.45], [0.75, 0.25], [0.30, 0.70], [0.40, 0.60]])
    labels, thr = PseudoLabeler(2, 10, 0.9)(fused)
    # class 0 confidences {0.95, 0.55, 0.75}: median 0.75; class 1 {0.70, 0.60}: lower median 0.60
    np.testing.assert_allclose(thr, [0.75, 0.6], atol=1.1e-3)
    assert labels.tolist() == [0, -1, 0, 1, 1]


# -- section 4.1: reliability ------------------------------------------------------------------


def test_reliability_split():
    p = torch.tensor([[0.60, 0.40], [0.30, 0.70], [0.95, 0.05], [0.80, 0.20], [0.95, 0.05]])
    q = torch.tensor([[0.50, 0.50], [0.90, 0.10], [0.90, 0.10], [0.80, 0.20], [0.95, 0.05]])
    labels = torch.tensor([0, 1, -1, -1, -1])
    veto = torch.tensor([False, False, False, False, True])
    s = reliability_split(p, q, labels, min_confidence=0.9, max_variance=0.05, veto=veto)
    # 0: labelled 0, var ((0.6 - 0.5) / 2)^2 = 0.0025 -> reliable
    # 1: labelled 1, var ((0.7 - 0.1) / 2)^2 = 0.09 > 0.05 -> unreliable
    # 2: unlabelled, teacher 0.95 >= 0.9, var 0.000625 -> reliable with its argmax
    # 3: unlabelled, teacher 0.80 < 0.9 -> unreliable; 4: vetoed (noisy component) -> unreliable
    assert s.reliable.tolist() == [True, False, True, False, False]
    assert s.target.tolist() == [0, -1, 0, -1, -1]
    assert s.variance[1].item() == approx(0.09)


# -- section 3: prototypes ---------------------------------------------------------------------


def test_prototype_init_from_source_and_ema_update():
    bank = PrototypeBank(num_classes=3, dim=2, momentum=0.9)
    # source: class 0 at (3, 0) and (0, 2) -> normalised mean (0.5, 0.5); class 2 absent
    assert bank.init_missing(torch.tensor([[3.0, 0.0], [0.0, 2.0]]), torch.tensor([0, 0])) == 1
    assert bank.vectors[0].tolist() == approx([0.5, 0.5])
    assert bank.initialised.tolist() == [True, False, False]
    # EMA: 0.9 * (0.5, 0.5) + 0.1 * (1, 0) = (0.55, 0.45); class 1 not initialised: untouched
    bank.update(torch.tensor([[5.0, 0.0], [1.0, 1.0]]), torch.tensor([0, 1]))
    assert bank.vectors[0].tolist() == approx([0.55, 0.45])
    assert bank.vectors[1].tolist() == [0.0, 0.0]
    means, counts = class_means(torch.tensor([[1.0, 0.0]]), torch.tensor([-1]), 2)
    assert counts.tolist() == [0, 0] and torch.all(means == 0)


# -- section 5: teacher ------------------------------------------------------------------------


def _bn(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]


def test_trainable_selection_norm_is_affine_only():
    model = small_model()
    names = select_trainable(model, "norm")
    assert names and all(n.endswith((".weight", ".bias")) for n in names)
    n_bn = sum(m.weight.numel() + m.bias.numel() for m in _bn(model))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == n_bn
    assert len(select_trainable(model, "all")) == len(list(model.parameters()))


def test_ema_update_averages_parameters_and_copies_bn_statistics():
    teacher, student = small_model(), small_model()
    params = select_trainable(student, "norm")
    buffers = [n for n, _ in student.named_buffers() if n in student.state_dict()]
    for t, s in zip(_bn(teacher), _bn(student)):
        t.weight.data.fill_(1.0)
        s.weight.data.fill_(3.0)
        t.running_mean.fill_(0.0)
        s.running_mean.fill_(1.0)
        s.num_batches_tracked.fill_(7)
    conv_before = teacher.image.head.weight.clone()
    ema_update(teacher, student, 0.9, params, buffers)
    for t in _bn(teacher):
        assert torch.allclose(t.weight, torch.full_like(t.weight, 0.9 * 1 + 0.1 * 3))  # 1.2
        # running statistics are already an average of the student's batches: copied, not re-averaged
        assert torch.allclose(t.running_mean, torch.full_like(t.running_mean, 1.0))
        assert int(t.num_batches_tracked) == 7
    assert torch.equal(teacher.image.head.weight, conv_before)  # frozen: not averaged


def test_stochastic_restore_prob_one_and_zero():
    source, student = small_model(0), small_model(1)
    params = select_trainable(student, "norm")
    g = torch.Generator().manual_seed(0)
    before = {n: p.clone() for n, p in student.named_parameters()}
    assert stochastic_restore(student, source, params, 0.0, g) == 0
    assert all(torch.equal(before[n], p) for n, p in student.named_parameters())
    n_elem = stochastic_restore(student, source, params, 1.0, g)
    sp, src = dict(student.named_parameters()), dict(source.named_parameters())
    assert n_elem == sum(sp[n].numel() for n in params)
    assert all(torch.equal(sp[n], src[n]) for n in params)
    assert torch.equal(sp["image.head.weight"], before["image.head.weight"])  # not trainable: kept


def test_teacher_student_rollback_and_restore():
    ts = TeacherStudent(small_model(), trainable="norm")
    snap = ts.snapshot()
    bn = _bn(ts.student)[0]
    bn.weight.data.add_(1.0)
    bn.running_var.mul_(3.0)
    ts.rollback(snap)
    assert torch.equal(bn.weight, _bn(ts.source)[0].weight)
    assert torch.equal(bn.running_var, _bn(ts.source)[0].running_var)
    _bn(ts.teacher)[0].weight.data.add_(1.0)
    ts.restore_source()
    assert torch.equal(_bn(ts.teacher)[0].weight, _bn(ts.source)[0].weight)
    assert ts.student.training and not ts.teacher.training


def test_collapse_guard_triggers_on_a_constant_predictor_after_a_full_window():
    g = CollapseGuard(num_classes=4, window=3, max_class_share=0.95, max_disagreement=0.6)
    rng = np.random.default_rng(0)
    for _ in range(2):
        check = g.observe(np.zeros(100, np.int64), rng.integers(0, 4, 100))
        assert not check.triggered  # window not full yet
    check = g.observe(np.zeros(100, np.int64), rng.integers(0, 4, 100))
    assert check.triggered and check.class_share == 1.0 and check.disagreement > 0.6
    # a source that itself predicts one class: share alone does not trigger (restoring won't help)
    g2 = CollapseGuard(4, 2, 0.95, 0.6)
    same = np.zeros(100, np.int64)
    assert not any(g2.observe(same, same).triggered for _ in range(4))


def test_collapse_guard_defaults_fire_on_one_class_not_on_disagreement_alone():
    # A teacher that disagrees with a poor source on 70 % of the points is not collapsed (the sim
    # mixed domain: 0.60 disagreement at a 0.31 class share); one class everywhere is.
    from pl3d_ros.config import Config

    a = Config().adapt
    g = CollapseGuard(4, 2, a.collapse_max_class_share, a.collapse_max_disagreement)
    rng = np.random.default_rng(0)
    teacher = rng.integers(0, 4, 1000)
    source = np.where(rng.random(1000) < 0.7, (teacher + 1) % 4, teacher)
    assert not any(g.observe(teacher, source).triggered for _ in range(4))
    assert any(g.observe(np.zeros(1000, np.int64), source).triggered for _ in range(2))


def test_teacher_warm_up_follows_the_student_early_then_settles_at_the_momentum():
    from pl3d_ros.adapt.teacher import TeacherStudent

    ts = TeacherStudent(small_model(), trainable="norm", lr=1e-3, momentum=0.999)
    bn_t, bn_s = _bn(ts.teacher)[0], _bn(ts.student)[0]
    bn_s.weight.data.fill_(5.0)
    ts.update_teacher()  # update 0: momentum min(0.999, 0) = 0 -> teacher = student
    assert torch.allclose(bn_t.weight, bn_s.weight)
    bn_s.weight.data.fill_(7.0)
    ts.update_teacher()  # update 1: momentum 0.5
    assert torch.allclose(bn_t.weight, torch.full_like(bn_t.weight, 6.0))
    snap = ts.snapshot()
    ts.update_teacher()
    ts.rollback(snap)
    assert ts.updates == 2
    ts.restore_source()
    assert ts.updates == 0


def test_bn_prior_makes_running_statistics_a_cumulative_average_with_the_source_as_prior():
    net = torch.nn.Sequential(torch.nn.BatchNorm1d(3))
    net[0].running_mean.fill_(1.0)  # the "source" mean
    ts = TeacherStudent(net, trainable="norm", bn_prior=4.0, bn_floor=0.0)
    means = [3.0, -2.0, 5.0, 0.5]
    for k, m in enumerate(means):
        ts.before_student_forward()
        ts.student(torch.full((8, 3), m))
        expected = (4.0 * 1.0 + sum(means[:k + 1])) / (4.0 + k + 1)
        assert torch.allclose(ts.student[0].running_mean, torch.full((3,), expected), atol=1e-5)
    # a floor bounds how slowly a long domain is followed; a restore starts the count again
    ts2 = TeacherStudent(net, trainable="norm", bn_prior=100.0, bn_floor=0.25)
    ts2.before_student_forward()
    assert ts2.student[0].momentum == 0.25
    ts.restore_source()
    assert ts.bn_updates == 0
    ts.before_student_forward()
    assert ts.student[0].momentum == pytest.approx(1.0 / 5.0)
    # bn_prior 0: BN's own momentum, untouched
    ts3 = TeacherStudent(net, trainable="norm")
    ts3.before_student_forward()
    assert ts3.student[0].momentum == 0.1


def test_bn_prior_composes_with_the_gate_statistics_gain():
    net = torch.nn.Sequential(torch.nn.BatchNorm1d(3))
    ts = TeacherStudent(net, trainable="norm", bn_prior=1.0, bn_floor=0.0)
    ts.set_branch_gains({"0": 0.5}, statistics=True)
    ts.before_student_forward()
    assert ts.student[0].momentum == pytest.approx(0.5 * 0.5)
    ts.set_branch_gains({"0": 0.5}, statistics=False)
    assert ts.student[0].momentum == pytest.approx(1.0 / 3.0)


def test_reliable_entropy_keeps_confident_points_weighted_and_drops_the_rest():
    sure = torch.tensor([[0.97, 0.01, 0.01, 0.01]])
    unsure = torch.full((1, 4), 0.25)  # entropy ln 4: above any margin < 1
    probs = torch.cat([sure, unsure]).requires_grad_(True)
    h = -(sure * sure.log()).sum()
    e0 = 0.4 * math.log(4)
    value = losses.reliable_entropy(probs, 0.4)
    assert float(value.detach()) == pytest.approx(float(torch.exp(e0 - h) * h), rel=1e-5)
    value.backward()
    assert torch.all(probs.grad[1] == 0)  # the unsure point gives no gradient
    assert float(losses.reliable_entropy(unsure, 0.4)) == 0.0
