"""Shift gate: per-branch learning-rate gains from the branches' input shift against the source
data's own, and full's use of them."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from fakes import confident_model, header, small_model, synthetic_frame, write_synthetic_bag
from pl3d_ros.adapt import Adapter
from pl3d_ros.adapt.fusion import BranchShift
from pl3d_ros.adapt.shift_gate import ShiftGate, reference_shift
from pl3d_ros.adapt.teacher import TeacherStudent
from pl3d_ros.config import AdaptConfig, Config
from pl3d_ros.inputs import forward_points, prepare

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _feed(frame):
    h = header()
    return prepare(frame, (h.model.image_width, h.model.image_height), h.sensor).arrays()


def test_gains_rise_from_zero_at_the_reference_to_one_at_full_ratio():
    gate = ShiftGate(torch.tensor([0.02, 0.05]), full_ratio=3.0)
    assert gate.gains(torch.tensor([0.02, 0.05])) == {"image": 0.0, "range": 0.0}  # the source's own data
    assert gate.gains(torch.tensor([0.01, 0.04])) == {"image": 0.0, "range": 0.0}  # closer than that
    g = gate.gains(torch.tensor([0.04, 0.5]))
    assert g["image"] == pytest.approx(0.5) and g["range"] == 1.0  # halfway; far beyond full_ratio
    assert gate.gains(None) == {"image": 1.0, "range": 1.0}  # nothing measured yet: not gated
    with pytest.raises(ValueError, match="full_ratio"):
        ShiftGate(torch.tensor([0.02, 0.05]), full_ratio=1.0)


def test_reference_is_the_source_data_shift():
    model = small_model()
    f = synthetic_frame(0)
    for m in model.modules():  # BN running statistics of this very frame: trained on its domain
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = 1.0
    model.train()
    with torch.no_grad():
        forward_points(model, prepare(f, (header().model.image_width, header().model.image_height), header().sensor))
    model.eval()
    own = reference_shift(model, [_feed(f)])
    dark = reference_shift(model, [_feed(dataclasses.replace(f, image=(f.image // 8).astype(np.uint8)))])
    assert own.shape == (2,) and float(own.max()) < 1e-3
    assert float(dark[0]) > 0.1 and float(dark[1]) == pytest.approx(float(own[1]), abs=1e-5)
    with pytest.raises(ValueError, match="no reference shift"):
        reference_shift(model, [])


def test_a_branch_with_gain_zero_does_not_move():
    ts = TeacherStudent(confident_model(), lr=1e-2, momentum=0.0)
    ts.set_branch_gains({"image": 1.0, "range": 0.0})
    assert sorted((g["branch"], g["lr"]) for g in ts.optimizer.param_groups) == [("image", 1e-2), ("range", 0.0)]
    before = {n: p.detach().clone() for n, p in ts.student.named_parameters() if p.requires_grad}
    loss = sum(p.square().sum() for p in ts.student.parameters() if p.requires_grad)
    loss.backward()
    ts.optimizer.step()
    after = dict(ts.student.named_parameters())
    moved = {n.split(".")[0] for n in before if not torch.equal(before[n], after[n])}
    assert moved == {"image"}
    ts.restore_source()  # a restore starts again at the base rates
    assert all(g["lr"] == 1e-2 for g in ts.optimizer.param_groups)


def test_full_with_the_gate_sets_each_branch_rate_from_its_shift(tmp_path):
    # The reference from a recording of the frames the test then adapts on (no dataset needed).
    bag = tmp_path / "ref"
    write_synthetic_bag(bag, n=2)
    cfg = Config(class_set="xmuda10", adapt=AdaptConfig(enable=["gate"], gate_reference=str(bag),
                                                        gate_reference_frames=2)).validate()
    ad = Adapter(confident_model(), header(), cfg, seed=0)
    stats = ad.step(synthetic_frame(0))
    assert "error" not in stats and 0.0 <= stats["gate_2d"] <= 1.0 and 0.0 <= stats["gate_3d"] <= 1.0
    lrs = {g["branch"]: g["lr"] / g["base_lr"] for g in ad.method.models.optimizer.param_groups}
    assert lrs == pytest.approx({"image": stats["gate_2d"], "range": stats["gate_3d"]})
    assert ad.method.gate.reference.shape == (2,)


def test_gate_on_statistics_holds_a_branch_running_statistics():
    ts = TeacherStudent(confident_model(), lr=1e-2, momentum=0.0)
    ts.set_branch_gains({"image": 1.0, "range": 0.0}, statistics=True)
    bns = {n: m for n, m in ts.student.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    before = {n: m.running_mean.clone() for n, m in bns.items()}
    inputs = prepare(synthetic_frame(0), (header().model.image_width, header().model.image_height), header().sensor)
    with torch.no_grad():
        forward_points(ts.student, inputs)  # train mode: running statistics update by momentum
    moved = {n.split(".")[0] for n, m in bns.items() if not torch.equal(before[n], m.running_mean)}
    assert moved == {"image"}
    ts.set_branch_gains({"image": 0.5, "range": 1.0}, statistics=True)  # from the base momentum
    assert {bns[n].momentum for n in bns if n.startswith("range")} == {0.1}
    assert {bns[n].momentum for n in bns if n.startswith("image")} == {0.05}


def test_fusion_bias_counts_only_the_shift_beyond_the_source_datas_own():
    shift = BranchShift(confident_model(), momentum=0.0)
    assert torch.equal(shift.bias(3.0, torch.tensor([0.3, 0.1])), torch.zeros(2))  # before any frame
    shift.value = torch.tensor([0.34, 0.30])
    assert shift.bias(3.0) == pytest.approx(torch.tensor([-1.02, -0.90]))
    # the image at its reference level is not held down; the range by its excess only
    assert shift.bias(3.0, torch.tensor([0.35, 0.10])) == pytest.approx(torch.tensor([0.0, -0.60]))


def test_full_with_the_fusion_reference_measures_it_once_and_biases_by_the_excess(tmp_path):
    bag = tmp_path / "ref"
    write_synthetic_bag(bag, n=2)
    cfg = Config(class_set="xmuda10", adapt=AdaptConfig(fusion_reference=True, gate_reference=str(bag),
                                                        gate_reference_frames=2)).validate()
    ad = Adapter(confident_model(), header(), cfg, seed=0)
    ref = ad.method.shift_reference
    assert ref is not None and ref.shape == (2,) and ad.method.gate is None
    stats = ad.step(synthetic_frame(0))
    assert "error" not in stats
    expected = -cfg.adapt.fusion_beta * (ad.method.shift.value - ref).clamp_min(0.0)
    assert torch.allclose(ad.method.fusion_bias.cpu(), expected)
    plain = Adapter(confident_model(), header(), Config(class_set="xmuda10").validate(), seed=0)
    assert plain.method.shift_reference is None  # off by default: nothing measured
