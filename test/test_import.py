"""`pl3d import` and imported models downstream: the composed checkpoint, its header's strict
validation, ONNX Runtime parity of the whole two-stream network, replay with every method, eval,
`pl3d train --init`, and the real pretrained networks on a KITTI frame.

Small random instances of 3D-MiniNet and ESPNetv2 (test/fakes.py) stand in for the real weights
where the weights are not the point; the last tests read ../shared/pretrained and fail instead of
skipping under PL3D_REQUIRE_DATA.
"""

from __future__ import annotations

import copy
import hashlib
import json

import numpy as np
import pytest
import torch

from conftest import kitti_sequence_dir, pretrained_path
from fakes import SENSOR, header, small_espnetv2, small_mininet, small_model, write_bonnetal_folder
from pl3d_ros import cli
from pl3d_ros.models.checkpoint import CheckpointError, CheckpointHeader, load_checkpoint, save_checkpoint
from pl3d_ros.models.class_map import build_class_map
from pl3d_ros.models.importer import DEFAULT_IMAGE_SIZE

#: Op types the exported imported network may contain: each has a TensorRT 10 ONNX-parser
#: implementation for static shapes (listed in engines/README.md).
TENSORRT_OPS = {"Add", "AveragePool", "BatchNormalization", "Cast", "Clip", "Concat", "Constant",
                "ConstantOfShape", "Conv", "Div", "Exp", "Gather", "GlobalAveragePool", "Greater",
                "LeakyRelu", "Log", "MatMul", "Mul", "Pad", "PRelu", "ReduceMax", "ReduceMean",
                "ReduceSum", "Relu", "Reshape", "Resize", "Shape", "Sigmoid", "Slice", "Sqrt", "Sub",
                "Transpose", "Unsqueeze"}


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    """A lidar-bonnetal folder (tiny 3D-MiniNet, arch_cfg under-stating block_1) and an EdgeNets
    ESPNetv2 state dict, both random."""
    root = tmp_path_factory.mktemp("upstream")
    mininet, espnet = small_mininet(1), small_espnetv2(2)
    folder = write_bonnetal_folder(root / "mininet", mininet, arch_blocks_1=1)
    image = root / "espnetv2_s_0.5_city.pth"
    torch.save(espnet.state_dict(), image)
    return {"folder": folder, "image": image, "mininet": mininet, "espnet": espnet, "root": root}


@pytest.fixture(scope="module")
def imported(upstream):
    """`pl3d import` of both (64x32 image input, xmuda10)."""
    out = upstream["root"] / "imported.safetensors"
    rc = cli.main(["import", "--range", str(upstream["folder"]), "--image", str(upstream["image"]),
                   "--image-size", "64x32", "-o", str(out), "--threads", "1"])
    assert rc == 0
    return out


def _inputs(h: CheckpointHeader, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    s = h.input_shapes
    rng = torch.rand(*s["range_image"], generator=g) * 30
    return torch.rand(*s["image"], generator=g), rng * (torch.rand(rng.shape[-2:], generator=g) > 0.3)


def test_import_writes_the_branches_with_class_maps_and_provenance(upstream, imported, capsys):
    net, h = load_checkpoint(imported)
    m = h.model
    assert (m.image_arch, m.range_arch, m.image_width, m.image_height) == ("espnetv2", "mininet3d", 64, 32)
    assert m.image_widths == [] and m.range_widths == [] and h.sensor == SENSOR  # sensor of arch_cfg.yaml
    rng, img = h.branches["range"], h.branches["image"]
    assert rng.params["enc_blocks_1"] == 2 and "enc_blocks_1: arch_cfg.yaml says 1, the weights hold 2" in rng.notes[0]
    assert any("KNN" in n for n in rng.notes)
    assert rng.normalisation["mean"] == list(upstream["mininet"].spec.means)
    assert img.params == {"scale": 0.5} and img.normalisation["std"] == [0.229, 0.224, 0.225]
    assert img.class_map["truck"] == ["truck", "bus", "train"] and img.class_map["parking"] == []
    assert rng.class_map["nature"] == ["vegetation", "trunk", "terrain"]
    sha = hashlib.sha256(upstream["image"].read_bytes()).hexdigest()
    assert img.source["sha256"] == sha and img.source["file"] == upstream["image"].name
    assert rng.source["sha256"]["backbone"] == hashlib.sha256((upstream["folder"] / "backbone").read_bytes()).hexdigest()
    assert "CC BY-NC-SA" in rng.source["licence"] and "Cityscapes" in img.source["licence"]

    # The branches compute the upstream networks' logits through the class maps.
    image, range_image = _inputs(h)
    with torch.no_grad():
        l2, l3, f2, f3 = net.forward_features(image, range_image)
        ref3 = build_class_map("semantickitti", "xmuda10")(upstream["mininet"](range_image))
        ref2 = build_class_map("cityscapes", "xmuda10")(upstream["espnet"](image))
    assert torch.equal(l3, ref3) and torch.equal(l2, ref2)
    assert l2.shape == (1, 10, 32, 64) and f2.shape == (1, net.image.feature_dim, 16, 32)
    assert f3.shape == (1, net.range.feature_dim, 16, 64)


def test_import_needs_both_branches_or_a_base(upstream, tmp_path, capsys):
    assert cli.main(["import", "--range", str(upstream["folder"]), "-o", str(tmp_path / "x.safetensors")]) == 1
    assert "needs both branches" in capsys.readouterr().err
    assert cli.main(["import", "-o", str(tmp_path / "x.safetensors")]) == 1
    assert "nothing to import" in capsys.readouterr().err
    assert cli.main(["import", "--image", str(upstream["image"]), "--image-size", "64x40", "--range",
                     str(upstream["folder"]), "-o", str(tmp_path / "x.safetensors")]) == 1
    assert "multiples of 16" in capsys.readouterr().err


def test_import_one_branch_keeps_the_other_from_a_checkpoint(upstream, imported, tmp_path):
    base = save_checkpoint(tmp_path / "unet.safetensors", small_model(3), header())
    out = tmp_path / "range_only.safetensors"
    assert cli.main(["import", "--range", str(upstream["folder"]), "--from", str(base), "-o", str(out)]) == 0
    net, h = load_checkpoint(out)
    base_net, base_h = load_checkpoint(base)
    assert (h.model.image_arch, h.model.image_widths) == ("unet", base_h.model.image_widths)
    assert (h.model.image_width, h.model.image_height) == (64, 32) and set(h.branches) == {"range"}
    for k, v in base_net.image.state_dict().items():
        assert torch.equal(net.image.state_dict()[k], v), k

    # replace the image branch of an imported model: its range branch stays bit for bit
    out2 = tmp_path / "image_swapped.safetensors"
    other = tmp_path / "other.pth"
    torch.save(small_espnetv2(7).state_dict(), other)
    assert cli.main(["import", "--image", str(other), "--from", str(imported), "--image-size", "64x32",
                     "-o", str(out2)]) == 0
    net2, h2 = load_checkpoint(out2)
    net1, h1 = load_checkpoint(imported)
    assert h2.branches["range"] == h1.branches["range"] and h2.branches["image"].source["file"] == "other.pth"
    assert all(torch.equal(net2.range.state_dict()[k], v) for k, v in net1.range.state_dict().items())
    assert not torch.equal(net2.image.net.base_net.level1.conv.weight, net1.image.net.base_net.level1.conv.weight)


def test_import_to_semantickitti19_and_other_backbones_refused(upstream, tmp_path):
    from pl3d_ros.labels import load_class_set
    from pl3d_ros.models.importer import compose, import_image, import_range
    from pl3d_ros.models.pretrained import PretrainedError

    k19 = load_class_set("semantickitti19")
    net, h = compose(k19, range_part=import_range(upstream["folder"], k19),
                     image_part=import_image(upstream["image"], k19), image_size=(64, 32))
    assert h.branches["image"].class_map["other-vehicle"] == ["bus", "train"]
    assert h.branches["image"].class_map["parking"] == [] and "rider" not in sum(h.branches["image"].class_map.values(), [])
    assert h.branches["range"].class_map["other-ground"] == ["other-ground"]
    image, range_image = _inputs(h)
    with torch.no_grad():
        l2, l3 = net(image, range_image)
        ref = upstream["mininet"](range_image)[:, 1:]  # identity map: 'unlabeled' dropped
    assert l2.shape[1] == l3.shape[1] == 19 and torch.allclose(l3, ref, atol=1e-5)

    import shutil

    import yaml

    other = tmp_path / "darknet"
    shutil.copytree(upstream["folder"], other)
    arch = yaml.safe_load((other / "arch_cfg.yaml").read_text())
    arch["backbone"] = {"name": "darknet", "input_depth": arch["backbone"]["input_depth"], "layers": 53}
    (other / "arch_cfg.yaml").write_text(yaml.safe_dump(arch))
    with pytest.raises(PretrainedError, match="backbone 'darknet' is not 3D-MiniNet"):
        import_range(other, k19)


class _Payload:
    """Pickles into a call of os.mkdir: loading it without weights_only would run it."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        import os

        return (os.mkdir, (self.path,))


def test_import_refuses_files_that_are_not_tensor_state_dicts(upstream, imported, tmp_path, capsys):
    marker = tmp_path / "code_ran"
    bomb = tmp_path / "bomb.pth"
    torch.save({"level1.conv.weight": torch.zeros(1), "x": _Payload(str(marker))}, bomb)
    assert cli.main(["import", "--image", str(bomb), "--from", str(imported), "-o", str(tmp_path / "o")]) == 1
    assert "not a plain tensor state dict" in capsys.readouterr().err and not marker.exists()

    wrapped = tmp_path / "train_ckpt.pth"  # a training checkpoint around the weights
    torch.save({"state_dict": upstream["espnet"].state_dict(), "epoch": 3}, wrapped)
    assert cli.main(["import", "--image", str(wrapped), "--from", str(imported), "-o", str(tmp_path / "o")]) == 1
    assert "not a flat tensor state dict" in capsys.readouterr().err

    sd = upstream["espnet"].state_dict()
    broken = {k: v for k, v in sd.items() if k != "bu_br_l4.1.weight"}
    broken["extra.weight"] = torch.zeros(2)
    broken["base_net.level1.conv.weight"] = torch.zeros(16, 3, 1, 1)
    torch.save(broken, tmp_path / "broken.pth")
    assert cli.main(["import", "--image", str(tmp_path / "broken.pth"), "--from", str(imported), "-o",
                     str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "1 missing: bu_br_l4.1.weight" in err and "1 unexpected: extra.weight" in err
    assert "base_net.level1.conv.weight (file (16, 3, 1, 1), model (16, 3, 3, 3))" in err
    assert not (tmp_path / "o").exists()


def _edited(path, tmp_path, edit=None, name="edited.safetensors", edit_tensors=None):
    """A copy of checkpoint ``path`` with its JSON header changed by ``edit(dict)`` and its
    tensors by ``edit_tensors(dict)``."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        h = json.loads(f.metadata()["pl3d"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if edit is not None:
        edit(h)
    if edit_tensors is not None:
        edit_tensors(tensors)
    out = tmp_path / name
    save_file(tensors, str(out), metadata={"pl3d": json.dumps(h)})
    return out


def _set(path: str, value):
    def edit(h):
        *parents, leaf = path.split(".")
        node = h
        for p in parents:
            node = node[p]
        if value is KeyError:
            del node[leaf]
        else:
            node[leaf] = value
    return edit


@pytest.mark.parametrize("edit,message", [
    (_set("branches.image.params", {"scale": 3.0}), r"image branch \(espnetv2\): params.scale 3.0 is not"),
    (_set("branches.image.params", {"scale": 0.5, "depth": 2}), r"unknown \['depth'\]"),
    (_set("branches.range.params.features", "96"), "params.features must be an integer"),
    (_set("branches.range.params.dec_features", 32), "must equal the backbone's"),
    (_set("branches.image.class_map.road", ["road", "sky", "lava"]), "unknown.*lava"),
    (_set("branches.image.class_map.car", ["car", "road"]), "mapped to both"),
    (_set("branches.range.class_map.parking", KeyError), r"missing \['parking'\]"),
    (_set("branches.range.normalisation.std", [1, 1, 1, 1, 0]), "std must be > 0"),
    (_set("branches.range.normalisation.mean", [0, 0, 0]), "5 finite numbers"),
    (_set("branches.image.normalisation.channels", ["blue", "green", "red"]), "runtime's input order"),
    (_set("branches.image.source_classes", ["a", "a"]), "distinct"),
    (_set("branches.range.notes", KeyError), r"branches.range: missing \['notes'\]"),
    (_set("branches.range.extra", 1), r"unknown key\(s\) \['extra'\]"),
    (_set("branches.image.arch", "unet"), "branches.image.arch is 'unet'"),
    (_set("branches.image", KeyError), "the image branch is espnetv2, but branches.image is missing"),
    (_set("model.range_arch", "rangenet"), "model.range_arch must be one of unet, mininet3d"),
    (_set("model.image_widths", [4, 8]), "must be \\[\\] for a espnetv2 branch"),
    (_set("model.image_arch", KeyError), r"model is missing \['image_arch'\]"),
    (_set("sensor.rows", 20), "multiples of 8 for 3D-MiniNet"),
    (_set("branches", KeyError), "without 'branches'"),
    (_set("extra", {}), r"unknown header key\(s\) \['extra'\]"),
])
def test_header_is_validated_strictly(imported, tmp_path, edit, message):
    path = _edited(imported, tmp_path, edit)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


def _drop_head_bias(t):
    del t["range.net.head.0.bias"]


@pytest.mark.parametrize("edit_tensors,message", [
    (_drop_head_bias, r"1 missing: range.net.head.0.bias"),
    (lambda t: t.update({"range.net.spare": torch.zeros(3)}), r"1 unexpected: range.net.spare"),
    (lambda t: t.update({"image.net.base_net.level1.conv.weight": torch.zeros(16, 3, 1, 1)}),
     r"image.net.base_net.level1.conv.weight \(file \(16, 3, 1, 1\), model \(16, 3, 3, 3\)\)"),
])
def test_weights_must_fit_the_header_exactly(imported, tmp_path, edit_tensors, message):
    path = _edited(imported, tmp_path, edit_tensors=edit_tensors)
    with pytest.raises(CheckpointError, match="do not fit the architecture in its header.*" + message):
        load_checkpoint(path)


def test_header_round_trips_and_unet_checkpoints_are_unchanged(imported, tmp_path):
    _, h = load_checkpoint(imported)
    assert CheckpointHeader.from_dict(json.loads(json.dumps(h.to_dict())), "x").to_dict() == h.to_dict()
    # a unet checkpoint has no branches; a version-1 header (the bundled model's) still reads
    path = save_checkpoint(tmp_path / "unet.safetensors", small_model(), header())
    v1 = _edited(path, tmp_path, lambda d: (d.update(version=1), d.pop("branches"), d["model"].pop("image_arch"),
                                            d["model"].pop("range_arch")), "v1.safetensors")
    net, h1 = load_checkpoint(v1)
    assert (h1.model.image_arch, h1.model.range_arch, h1.branches) == ("unet", "unet", {})
    bad = _edited(path, tmp_path, lambda d: d.update(version=1), "v1bad.safetensors")
    with pytest.raises(CheckpointError, match="unknown header key.*branches"):
        load_checkpoint(bad)


def test_onnxruntime_matches_torch_on_the_whole_imported_network(imported, monkeypatch):
    """The existing parity test's tolerances, on the imported two-stream network; only op types
    with a TensorRT implementation in the graph."""
    import onnx

    from pl3d_ros.runtime import onnxruntime_backend
    from pl3d_ros.runtime.torch_backend import TorchBackend

    graphs = []  # the backend's own export, kept for its op types
    export = onnxruntime_backend.export_onnx
    monkeypatch.setattr(onnxruntime_backend, "export_onnx", lambda m, h: graphs.append(export(m, h)) or graphs[-1])
    model, h = load_checkpoint(imported)
    image, range_image = _inputs(h, seed=5)
    x = {"image": image.numpy(), "range_image": range_image.numpy()}
    ref = TorchBackend(model, h.input_shapes, device="cpu").run(x)
    out = onnxruntime_backend.OnnxRuntimeBackend(model, h, providers=["CPUExecutionProvider"]).run(x)
    for name in ("logits_2d", "logits_3d"):
        assert np.isfinite(out[name]).all()
        assert np.abs(out[name] - ref[name]).max() < 1e-3, name
        assert (out[name].argmax(1) == ref[name].argmax(1)).mean() >= 0.999, name
    ops = {n.op_type for n in onnx.load_from_string(graphs[0]).graph.node}
    assert ops <= TENSORRT_OPS, sorted(ops - TENSORRT_OPS)


def test_replay_every_method_and_eval_take_the_imported_model(imported, synthetic_bag, tmp_path, capsys):
    for method in ("source", "tent", "pl", "full"):
        rc = cli.main(["replay", str(synthetic_bag), "--model", str(imported), "--method", method, "--out",
                       str(tmp_path / method), "--no-bag", "--threads", "1", "--backend", "torch"])
        assert rc == 0, method
        metrics = json.loads((tmp_path / method / "metrics.json").read_text())
        assert metrics["frames_scored"] == 3 and np.isfinite(metrics["miou"]["fused"])
        assert metrics["adapt_steps"] == (0 if method == "source" else 3), method
    assert cli.main(["eval", str(imported), "--data", str(synthetic_bag), "--out", str(tmp_path / "eval"),
                     "--threads", "1", "--backend", "torch"]) == 0
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["frames"] == 3


def test_norm_layers_of_imported_branches_adapt(imported):
    """Tent's trainable set on an imported model: the BatchNorm affines of both networks, and
    nothing else (not the PReLUs, not the convolutions)."""
    from pl3d_ros.adapt.teacher import select_trainable

    net, _ = load_checkpoint(imported)
    names = select_trainable(copy.deepcopy(net), "norm")
    assert any(n.startswith("image.net.") for n in names) and any(n.startswith("range.net.") for n in names)
    bn = {f"{m}.{p}" for m, mod in net.named_modules() if isinstance(mod, torch.nn.BatchNorm2d)
          for p in ("weight", "bias")}
    assert set(names) == bn


def test_train_init_fine_tunes_an_imported_model(imported, synthetic_bag, tmp_path, capsys):
    out = tmp_path / "ft.safetensors"
    assert cli.main(["train", "--init", str(imported), "--data", str(synthetic_bag), "--out", str(out),
                     "--epochs", "1", "--lr", "1e-4", "--threads", "1", "--device", "cpu"]) == 0
    before, h0 = load_checkpoint(imported)
    after, h1 = load_checkpoint(out)
    assert h1.branches == h0.branches and h1.model == h0.model
    assert h1.training["data"]["init"]["checkpoint"] == str(imported)
    changed = [k for k, v in before.state_dict().items() if not torch.equal(after.state_dict()[k], v)]
    assert any(k.startswith("image.net.") for k in changed) and any(k.startswith("range.net.") for k in changed)
    assert cli.main(["train", "--init", str(imported), "--preset", "cpu", "--data", str(synthetic_bag),
                     "--out", str(out)]) == 1
    assert "drop --preset" in capsys.readouterr().err


# -- the real pretrained networks ------------------------------------------------------------------


def test_real_import_default_and_fused_accuracy_on_a_kitti_frame(tmp_path, capsys):
    """`pl3d import` of 3D-MiniNet-tiny + ESPNetv2 (defaults) and the segmenter on one frame of
    KITTI 00 (training data of the range network): the header says what the README says, and
    the fused labels are right for most in-view points (any error in the normalisation, class maps
    or the wiring into the pipeline collapses this)."""
    from pl3d_ros.app import build_segmenter
    from pl3d_ros.config import Config
    from pl3d_ros.io.kitti import KittiSequence

    folder = pretrained_path("3dmininet-tiny-semantickitti")
    image = pretrained_path("espnetv2-cityscapes/espnetv2_s_2.0_city_1024x512.pth")
    out = tmp_path / "real.safetensors"
    assert cli.main(["import", "--range", str(folder), "--image", str(image), "-o", str(out), "--threads", "1"]) == 0
    text = capsys.readouterr().out
    assert "3D-MiniNet-tiny" in text and "the weights hold 7" in text and "same outputs" in text
    net, h = load_checkpoint(out)
    assert (h.model.image_width, h.model.image_height) == DEFAULT_IMAGE_SIZE
    assert (h.sensor.rows, h.sensor.cols, h.sensor.fov_up_deg, h.sensor.fov_down_deg) == (64, 2048, 3.0, -25.0)
    assert h.branches["range"].params["enc_blocks_1"] == 7 and h.branches["image"].params["scale"] == 2.0
    assert h.branches["image"].source["sha256"] == hashlib.sha256(image.read_bytes()).hexdigest()

    seg = build_segmenter(Config().replace(**{"runtime.backend": "torch", "runtime.threads": 1}), net, h)
    frame = next(iter(KittiSequence(kitti_sequence_dir("00")).frames()))
    pred = seg.infer(frame)
    gt = h.class_set.to_train_ids(frame.labels)
    scored = pred.in_view & (gt != 255)
    assert (pred.labels[scored] == gt[scored]).mean() > 0.80
