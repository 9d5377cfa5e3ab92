"""Two-stream model, checkpoints, ONNX export parity and atomic weight swaps (CPU)."""

import json
import threading

import numpy as np
import pytest
import torch

from pl3d_ros.config import RangeImageConfig
from pl3d_ros.models.checkpoint import (CheckpointError, load_checkpoint,
                                        read_header, save_checkpoint)
from pl3d_ros.models.points import fuse, gather_cells, sample_pixels
from fakes import header, net_inputs, small_model
from pl3d_ros.runtime.onnxruntime_backend import OnnxRuntimeBackend
from pl3d_ros.runtime.torch_backend import TorchBackend

def test_branch_output_shapes():
    model = small_model()
    x = net_inputs()
    l2, l3, f2, f3 = model.forward_features(torch.from_numpy(x["image"]), torch.from_numpy(x["range_image"]))
    assert l2.shape == (1, 10, 32, 64) and l3.shape == (1, 10, 16, 64)
    assert f2.shape == (1, 4, 32, 64) and f3.shape == (1, 4, 16, 64)


def test_sample_pixels_is_bilinear_in_pixel_coordinates():
    grid = torch.arange(12, dtype=torch.float32).view(1, 1, 3, 4)  # value = 4 * row + col
    uv = torch.tensor([[0.0, 0.0], [1.5, 0.0], [2.0, 1.25], [3.0, 2.0]])
    np.testing.assert_allclose(sample_pixels(grid, uv)[:, 0].numpy(), [0.0, 1.5, 7.0, 11.0], atol=1e-6)
    cells = gather_cells(grid, torch.tensor([2, 0]), torch.tensor([1, 3]))
    assert cells[:, 0].tolist() == [9.0, 3.0]


def test_fusion_weights_by_negative_entropy():
    p2 = torch.tensor([[0.9, 0.1]])
    p3 = torch.tensor([[0.5, 0.5], [0.2, 0.8]])
    in_view = torch.tensor([True, False])
    out = fuse(p2, p3, in_view, rule="entropy")
    h2 = -(0.9 * np.log(0.9) + 0.1 * np.log(0.1))
    h3 = np.log(2.0)
    w2, w3 = np.exp(-h2), np.exp(-h3)
    expected = (w2 * 0.9 + w3 * 0.5) / (w2 + w3)
    assert out[0, 0].item() == pytest.approx(expected, abs=1e-6)
    assert out[1].tolist() == pytest.approx([0.2, 0.8])  # out of view: the 3D branch alone
    assert torch.allclose(out.sum(1), torch.ones(2))


def test_checkpoint_round_trip_and_refusals(tmp_path):
    model = small_model()
    path = save_checkpoint(tmp_path / "m.safetensors", model, header())
    loaded, h = load_checkpoint(path)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert h.class_set.name == "xmuda10" and h.training == {"note": "test"}
    assert h.input_shapes == {"image": [1, 3, 32, 64], "range_image": [1, 5, 16, 64]}
    with pytest.raises(CheckpointError, match="class set 'xmuda10'.*'semantickitti19'"):
        load_checkpoint(path, class_set="semantickitti19")
    with pytest.raises(CheckpointError, match="expects range images"):
        load_checkpoint(path, sensor=RangeImageConfig())
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.safetensors")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        read_header(corrupt)


def test_checkpoint_whose_weights_do_not_fit_its_header(tmp_path):
    from safetensors.torch import save_file

    h = header().to_dict()
    h["model"]["range_widths"] = [4, 8, 16]  # the header claims another architecture
    state = {k: v.contiguous() for k, v in small_model().state_dict().items()}
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path), metadata={"pl3d": json.dumps(h)})
    with pytest.raises(CheckpointError, match="input spec|do not fit"):
        load_checkpoint(path)
    h["input"]["range_image"] = [1, 5, 16, 64]
    save_file(state, str(path), metadata={"pl3d": json.dumps(h)})
    with pytest.raises(CheckpointError, match="do not fit the architecture"):
        load_checkpoint(path)


def test_onnxruntime_matches_torch():
    model = small_model()
    x = net_inputs()
    ref = TorchBackend(model, header().input_shapes, device="cpu").run(x)
    out = OnnxRuntimeBackend(model, header(), providers=["CPUExecutionProvider"]).run(x)
    for name in ("logits_2d", "logits_3d"):
        assert np.abs(out[name] - ref[name]).max() < 1e-3, name
        agree = (out[name].argmax(1) == ref[name].argmax(1)).mean()
        assert agree >= 0.999, (name, agree)


def hammer_during_swaps(backend, model_a, model_b, ref_a, ref_b, x, tol=1e-3) -> set[str]:
    """Swap a -> b -> a -> b -> a -> b while a thread runs ``backend`` non-stop; -> the set of
    per-run tags, one letter per output naming the weights it came from ("aa", "bb", "ab", ...)."""
    seen, errors, stop = [], [], threading.Event()

    def which(out):
        tags = ""
        for name in ("logits_2d", "logits_3d"):
            da, db = (np.abs(out[name] - r[name]).max() for r in (ref_a, ref_b))
            tags += "a" if da < tol else "b" if db < tol else "?"
        return tags

    def hammer():
        try:
            while not stop.is_set():
                seen.append(which(backend.run(x)))
        except Exception as exc:  # surfaced below
            errors.append(exc)

    thread = threading.Thread(target=hammer)
    thread.start()
    for state in (model_b, model_a, model_b, model_a, model_b):
        backend.swap_weights(state.state_dict())
        n = len(seen)
        for _ in range(1000):  # let the hammer finish runs on these weights before the next swap
            if len(seen) >= n + 2 or errors:
                break
            threading.Event().wait(0.005)
    stop.set()
    thread.join(timeout=30)
    assert not errors and not thread.is_alive()
    assert which(backend.run(x)) == "bb"
    return set(seen)


@pytest.mark.parametrize("backend_cls", [TorchBackend, OnnxRuntimeBackend])
def test_swap_under_concurrent_runs_never_mixes_weights(backend_cls):
    model_a, model_b = small_model(0), small_model(1)
    x = net_inputs()
    ref_a = TorchBackend(model_a, header().input_shapes, device="cpu").run(x)
    ref_b = TorchBackend(model_b, header().input_shapes, device="cpu").run(x)
    backend = (TorchBackend(model_a, header().input_shapes, device="cpu") if backend_cls is TorchBackend
               else OnnxRuntimeBackend(model_a, header(), providers=["CPUExecutionProvider"]))
    seen = hammer_during_swaps(backend, model_a, model_b, ref_a, ref_b, x)
    assert seen == {"aa", "bb"}, seen  # every run: both branches from one version
    assert backend.swaps == 5 and backend.last_swap_ms > 0


def test_cli_export_writes_onnx_and_sidecar(tmp_path, capsys):
    import onnxruntime as ort

    from pl3d_ros.cli import main

    ckpt = save_checkpoint(tmp_path / "m.safetensors", small_model(), header())
    assert main(["export", str(ckpt), "-o", str(tmp_path / "out")]) == 0
    side = json.loads((tmp_path / "out" / "model.json").read_text())
    assert side["inputs"]["range_image"]["shape"] == [1, 5, 16, 64]
    assert side["outputs"]["logits_2d"]["shape"] == [1, 10, 32, 64] and side["classes"][0] == "car"
    sess = ort.InferenceSession(str(tmp_path / "out" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["image", "range_image"]
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    assert main(["export", str(bad), "-o", str(tmp_path / "x")]) == 1
    assert "not a readable safetensors" in capsys.readouterr().err


def test_coarse_feature_maps_are_sampled_at_the_same_places():
    """Features at stride 2 (ESPNetv2's decoder) must be read where the full-resolution logits
    are: uv are input-image pixels, whatever the grid's resolution."""
    fine = torch.arange(64, dtype=torch.float32).view(1, 1, 8, 8) % 8  # value = column
    coarse = torch.nn.functional.avg_pool2d(fine, 2)  # value = column pair mean (0.5, 2.5, ...)
    uv = torch.tensor([[0.5, 3.0], [4.5, 1.0], [6.5, 6.0]], dtype=torch.float64)
    np.testing.assert_allclose(sample_pixels(fine, uv)[:, 0].numpy(), [0.5, 4.5, 6.5], atol=1e-6)
    np.testing.assert_allclose(sample_pixels(coarse, uv, (8, 8))[:, 0].numpy(), [0.5, 4.5, 6.5], atol=1e-6)
