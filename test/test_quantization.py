"""runtime.precision int8 (issue 14): the QDQ graph, its calibration, swaps, precision resolution."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pl3d_ros import registry
from pl3d_ros.config import Config
from pl3d_ros.inputs import prepare
from pl3d_ros.runtime.base import BackendError
from pl3d_ros.runtime.factory import AUTO_PRECISION, create_backend, resolve_precision
from pl3d_ros.runtime.onnxruntime_backend import OnnxRuntimeBackend
from pl3d_ros.runtime.quantization import Int8Quantizer, calibration_feeds
from fakes import header, small_model, synthetic_frame


def _feeds(n: int = 3) -> list[dict[str, np.ndarray]]:
    h = header()
    return [prepare(synthetic_frame(i), (h.model.image_width, h.model.image_height), h.sensor).arrays()
            for i in range(n)]


def _agreement(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return min(float((a[k].argmax(1) == b[k].argmax(1)).mean()) for k in a)


@pytest.fixture(scope="module")
def int8_and_fp32():
    model, h = small_model(), header()
    calls = []

    def calibration():
        calls.append(1)
        return _feeds()

    q = OnnxRuntimeBackend(model, h, providers=["CPUExecutionProvider"], precision="int8", calibration=calibration)
    f = OnnxRuntimeBackend(model, h, providers=["CPUExecutionProvider"])
    return q, f, calls


def test_int8_graph_is_qdq_and_close_to_fp32(int8_and_fp32, one_torch_thread):
    q, f, calls = int8_and_fp32
    assert q.describe()["precision"] == "int8" and f.describe()["precision"] == "fp32" and calls == [1]
    feed = _feeds(4)[3]  # not a calibration frame
    a, b = q.run(feed), f.run(feed)
    assert set(a) == {"logits_2d", "logits_3d"} and all(a[k].dtype == np.float32 for k in a)
    assert _agreement(a, b) > 0.9
    for k in a:  # quantisation noise, not another network
        assert np.abs(a[k] - b[k]).mean() < 0.1 * np.abs(b[k]).mean()


def test_int8_quantizer_inserts_quantize_nodes_and_int8_weights():
    import onnx

    from pl3d_ros.runtime.export import export_onnx

    model, h = small_model(), header()
    quantizer = Int8Quantizer(_feeds)
    proto = onnx.load_model_from_string(quantizer.quantize(export_onnx(model, h)))
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("QuantizeLinear") > 10 and ops.count("DequantizeLinear") > 10
    int8_weights = [t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4]
    convs = sum(op == "Conv" for op in ops)
    assert len(int8_weights) == convs > 10  # every convolution's weight is stored int8
    assert quantizer.calibrated and quantizer.calibrations == 1


def test_swap_keeps_the_calibration_and_carries_the_new_weights(int8_and_fp32, one_torch_thread):
    q, _, calls = int8_and_fp32
    other = small_model(seed=1)
    feed = _feeds(4)[3]
    before = q.run(feed)
    q.swap_weights(other.state_dict())
    after = q.run(feed)
    ref = OnnxRuntimeBackend(other, header(), providers=["CPUExecutionProvider"]).run(feed)
    assert calls == [1] and q.quantizer.calibrations == (1 if q.quantizer._can_keep else 2)
    assert q.swaps == 1 and q.last_swap_ms > 0
    assert _agreement(after, ref) > 0.85 and _agreement(after, ref) > _agreement(before, ref) + 0.2


def test_recalibrate_on_request():
    model, h = small_model(), header()
    quantizer = Int8Quantizer(_feeds)
    from pl3d_ros.runtime.export import export_onnx

    data = export_onnx(model, h)
    quantizer.quantize(data)
    quantizer.calibrate()
    assert not quantizer.calibrated
    quantizer.quantize(data)
    assert quantizer.calibrations == 2


def test_precision_resolution_and_the_default():
    assert "int8" in registry.PRECISIONS and "auto" in registry.PRECISIONS
    assert Config().runtime.precision == "auto"
    assert {k: resolve_precision(k, "auto") for k in registry.BACKENDS} == AUTO_PRECISION
    assert resolve_precision("tensorrt", "fp32") == "fp32" and resolve_precision("onnxruntime", "int8") == "int8"
    for kind in ("torch", "tensorrt"):
        with pytest.raises(BackendError, match="int8 is the onnxruntime backend's"):
            resolve_precision(kind, "int8")
    with pytest.raises(BackendError, match="runs fp32, fp16, int8"):
        OnnxRuntimeBackend(small_model(), header(), precision="bf16")


def test_create_backend_default_is_int8_on_onnxruntime(one_torch_thread):
    be = create_backend("onnxruntime", small_model(), header(), calibration=_feeds)
    assert be.describe()["precision"] == "int8"
    assert create_backend("onnxruntime", small_model(), header(), precision="fp32").describe()["precision"] == "fp32"
    assert create_backend("torch", small_model(), header(), device="cpu").name == "torch"


def test_calibration_feeds_from_a_kitti_sequence_and_the_simulator(kitti00):
    h = header()
    size = (h.model.image_width, h.model.image_height)
    feeds = calibration_feeds(str(kitti00), 2, size, h.sensor)
    assert len(feeds) == 2
    assert feeds[0]["image"].shape == tuple(h.input_shapes["image"]) and feeds[0]["image"].dtype == np.float32
    assert feeds[0]["range_image"].shape == tuple(h.input_shapes["range_image"])
    sim = calibration_feeds("sim:source", 1, size, h.sensor)
    assert len(sim) == 1 and sim[0]["range_image"].max() > 1.0  # metric ranges, a real scan
    assert not sim[0]["image"].flags.writeable  # shared by every backend of this process: read-only
    with pytest.raises(ValueError):
        calibration_feeds("sim:source", 0, size, h.sensor)
