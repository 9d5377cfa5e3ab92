"""INT8 static quantization of the exported graph for ONNX Runtime's CPU provider
(``runtime.precision: int8``).

QDQ format, weights int8 per output channel (symmetric), activations uint8 per tensor
(asymmetric): the combination ONNX Runtime runs on its VNNI int8 convolution kernels (uint8 x
int8): 2.2x faster than fp32 on the bundled model (2-core AVX512-VNNI EPYC), where int8
activations ran no faster than fp32. Activation ranges (MinMax) come from running the fp32
graph on a few frames of the training data; for the bundled model that is the simulated
``source`` domain (``sim:source``).

Weight swaps keep the calibration: the activation ranges measured once at start-up are reused
for every new set of fp32 weights (only the weights are quantized again, per channel from their
own values). Re-calibrating each swap would run the fp32 graph on every calibration frame again
on the robot's CPU; the adapted networks change normalisation affines, so activation ranges move
little. ``Int8Quantizer.calibrate`` starts over where that is wanted.
"""

from __future__ import annotations

import functools
import inspect
import logging
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

#: Calibration frames when ``runtime.int8_calibration_frames`` is not set: one frame calibrates
#: as well as eight on the bundled model (argmax agreement with fp32 99.3 % either way), four
#: leave a margin for scenes with other ranges.
DEFAULT_FRAMES = 4

Feeds = list[dict[str, np.ndarray]]


def calibration_feeds(spec: str, frames: int, image_size: tuple[int, int], sensor: Any, seed: int = 0) -> Feeds:
    """Backend feeds ({"image", "range_image"} float32) of ``frames`` frames of ``spec``:
    ``sim:PRESET`` (a simulated drive in that domain, seeded) or comma-separated bags / KITTI
    sequence folders (the first frames of the inputs in order). Simulated feeds are cached per
    process and shared: read-only arrays."""
    if frames < 1:
        raise ValueError(f"need at least one calibration frame, got {frames}")
    if spec.startswith("sim:"):
        return [dict(f) for f in _sim_feeds(spec[4:], frames, image_size, _sensor_key(sensor), seed)]
    from pl3d_ros.inputs import prepare
    from pl3d_ros.io.sources import open_source

    feeds: Feeds = []
    for path in (p.strip() for p in spec.split(",") if p.strip()):
        for frame in open_source(path).frames():
            feeds.append(prepare(frame, image_size, sensor).arrays())
            if len(feeds) == frames:
                return feeds
    if not feeds:
        raise ValueError(f"no calibration frames in {spec!r}")
    return feeds


def _sensor_key(sensor: Any) -> tuple:
    return (int(sensor.rows), int(sensor.cols), float(sensor.fov_up_deg), float(sensor.fov_down_deg))


@functools.lru_cache(maxsize=4)
def _sim_feeds(preset: str, frames: int, image_size: tuple[int, int], sensor_key: tuple,
               seed: int) -> tuple[dict[str, np.ndarray], ...]:
    # Cached per process: simulating a frame costs ~0.5 s, and every backend of one architecture
    # (tests, benches, a rebuilt segmenter) calibrates on the same frames.
    from pl3d_ros.config import RangeImageConfig
    from pl3d_ros.inputs import prepare
    from pl3d_ros.sim.sequence import simulate_frames

    rows, cols, up, down = sensor_key
    sensor = RangeImageConfig(rows=rows, cols=cols, fov_up_deg=up, fov_down_deg=down)
    out = []
    for frame in simulate_frames(preset, frames, seed):
        feed = {k: np.array(v) for k, v in prepare(frame, image_size, sensor).arrays().items()}
        for arr in feed.values():
            arr.flags.writeable = False  # shared between callers
        out.append(feed)
    return tuple(out)


class _Reader:
    """onnxruntime.quantization's CalibrationDataReader protocol over a list of feeds."""

    def __init__(self, feeds: Feeds) -> None:
        self._it = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)


class Int8Quantizer:
    """fp32 ONNX -> QDQ int8 ONNX, calibrated once (see the module docstring).

    feeds: called once, at the first ``quantize``, for the calibration feeds. Thread-safe
    (a swap quantizes on the deployer's thread while inference runs the old session).
    """

    def __init__(self, feeds: Callable[[], Feeds]) -> None:
        self._feeds_fn = feeds
        self._feeds: Feeds | None = None
        self._dir = tempfile.TemporaryDirectory(prefix="pl3d-int8-")
        self._ranges = Path(self._dir.name) / "calibration.json"
        self._lock = threading.Lock()
        self.calibrations = 0
        # ONNX Runtime >= 1.2x caches calibration ranges in a JSON file (calibration_cache_path);
        # older versions cannot take ranges from outside, so they calibrate on every quantize.
        from onnxruntime.quantization import quantize_static

        self._can_keep = "calibration_cache_path" in inspect.signature(quantize_static).parameters

    @property
    def calibrated(self) -> bool:
        return self._ranges.is_file()

    def calibrate(self) -> None:
        """Forget the activation ranges: the next ``quantize`` measures them again."""
        with self._lock:
            self._ranges.unlink(missing_ok=True)

    def quantize(self, onnx_bytes: bytes) -> bytes:
        """The QDQ int8 graph of an fp32 graph (serialised ONNX both)."""
        import onnx
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        from onnxruntime.quantization.shape_inference import quant_pre_process

        with self._lock, tempfile.TemporaryDirectory(dir=self._dir.name) as tmp:
            raw, src, dst = Path(tmp) / "raw.onnx", Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
            raw.write_bytes(onnx_bytes)
            # ONNX Runtime's recommended pre-pass (shape inference, graph clean-up; 0.1 s): the
            # quantizer warns on every call without it. Static shapes: no symbolic inference.
            quant_pre_process(str(raw), str(src), skip_symbolic_shape=True)
            reader = None
            if not (self._can_keep and self.calibrated):
                if self._feeds is None:
                    self._feeds = self._feeds_fn()
                reader = _Reader(self._feeds)
                self.calibrations += 1
            kwargs: dict[str, Any] = {"calibration_cache_path": str(self._ranges)} if self._can_keep else {}
            quantize_static(str(src), str(dst), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax, **kwargs)
            return onnx.load_model(str(dst)).SerializeToString()
