"""Third-party pretrained networks: safe reading, strict loading, shapes, class maps, accuracy.

The accuracy tests read ../shared/pretrained and ../shared/data (never copied into the repo);
under PL3D_REQUIRE_DATA (CI) they fail when those are missing instead of skipping.
"""

from __future__ import annotations

import io
import math
import os
import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

from conftest import kitti_sequence_dir, pretrained_path
from fakes import MININET_SMALL as SMALL_CFG
from fakes import RANGE_SPEC as SMALL_SPEC
from fakes import small_mininet, write_bonnetal_folder
from pl3d_ros.eval.metrics import ConfusionMatrix
from pl3d_ros.geometry import project_points, range_image_channels, range_projection
from pl3d_ros.io.kitti import KittiSequence
from pl3d_ros.labels import ClassSet, load_class_set
from pl3d_ros.models.class_map import (CLASS_MAPS, FLOOR, ClassMap, ClassMapError, build_class_map)
from pl3d_ros.models.espnetv2 import ESPNetv2, adaptive_avg_pool2d, load_espnetv2
from pl3d_ros.models.mininet3d import (MiniNet3D, MiniNet3DConfig, ProjectionModule, RangeInputSpec,
                                       blocks_in_weights, enc3_dilations, group_points, load_mininet3d)
from pl3d_ros.models.points import sample_pixels
from pl3d_ros.models.pretrained import PretrainedError, load_strict, read_state_dict


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


def random_range_image(rows: int, cols: int, seed: int = 0, empty: float = 0.3) -> torch.Tensor:
    """(1, 5, rows, cols) plausible channels with a fraction of empty (all-zero) cells."""
    g = torch.Generator().manual_seed(seed)
    xyz = torch.randn(1, 3, rows, cols, generator=g) * torch.tensor([10.0, 10.0, 1.0]).view(1, 3, 1, 1)
    rng = xyz.norm(dim=1, keepdim=True)
    rem = torch.rand(1, 1, rows, cols, generator=g)
    img = torch.cat([rng, xyz, rem], 1)
    return img * (torch.rand(1, 1, rows, cols, generator=g) > empty)


# -- reading state-dict files -------------------------------------------------------------------


def test_read_state_dict_roundtrip(tmp_path):
    sd = {"a.weight": torch.randn(3, 2), "a.num_batches_tracked": torch.tensor(5)}
    torch.save(sd, tmp_path / "w.pth")
    got = read_state_dict(tmp_path / "w.pth")
    assert list(got) == ["a.weight", "a.num_batches_tracked"]
    assert torch.equal(got["a.weight"], sd["a.weight"])


class _Payload:
    """Pickles into a call of os.mkdir: loading it without weights_only would run it."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_pickle_with_code_is_refused_unexecuted(tmp_path):
    marker = tmp_path / "code_ran"
    torch.save({"w": torch.zeros(2), "evil": _Payload(str(marker))}, tmp_path / "evil.pth")
    with pytest.raises(PretrainedError, match="not a plain tensor state dict"):
        read_state_dict(tmp_path / "evil.pth")
    assert not marker.exists()


def test_non_tensor_entries_and_non_mappings_are_refused(tmp_path):
    torch.save({"state_dict": {"w": torch.zeros(1)}, "epoch": 3}, tmp_path / "ckpt.pth")
    with pytest.raises(PretrainedError, match="2 entries are not tensors.*epoch"):
        read_state_dict(tmp_path / "ckpt.pth")
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(PretrainedError, match="holds a list"):
        read_state_dict(tmp_path / "list.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a torch file at all")
    with pytest.raises(PretrainedError, match="cannot read"):
        read_state_dict(tmp_path / "junk.pth")
    with pytest.raises(PretrainedError, match="not found"):
        read_state_dict(tmp_path / "missing.pth")


# -- strict loading -------------------------------------------------------------------------------


def test_load_strict_names_missing_unexpected_and_mismatched():
    model = small_mininet()
    good = {k: v.clone() for k, v in model.head.state_dict().items()}
    load_strict(model.head, good, "head")  # exact fit loads

    missing = dict(good)
    del missing["0.bias"]
    with pytest.raises(PretrainedError, match=r"1 missing: 0\.bias"):
        load_strict(model.head, missing, "head")

    extra = dict(good, **{"1.weight": torch.zeros(1)})
    with pytest.raises(PretrainedError, match=r"1 unexpected: 1\.weight"):
        load_strict(model.head, extra, "head")

    wrong = dict(good, **{"0.weight": torch.zeros(20, 8, 1, 1)})
    with pytest.raises(PretrainedError, match=r"0\.weight \(file \(20, 8, 1, 1\), model \(20, 8, 3, 3\)\)"):
        load_strict(model.head, wrong, "head")


def test_espnetv2_strict_load_reports_every_problem(tmp_path):
    sd = ESPNetv2().state_dict()
    del sd["bu_br_l4.1.weight"]
    sd["base_net.level5.0.weight"] = torch.zeros(1)
    sd["base_net.level1.conv.weight"] = torch.zeros(32, 3, 1, 1)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(PretrainedError) as err:
        load_espnetv2(tmp_path / "bad.pth")
    msg = str(err.value)
    assert "1 missing: bu_br_l4.1.weight" in msg
    assert "1 unexpected: base_net.level5.0.weight" in msg
    assert "base_net.level1.conv.weight (file (32, 3, 1, 1), model (32, 3, 3, 3))" in msg


def test_lidar_bonnetal_folder_loads_and_block_counts_come_from_weights(tmp_path):
    model = small_mininet(seed=1)
    write_bonnetal_folder(tmp_path / "ok", model, arch_blocks_1=SMALL_CFG.enc_blocks_1)
    loaded = load_mininet3d(tmp_path / "ok")
    assert loaded.config_notes == ()
    assert loaded.spec == SMALL_SPEC and loaded.knn.knn == 7 and loaded.class_names[0] == "unlabeled"
    x = random_range_image(16, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))

    # A released arch_cfg.yaml that under-states block_1 (3D-MiniNet-tiny: 6 vs 7 in the weights).
    write_bonnetal_folder(tmp_path / "understated", model, arch_blocks_1=1)
    loaded = load_mininet3d(tmp_path / "understated")
    assert loaded.cfg.enc_blocks_1 == 2
    assert loaded.config_notes == ("enc_blocks_1: arch_cfg.yaml says 1, the weights hold 2",)
    with pytest.raises(PretrainedError, match="block counts differ"):
        load_mininet3d(tmp_path / "understated", blocks_from_config=True)
    weights = {"backbone": model.backbone.state_dict(), "segmentation_decoder": model.decoder.state_dict()}
    assert blocks_in_weights(weights) == {"enc_blocks_1": 2, "enc_blocks_2": 3, "dec_blocks_1": 2, "dec_blocks_2": 1}


# -- 3D-MiniNet shapes and the grouping -------------------------------------------------------------


def test_mininet_forward_shapes_and_size_check():
    model = small_mininet()
    x = torch.cat([random_range_image(16, 64, 0), random_range_image(16, 64, 1)])
    with torch.no_grad():
        logits, feats = model.forward_features(x)
    assert logits.shape == (2, 20, 16, 64) and feats.shape == (2, 8, 16, 64)
    assert torch.isfinite(logits).all()
    with pytest.raises(ValueError, match="sensor is 16x64"):
        model(random_range_image(16, 128))


def test_group_points_equals_unfold_reference():
    """Groups are F.unfold(kernel 4, stride 4) windows; relative features use valid points only."""
    x = random_range_image(16, 64, seed=3, empty=0.5)
    x[:, :, :4, :4] = 0  # one fully empty group
    mean = torch.tensor(SMALL_SPEC.means).view(1, 5, 1, 1)
    std = torch.tensor(SMALL_SPEC.stds).view(1, 5, 1, 1)
    normalised, points = group_points(x, mean, std)

    mask = (x[:, :1] > 0).float()
    ref_norm = (x - mean) / std * mask
    assert torch.allclose(normalised, ref_norm)
    unf = lambda t: F.unfold(t[0].unsqueeze(1), kernel_size=4, stride=4)  # (C, 16, P)
    raw_g, mask_g = unf(x), unf(mask)
    centre = raw_g.sum(1, keepdim=True) / mask_g.sum(1, keepdim=True)
    centre = torch.nan_to_num(centre, nan=0.0)
    rel = (raw_g - centre) * mask_g
    ref = torch.cat([unf(ref_norm), rel, rel[1:4].norm(dim=0, keepdim=True)])
    assert points.shape == (1, 11, 16, 64)
    assert torch.allclose(points[0], ref, atol=1e-5)
    assert torch.count_nonzero(points[0, :, :, 0]) == 0  # the empty group


def test_projection_context_equals_dilated_unfold():
    """Neighbour groups: 3x3 at dilation d with zero padding d (upstream F.unfold), max over 9."""
    torch.manual_seed(0)
    proj = ProjectionModule(11, 16).eval()
    for m in proj.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
    grid = torch.randn(2, 4, 4, 16)
    for d, (conv, bn) in {1: (proj.conv_fc_context_1, proj.bn_context_1),
                          3: (proj.conv_fc_context_3, proj.bn_context_3)}.items():
        with torch.no_grad():
            got = proj._context(grid, d, conv, bn, torch.nn.ReLU())
            cols = torch.stack([F.unfold(g.unsqueeze(1), 3, dilation=d, padding=d) for g in grid])
            ref = torch.relu(bn(conv(cols))).amax(2).reshape(2, -1, 4, 16)
        assert torch.allclose(got, ref, atol=1e-6)


def test_enc3_dilations_follow_upstream_schedule():
    # upstream: dil = [1, 1]; after each block dil[1] *= 4, reset to [1, 1] once above 8
    assert enc3_dilations(5) == [(1, 1), (1, 4), (1, 1), (1, 4), (1, 1)]


# -- ESPNetv2 shapes ------------------------------------------------------------------------------


def test_espnetv2_forward_shapes_and_size_check():
    torch.manual_seed(0)
    model = ESPNetv2().eval()
    with torch.no_grad():
        logits, feats = model.forward_features(torch.rand(1, 3, 64, 96))
    assert logits.shape == (1, 20, 64, 96)
    assert feats.shape == (1, model.feature_dim, 32, 48) and model.feature_dim == 32
    with pytest.raises(ValueError, match="multiples of 16"):
        model(torch.rand(1, 3, 56, 96))


@pytest.mark.parametrize("size,out", [((24, 78), (36, 117)), ((36, 117), (24, 78)), ((24, 78), (5, 8)),
                                      ((10, 12), (5, 6))])
def test_static_adaptive_pool_equals_torch(size, out):
    x = torch.randn(2, 3, *size)
    assert torch.allclose(adaptive_avg_pool2d(x, out), F.adaptive_avg_pool2d(x, out), atol=1e-6)


# -- class maps -------------------------------------------------------------------------------------


def test_class_map_hand_checked_values():
    cmap = ClassMap(["a", "b", "c", "d"], ["X", "Y", "Z"], {"X": ["a", "b"], "Y": ["c"]})
    logits = torch.tensor([[0.0, math.log(3.0), math.log(2.0), 5.0]])  # d is left out
    out = cmap(logits)
    assert out[0, 0].item() == pytest.approx(math.log(4.0), abs=1e-6)  # log(e^0 + e^ln3)
    assert out[0, 1].item() == pytest.approx(math.log(2.0), abs=1e-6)
    assert out[0, 2].item() == pytest.approx(math.log(3.0) + math.log(FLOOR), rel=1e-5)  # no source
    p = out.softmax(1)[0]
    assert p[0].item() == pytest.approx(4 / 6, abs=1e-6) and p[1].item() == pytest.approx(2 / 6, abs=1e-6)
    assert p[2].item() < 1e-29
    # image layout (B, S, H, W) gives the same per pixel
    img = logits.view(1, 4, 1, 1).expand(2, 4, 3, 5)
    assert torch.allclose(cmap(img), out.view(1, 3, 1, 1).expand(2, 3, 3, 5), atol=1e-6)
    assert cmap.unmapped_sources == ("d",) and cmap.empty_targets == ("Z",)


def test_class_map_probabilities_sum_over_sources():
    cmap = build_class_map("cityscapes", "xmuda10")
    logits = torch.randn(50, 20) * 4
    p_src = logits[:, cmap.mapped].softmax(1)  # sky and background left out
    expected = p_src @ cmap.membership.t()
    assert torch.allclose(cmap(logits).softmax(1), expected, atol=1e-6)


def test_shipped_class_maps_follow_the_readme_table():
    c2x = build_class_map("cityscapes", "xmuda10")
    assert c2x.sources["truck"] == ("truck", "bus", "train")
    assert c2x.sources["bike"] == ("bicycle", "motorcycle", "rider")
    assert c2x.sources["nature"] == ("vegetation", "terrain")
    assert c2x.sources["other-objects"] == ("wall", "fence", "pole", "traffic light", "traffic sign")
    assert c2x.unmapped_sources == ("sky", "background") and c2x.empty_targets == ("parking",)

    k2x = build_class_map("semantickitti", "xmuda10")
    assert k2x.sources["truck"] == ("truck", "other-vehicle")
    assert k2x.sources["bike"] == ("bicycle", "motorcycle", "bicyclist", "motorcyclist")
    assert k2x.sources["nature"] == ("vegetation", "trunk", "terrain")
    assert k2x.sources["other-objects"] == ("fence", "pole", "traffic-sign")
    assert k2x.unmapped_sources == ("unlabeled", "other-ground") and k2x.empty_targets == ()

    k2k = build_class_map("semantickitti", "semantickitti19")
    logits = torch.randn(6, 20)
    assert torch.allclose(k2k(logits), logits[:, 1:], atol=1e-5)  # identity, unlabeled dropped
    assert set(CLASS_MAPS) == {("semantickitti", "xmuda10"), ("semantickitti", "semantickitti19"),
                               ("cityscapes", "xmuda10"), ("cityscapes", "semantickitti19")}


def test_class_map_rejects_bad_maps():
    with pytest.raises(ClassMapError, match="mapped to both"):
        ClassMap(["a", "b"], ["X", "Y"], {"X": ["a"], "Y": ["a"]})
    with pytest.raises(ClassMapError, match="unknown"):
        ClassMap(["a"], ["X"], {"X": ["zz"]})
    with pytest.raises(ClassMapError, match="no class map"):
        build_class_map("cityscapes", ClassSet("other", ("x",), np.zeros((1, 3), np.uint8),
                                               np.zeros(65536, np.uint8)))


def test_class_map_onnx_parity():
    cmap = build_class_map("semantickitti", "xmuda10").eval()
    x = torch.randn(1, 20, 8, 16) * 5
    buf = io.BytesIO()
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation notice
        warnings.simplefilter("ignore")
        torch.onnx.export(cmap, (x,), buf, opset_version=17, input_names=["logits"],
                          output_names=["mapped"], dynamo=False)
    sess = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"logits": x.numpy()})[0]
    assert np.abs(got - cmap(x).numpy()).max() < 1e-5


# -- accuracy of the real networks -------------------------------------------------------------------


def test_mininet3d_tiny_accuracy_on_training_frames():
    """3 frames of sequence 00 (training data of the released model). Measured with
    bench/pretrained_check.py range --sequences 00 --frames 3: 93.5 % point accuracy, 67.2 % mIoU
    over the 12 classes present; any grouping / normalisation / layer-order error collapses these."""
    model = load_mininet3d(pretrained_path("3dmininet-tiny-semantickitti"))
    assert model.cfg.variant == "tiny" and model.cfg.enc_blocks_1 == 7  # the weights' 7, not arch_cfg's 6
    seq = KittiSequence(kitti_sequence_dir("00"))
    classes = load_class_set("semantickitti19")
    cm = ConfusionMatrix(classes.num_classes)
    for i in range(3):
        points, raw, _ = seq.read(i)
        proj = range_projection(points, model.spec.range_image_config())
        with torch.no_grad():
            logits = model(torch.from_numpy(range_image_channels(points, proj))[None])[0]
        cell = (logits[1:].argmax(0)).numpy()  # classes 1..19 -> semantickitti19 ids 0..18
        cm.update(cell[proj.rows, proj.cols], classes.to_train_ids(raw))
    present = cm.matrix.sum(1) > 0
    assert 100 * np.trace(cm.matrix) / cm.total > 90.0
    assert 100 * np.mean(cm.iou()[present]) > 60.0


def test_espnetv2_cityscapes_accuracy_at_lidar_points():
    """2 images of sequence 00 at 1024x320, 2D labels at the projected LiDAR points mapped to
    xmuda10. Measured (bench/pretrained_check.py image --size 1024x320 --sequences 00 --frames 2):
    72.6 % accuracy, 49.4 % mIoU over the 7 classes with points and a Cityscapes source."""
    model = load_espnetv2(pretrained_path("espnetv2-cityscapes/espnetv2_s_2.0_city_1024x512.pth"))
    cmap = build_class_map("cityscapes", "xmuda10")
    seq = KittiSequence(kitti_sequence_dir("00"))
    classes = load_class_set("xmuda10")
    cm = ConfusionMatrix(classes.num_classes)
    from PIL import Image

    for i in range(2):
        points, raw, rgb = seq.read(i)
        proj = project_points(points, seq.camera(rgb.shape[1], rgb.shape[0]))
        h0, w0 = rgb.shape[:2]
        small = np.asarray(Image.fromarray(rgb).resize((1024, 320), Image.BILINEAR), np.float32) / 255.0
        with torch.no_grad():
            logits = model(torch.from_numpy(small).permute(2, 0, 1)[None].contiguous())
            uv = torch.from_numpy(proj.uv[proj.in_view]).float()
            uv = torch.stack([(uv[:, 0] + 0.5) * 1024 / w0 - 0.5, (uv[:, 1] + 0.5) * 320 / h0 - 0.5], 1)
            pred = cmap(sample_pixels(logits, uv)).argmax(1).numpy()
        cm.update(pred, classes.to_train_ids(raw)[proj.in_view])
    scored = (cm.matrix.sum(1) > 0) & np.array([t not in cmap.empty_targets for t in classes.names])
    assert 100 * np.trace(cm.matrix) / cm.total > 65.0
    assert 100 * np.mean(cm.iou()[scored]) > 42.0
