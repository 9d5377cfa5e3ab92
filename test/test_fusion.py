"""Shift-aware fusion: branch shifts from the source network's BN statistics, the biased fusion,
and its deployment to the segmenter."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from fakes import header, small_model, synthetic_frame
from pl3d_ros.adapt import Adapter, terms
from pl3d_ros.adapt.fusion import BranchShift
from pl3d_ros.config import AdaptConfig, Config
from pl3d_ros.inputs import forward_points, prepare
from pl3d_ros.models.points import RANGE_ONLY, SHARED, Fusion, fuse
from pl3d_ros.pipeline import FUSION_KEY, Segmenter
from pl3d_ros.registry import FUSION_RULES


def _inputs(frame):
    h = header()
    return prepare(frame, (h.model.image_width, h.model.image_height), h.sensor)


def test_a_shifted_image_shows_as_image_branch_shift():
    model = small_model()
    f = synthetic_frame(0)
    # a source model whose BN running statistics are this frame's (as if trained on its domain)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = 1.0
    model.train()
    with torch.no_grad():
        forward_points(model, _inputs(f))
    model.eval()
    shift = BranchShift(model, momentum=0.0)
    with torch.no_grad(), shift:
        forward_points(model, _inputs(f))
    plain = shift.update().clone()
    dark = dataclasses.replace(f, image=(f.image // 8).astype(np.uint8))  # a night-like image
    with torch.no_grad(), shift:
        forward_points(model, _inputs(dark))
    shifted = shift.update()
    assert plain.max() < 1e-3  # its own domain: no shift
    assert shifted[0] > 0.1  # the image branch moved ...
    assert torch.isclose(shifted[1], plain[1], atol=1e-5)  # ... the LiDAR did not
    assert shift.bias(3.0)[0] < shift.bias(3.0)[1]  # so the image branch is trusted less


@pytest.mark.parametrize("rule", FUSION_RULES)
def test_biased_fusion_trusts_the_less_shifted_branch(rule):
    p2 = torch.tensor([[0.9, 0.1]])
    p3 = torch.tensor([[0.2, 0.8]])
    iv = torch.tensor([True])
    assert fuse(p2, p3, iv, rule=rule)[0].argmax() == 0  # 2D is more confident
    assert fuse(p2, p3, iv, (-3.0, 0.0), rule=rule)[0].argmax() == 1  # ... but its input shifted
    assert torch.allclose(fuse(p2, p3, iv, (0.0, 0.0), rule=rule), fuse(p2, p3, iv, rule=rule))


def test_product_fusion_needs_both_branches_to_allow_a_class():
    """The product rule: a class one branch rules out is not fused in, however confident the
    other branch is about it (the entropy rule follows the confident branch); equal exponents
    are the plain renormalised product, exponents 2 softmax(bias)."""
    p2 = torch.tensor([[0.90, 0.09, 0.01]])  # the image branch: class 0, confidently
    p3 = torch.tensor([[0.001, 0.60, 0.399]])  # the range branch rules class 0 out
    iv = torch.tensor([True])
    assert fuse(p2, p3, iv, rule="entropy")[0].argmax() == 0
    prod = fuse(p2, p3, iv, rule="product")[0]
    assert prod.argmax() == 1
    expected = p2[0] * p3[0] / (p2[0] * p3[0]).sum()
    torch.testing.assert_close(prod, expected)
    a = 2 * torch.softmax(torch.tensor([0.5, -0.5]), 0)
    biased = p2[0] ** a[0] * p3[0] ** a[1]
    torch.testing.assert_close(fuse(p2, p3, iv, (0.5, -0.5), rule="product")[0], biased / biased.sum())
    with pytest.raises(ValueError, match="fusion rule"):
        fuse(p2, p3, iv, rule="mean")


def test_product_fusion_lets_the_branch_that_knows_a_class_decide_it():
    """A class the image branch has no output for (parking under a Cityscapes network: its
    probability there is ~0) is no veto: it takes the range branch's probability and the shared
    classes divide the rest by the product. The owners come from the imported class map."""
    from pl3d_ros.models.checkpoint import BranchSpec

    p2 = torch.tensor([[0.7, 0.3, 1e-30]])  # class 2: no output in the image branch
    p3 = torch.tensor([[0.1, 0.3, 0.6]])
    iv = torch.tensor([True])
    assert fuse(p2, p3, iv, rule="product")[0].argmax() != 2  # a plain product: vetoed
    fusion = Fusion("product", (SHARED, SHARED, RANGE_ONLY))
    q = fuse(p2, p3, iv, rule=fusion)[0]
    shared = p2[0, :2] * p3[0, :2] / (p2[0, :2] * p3[0, :2]).sum()
    torch.testing.assert_close(q, torch.cat([shared * 0.4, torch.tensor([0.6])]))
    assert q.argmax() == 2
    h = header()
    names = h.class_set.names
    spec = BranchSpec("espnetv2", {}, {}, [], {n: ([] if n == "parking" else [n]) for n in names})
    owned = Fusion.of("product", dataclasses.replace(h, branches={"image": spec}))
    assert owned.owner == tuple(RANGE_ONLY if n == "parking" else SHARED for n in names)
    assert Fusion.of("product", h).owner == ()  # trained branches: every class shared


def test_segmenter_deploys_the_fusion_beside_the_weights():
    swapped = []

    class Backend:
        def swap_weights(self, state):
            swapped.append(state)

    seg = Segmenter(Backend(), header(), "product")
    assert seg.fusion_bias is None
    seg.deploy({"w": torch.ones(1), FUSION_KEY: torch.tensor([-1.5, 0.0])})
    assert seg.fusion_bias == (-1.5, 0.0) and swapped == [{"w": torch.ones(1)}]
    seg.deploy({FUSION_KEY: torch.tensor([0.0, -2.0])})  # fusion only: no engine swap
    assert seg.fusion_bias == (0.0, -2.0) and len(swapped) == 1


def test_domain_changes_are_detected_from_the_shift_series():
    from pl3d_ros.adapt.fusion import ShiftChangeDetector

    g = np.random.default_rng(0)
    # fog -> night -> sensor as the sim's source model sees them (image, range), with noise
    levels = [(0.50, 0.17), (0.16, 0.05), (0.03, 0.32)]
    series = [torch.tensor(lv) + torch.tensor(g.normal(0, 0.02, 2)) for lv in levels for _ in range(20)]
    det = ShiftChangeDetector()
    fired = [i for i, s in enumerate(series) if det.observe(s)]
    assert fired == [21, 41]  # confirmed on the second frame of each new domain
    # KITTI 04 -> 05 under fog, as the imported model sees it: a new street, no new domain
    street = [torch.tensor((0.34, 0.29))] * 10 + [torch.tensor((0.33, 0.23))] * 10
    det = ShiftChangeDetector()
    assert not any(det.observe(s) for s in street)
    det = ShiftChangeDetector()
    spike = [torch.tensor((0.2, 0.2))] * 10 + [torch.tensor((0.6, 0.2))] + [torch.tensor((0.2, 0.2))] * 10
    assert not any(det.observe(s) for s in spike)  # one odd frame is no new domain


@pytest.mark.parametrize("loss_fusion", ["deployed", "plain"])
def test_the_loss_sees_the_deployed_fusion_or_the_plain_product(loss_fusion, monkeypatch):
    cfg = Config(class_set="xmuda10", adapt=AdaptConfig(loss_fusion=loss_fusion)).validate()
    ad = Adapter(small_model(), header(), cfg, seed=0)
    seen = []
    real_total = terms.total_loss
    monkeypatch.setattr(terms, "total_loss", lambda ts, ctx: (seen.append(ctx), real_total(ts, ctx))[1])
    f = synthetic_frame(0)
    ad.step(dataclasses.replace(f, image=(f.image // 8).astype(np.uint8)))  # the image branch shifts
    method = ad.method
    assert method.fusion_bias is not None and float(method.fusion_bias.abs().max()) > 0
    ctx = seen[0]
    p2, p3 = ctx.out.logits_2d.softmax(1), ctx.out.logits_3d.softmax(1)
    bias = method.fusion_bias if loss_fusion == "deployed" else None
    assert torch.allclose(ctx.q_fused, fuse(p2, p3, ctx.state.in_view, bias, rule=method.fusion), atol=1e-6)
    other = None if loss_fusion == "deployed" else method.fusion_bias
    assert not torch.allclose(ctx.q_fused, fuse(p2, p3, ctx.state.in_view, other, rule=method.fusion), atol=1e-6)
