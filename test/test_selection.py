"""Source selection (component ``select``): serve the source while its branches agree more."""

from __future__ import annotations

import math

import pytest
import torch

from fakes import confident_model, header, synthetic_frame
from pl3d_ros.adapt import Adapter
from pl3d_ros.adapt.selection import SourceSelector, branch_agreement
from pl3d_ros.config import AdaptConfig, Config


def onehot(classes: list[int], c: int = 4) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(classes), c).float()


def test_branch_agreement_is_the_share_of_points_with_the_same_class():
    assert branch_agreement(onehot([0, 1, 2, 3]), onehot([0, 1, 3, 2])) == pytest.approx(0.5)
    assert math.isnan(branch_agreement(torch.zeros(0, 4), torch.zeros(0, 4)))


def test_selector_switches_to_the_source_past_the_margin_and_back_when_it_no_longer_leads():
    sel = SourceSelector(momentum=0.0, margin=0.05)
    assert not sel.observe(0.80, 0.77) and not sel.serve_source  # a lead inside the margin
    assert sel.observe(0.80, 0.70) and sel.serve_source
    assert not sel.observe(0.80, 0.78) and sel.serve_source  # hysteresis: still leads
    assert sel.observe(0.70, 0.72) and not sel.serve_source
    assert sel.switches == 2
    assert not sel.observe(float("nan"), 0.5)  # a frame without view changes nothing
    sel.observe(0.9, 0.1)
    sel.reset()
    assert not sel.serve_source and sel.source is None


def test_selector_smooths_over_frames():
    sel = SourceSelector(momentum=0.9, margin=0.1)
    sel.observe(0.5, 0.5)
    # the source's smoothed lead after each frame at (0.9, 0.5): 0.04, 0.076, 0.108
    assert [sel.observe(0.9, 0.5) for _ in range(3)] == [False, False, True]
    assert sel.source - sel.adapted == pytest.approx(0.4 * (1 - 0.9 ** 3))


def test_full_serves_the_source_when_the_adapted_branches_stop_agreeing():
    cfg = Config(class_set="xmuda10", adapt=AdaptConfig(select_margin=0.05)).validate()  # select: on by default
    handed = []
    model = confident_model()
    ad = Adapter(model, header(), cfg, on_weights=handed.append, seed=0)
    with torch.no_grad():  # the adapted networks' image branch now votes for another class everywhere
        for net in (ad.method.models.teacher, ad.method.models.student):
            net.image.head.bias[7] += 20.0
    stats = ad.step(synthetic_frame(0))
    assert "error" not in stats
    assert stats["agree_source"] > stats["agree_adapted"] + 0.05 and stats["serve_source"]
    assert ad.method.models.deployed is ad.method.models.source
    assert handed, "the change of network is handed to the backend at once"
    health = ad.health()
    assert health.serving_source and health.source_switches == 1
    assert torch.equal(handed[-1]["image.head.bias"], model.state_dict()["image.head.bias"])
    # a checkpoint keeps the adapted network, not the served source
    assert ad.method.models.adapted is ad.method.models.teacher
    ad.method.reset()  # back to the source: nothing to compare, the adapted network is served
    assert not ad.method.models.serve_source


def test_select_can_be_switched_off():
    cfg = Config(class_set="xmuda10", adapt=AdaptConfig(disable=["select"])).validate()
    ad = Adapter(confident_model(), header(), cfg, seed=0)
    assert ad.method.selector is None
    assert "serve_source" not in ad.step(synthetic_frame(0))


def test_a_suspected_change_of_domain_serves_the_source_until_it_is_settled():
    sel = SourceSelector(momentum=0.0, margin=0.05)
    assert not sel.observe(0.5, 0.7)
    assert sel.observe(0.5, 0.7, suspected_change=True) and sel.serve_source  # the adapted one leads, still
    assert sel.observe(0.5, 0.7) and not sel.serve_source  # the outlier rejoined its domain
    assert sel.switches == 2


def test_change_detector_tells_an_outlier_that_waits_for_confirmation():
    from pl3d_ros.adapt.fusion import ShiftChangeDetector

    det = ShiftChangeDetector(min_jump=0.08, min_ratio=0.5, confirm=2, min_frames=3)
    for _ in range(3):
        det.observe(torch.tensor([0.2, 0.1]))
    assert not det.suspected
    assert not det.observe(torch.tensor([0.6, 0.1])) and det.suspected
    assert not det.observe(torch.tensor([0.2, 0.1])) and not det.suspected  # a lone outlier
    det.reset()
    for _ in range(3):
        det.observe(torch.tensor([0.2, 0.1]))
    det.observe(torch.tensor([0.6, 0.1]))
    assert det.observe(torch.tensor([0.6, 0.1])) and not det.suspected  # confirmed: a new segment


def test_a_frame_that_fails_after_selection_changed_still_hands_over_the_served_network(monkeypatch):
    cfg = Config(class_set="xmuda10", adapt=AdaptConfig(select_margin=0.05)).validate()
    handed = []
    model = confident_model()
    ad = Adapter(model, header(), cfg, on_weights=handed.append, seed=0)
    with torch.no_grad():
        for net in (ad.method.models.teacher, ad.method.models.student):
            net.image.head.bias[7] += 20.0

    def failing_labeler(fused):
        raise RuntimeError("boom after selection")

    monkeypatch.setattr(ad.method, "labeler", failing_labeler)
    stats = ad.step(synthetic_frame(0))
    assert "boom after selection" in stats["error"]
    assert ad.method.models.serve_source and len(handed) == 1  # the selection stands and is served
    assert torch.equal(handed[-1]["image.head.bias"], model.state_dict()["image.head.bias"])
