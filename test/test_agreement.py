"""Cross-modal class agreement (adapt/agreement.py) and its use in full's fusion."""

from __future__ import annotations

import pytest
import torch

from pl3d_ros.adapt.agreement import ClassAgreement


def test_agreement_is_each_branchs_precision_against_the_other():
    agree = ClassAgreement(3, momentum=0.0, prior_points=0.0)
    # the image branch calls everything class 0; the range branch splits 0 / 1 / 2 evenly
    l3 = torch.tensor([0] * 10 + [1] * 10 + [2] * 10)
    agree.update(torch.zeros(30, dtype=torch.long), l3)
    r = agree.reliability()
    assert r[0, 0] == pytest.approx(1 / 3)  # a third of the image's class-0 points are 0 for the range
    assert r[1, 0] == pytest.approx(1.0)  # every range class-0 point is 0 for the image
    assert r[1, 1] == pytest.approx(0.0) and r[1, 2] == pytest.approx(0.0)
    b = agree.bias(1.0)
    assert b.shape == (2, 3) and b.dtype == torch.float32
    assert b[1, 0] == pytest.approx(0.0) and b[0, 0] == pytest.approx(float(torch.log(torch.tensor(1 / 3))))


def test_agreement_shrinks_rare_classes_and_decays_old_frames():
    agree = ClassAgreement(2, momentum=0.5, prior_points=10.0)
    assert torch.allclose(agree.reliability(), torch.full((2, 2), 0.5, dtype=torch.float64))
    # 100 agreeing class-0 points, one disagreeing class-1 point of the image branch
    l2 = torch.tensor([0] * 100 + [1])
    l3 = torch.tensor([0] * 100 + [0])
    agree.update(l2, l3)
    r = agree.reliability()
    overall = 100 / 101
    assert r[0, 1] == pytest.approx(10 * overall / 11)  # one point barely moves it off the average
    agree.update(torch.tensor([1, 1]), torch.tensor([1, 1]))
    assert agree.predicted[0, 0] == pytest.approx(50.0)  # the first frame's counts halved
    agree.reset()
    assert float(agree.predicted.sum()) == 0.0


def test_agreement_rejects_labels_at_different_points():
    with pytest.raises(ValueError, match="same points"):
        ClassAgreement(3).update(torch.zeros(4, dtype=torch.long), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="momentum"):
        ClassAgreement(3, momentum=1.0)


@pytest.mark.usefixtures("one_torch_thread")
def test_full_deploys_the_agreement_fusion_and_a_checkpoint_keeps_it(tmp_path):
    from fakes import confident_model, header, synthetic_frame
    from pl3d_ros.adapt import Adapter
    from pl3d_ros.config import AdaptConfig, Config
    from pl3d_ros.models.checkpoint import read_header
    from pl3d_ros.pipeline import FUSION_KEY, Segmenter

    cfg = Config(class_set="xmuda10", adapt=AdaptConfig(fusion_agreement=1.0, swap_every_steps=1)).validate()
    calls = []
    ad = Adapter(confident_model(), header(), cfg, on_weights=calls.append, seed=0)
    for i in range(3):
        stats = ad.step(synthetic_frame(i, seq=i))
        assert "error" not in stats, stats
    assert 0.0 <= stats["agreement_2d"] <= 1.0 and 0.0 <= stats["agreement_3d"] <= 1.0
    bias = calls[-1][FUSION_KEY]
    assert bias.shape == (2, 10) and bool(torch.isfinite(bias).all())
    assert float(bias.std()) > 0  # the classes are told apart
    seg = Segmenter(type("B", (), {"swap_weights": lambda self, s: None})(), header())
    seg.deploy(dict(calls[-1]))
    assert torch.equal(seg.fusion_bias, bias)
    path = ad.save(tmp_path / "adapted.safetensors")
    reread = Segmenter(type("B", (), {})(), read_header(path))
    torch.testing.assert_close(reread.fusion_bias, ad.method.fusion_bias.cpu())
