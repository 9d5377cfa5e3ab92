"""Engine cache (anywhere), the TensorRT backend's errors without TensorRT, and GPU tests.

The cache tests and the error tests run on every machine. The tests marked ``gpu`` build real
TensorRT engines from the small test model and skip, with the reason, where TensorRT or a CUDA
GPU is missing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sys
import threading
import types

import numpy as np
import pytest
import torch

from pl3d_ros.runtime.base import BackendError
from pl3d_ros.runtime.engine_cache import EngineCache, EngineCacheError, EngineKey, default_cache_dir
from pl3d_ros.runtime.export import write_export
from pl3d_ros.runtime.tensorrt_backend import (DEFAULT_TOLERANCES, TensorRTBackend, ValidationTolerance,
                                               build_engine_from_export, compare_outputs, probe_inputs)
from fakes import header, net_inputs as inputs, small_model
from test_models_runtime import hammer_during_swaps

ONNX = b"not really onnx, but bytes to hash"


def key(**over) -> EngineKey:
    fields = dict(onnx_sha256=hashlib.sha256(ONNX).hexdigest(), precision="fp16",
                  tensorrt_version="10.3.0", compute_capability="8.9",
                  gpu_name="NVIDIA GeForce RTX 4090")
    fields.update(over)
    return EngineKey(**fields)


class Builder:
    """A build_fn that counts its calls and returns distinct bytes each time."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> bytes:
        self.calls += 1
        return f"engine plan #{self.calls} ".encode() * 50


def rewrite_sidecar(cache: EngineCache, k: EngineKey, **key_over) -> None:
    side = cache.sidecar_path(k)
    meta = json.loads(side.read_text())
    meta["key"].update(key_over)
    side.write_text(json.dumps(meta))


# ------------------------------------------------------------------------------ EngineKey

def test_key_filename_is_safe_unique_and_readable():
    k = key(gpu_name="NVIDIA GeForce RTX 4090 / weird: name*?")
    assert re.fullmatch(r"[A-Za-z0-9._-]+\.engine", k.filename), k.filename
    assert k.filename.startswith(k.onnx_sha256[:12] + "-fp16-trt10.3.0-sm89-")
    names = {key().filename, key(precision="fp32").filename, key(tensorrt_version="10.4.0").filename,
             key(compute_capability="8.7").filename, key(gpu_name="NVIDIA L4").filename,
             key(onnx_sha256="0" * 64).filename}
    assert len(names) == 6  # every field changes the name
    assert key().digest == key().digest and len(key().digest) == 16
    assert EngineKey.for_onnx(ONNX, "fp16", "10.3.0", "8.9", "NVIDIA GeForce RTX 4090") == key()
    with pytest.raises(ValueError, match="precision"):
        key(precision="int8")
    with pytest.raises(ValueError, match="onnx_sha256"):
        key(onnx_sha256="abc")


def test_default_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("PL3D_ENGINE_CACHE", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("PL3D_ENGINE_CACHE")
    assert default_cache_dir() == tmp_path / "xdg" / "pl3d_ros" / "engines"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")  # the XDG spec: ignore relative paths
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "pl3d_ros" / "engines"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "pl3d_ros" / "engines"


def test_unusable_cache_dir(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(EngineCacheError, match="not a directory"):
        EngineCache(tmp_path / "file")
    with pytest.raises(EngineCacheError, match="cannot create"):
        EngineCache(tmp_path / "file" / "sub")


# ------------------------------------------------------------------------------ EngineCache

def test_store_load_round_trip_and_hit(tmp_path):
    cache = EngineCache(tmp_path / "c")
    k = key()
    assert cache.load(k) is None
    build = Builder()
    data, built = cache.get_or_build(k, build)
    assert built and build.calls == 1 and cache.path(k).read_bytes() == data
    messages: list[str] = []
    again, built = cache.get_or_build(k, build, progress=messages.append)
    assert again == data and not built and build.calls == 1
    assert any("hit" in m for m in messages)
    meta = json.loads(cache.sidecar_path(k).read_text())
    assert meta["key"] == k.fields() and meta["engine_size"] == len(data)
    assert meta["engine_sha256"] == hashlib.sha256(data).hexdigest()
    assert cache.sidecar_path(k).name == cache.path(k).name + ".json"
    # another key in the same dir is a miss
    assert cache.load(key(precision="fp32")) is None
    # force rebuilds a valid entry
    data2, built = cache.get_or_build(k, build, force=True)
    assert built and build.calls == 2 and cache.load(k) == data2 != data


@pytest.mark.parametrize("field,value", [("tensorrt_version", "10.0.1"), ("compute_capability", "8.7"),
                                         ("precision", "fp32"), ("gpu_name", "NVIDIA L4"),
                                         ("onnx_sha256", "f" * 64)])
def test_sidecar_for_something_else_rebuilds_and_overwrites(tmp_path, caplog, field, value):
    cache = EngineCache(tmp_path)
    k, build = key(), Builder()
    cache.get_or_build(k, build)
    rewrite_sidecar(cache, k, **{field: value})  # e.g. the file was built by another TensorRT
    with caplog.at_level(logging.WARNING):
        assert cache.load(k) is None
    assert field in caplog.text and value in caplog.text
    data, built = cache.get_or_build(k, build)
    assert built and build.calls == 2
    assert cache.load(k) == data
    assert json.loads(cache.sidecar_path(k).read_text())["key"][field] == k.fields()[field]


def test_truncated_engine_rebuilds(tmp_path, caplog):
    cache = EngineCache(tmp_path)
    k, build = key(), Builder()
    data, _ = cache.get_or_build(k, build)
    cache.path(k).write_bytes(data[: len(data) // 2])
    with caplog.at_level(logging.WARNING):
        assert cache.load(k) is None
    assert "truncated" in caplog.text
    rebuilt, built = cache.get_or_build(k, build)
    assert built and cache.load(k) == rebuilt


def test_corrupt_engine_same_size_rebuilds(tmp_path, caplog):
    cache = EngineCache(tmp_path)
    k, build = key(), Builder()
    data, _ = cache.get_or_build(k, build)
    cache.path(k).write_bytes(bytes([data[0] ^ 0xFF]) + data[1:])
    with caplog.at_level(logging.WARNING):
        assert cache.load(k) is None
    assert "sha256" in caplog.text
    assert cache.get_or_build(k, build)[1]


@pytest.mark.parametrize("sidecar", ["{not json", "[1, 2]", '{"format": "other"}', None])
def test_corrupt_or_missing_sidecar_rebuilds(tmp_path, sidecar):
    cache = EngineCache(tmp_path)
    k, build = key(), Builder()
    cache.get_or_build(k, build)
    if sidecar is None:
        cache.sidecar_path(k).unlink()
    else:
        cache.sidecar_path(k).write_text(sidecar)
    assert cache.load(k) is None
    data, built = cache.get_or_build(k, build)
    assert built and build.calls == 2 and cache.load(k) == data


def test_store_is_atomic_and_leaves_no_temp_files(tmp_path, monkeypatch):
    cache = EngineCache(tmp_path)
    k = key()
    old = cache.store(k, b"old plan").read_bytes()
    entry = sorted([cache.path(k).name, cache.sidecar_path(k).name])
    assert sorted(p.name for p in tmp_path.iterdir()) == entry

    # A crash while the new sidecar is written (after the new plan landed): no temp file is
    # left, and the entry is rejected (old sidecar, new plan) instead of being trusted.
    real_replace = os.replace

    def failing_replace(src, dst):
        if str(dst).endswith(".json"):
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(EngineCacheError, match="disk full"):
        cache.store(k, b"new plan, longer than the old")
    monkeypatch.setattr(os, "replace", real_replace)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert cache.path(k).read_bytes() != old
    assert cache.load(k) is None


def test_crash_inside_build_fn_leaves_no_entry(tmp_path):
    cache = EngineCache(tmp_path)

    def crash() -> bytes:
        raise RuntimeError("builder ran out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        cache.get_or_build(key(), crash)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(EngineCacheError, match="no bytes"):
        cache.get_or_build(key(), lambda: b"")
    assert list(tmp_path.iterdir()) == []


def test_concurrent_get_or_build_builds_once(tmp_path):
    cache = EngineCache(tmp_path)
    gate, build = threading.Event(), Builder()

    def slow_build() -> bytes:
        gate.wait(2)
        return build()

    results: list[tuple[bytes, bool]] = []
    threads = [threading.Thread(target=lambda: results.append(cache.get_or_build(key(), slow_build)))
               for _ in range(3)]
    for t in threads:
        t.start()
    gate.set()
    for t in threads:
        t.join(5)
    assert build.calls == 1 and sorted(b for _, b in results) == [False, False, True]
    assert len({d for d, _ in results}) == 1


# ------------------------------------------------------------------------------ validation helpers

def test_probe_inputs_are_fixed_and_plausible():
    shapes = header().input_shapes
    a, b = probe_inputs(shapes), probe_inputs(shapes)
    for name, shape in shapes.items():
        assert a[name].shape == tuple(shape) and a[name].dtype == np.float32
        np.testing.assert_array_equal(a[name], b[name])
    assert 0 <= a["image"].min() and a["image"].max() <= 1
    assert (a["range_image"][..., ::7] == 0).all() and a["range_image"][:, 0].max() <= 50


def test_compare_outputs_and_tolerance():
    rng = np.random.default_rng(0)
    ref = {"logits_2d": rng.normal(size=(1, 10, 8, 16)).astype(np.float32),
           "logits_3d": rng.normal(size=(1, 10, 4, 16)).astype(np.float32)}
    same = compare_outputs(ref, ref)
    assert same["max_abs_diff"] == 0 and same["label_agreement"] == 1
    assert DEFAULT_TOLERANCES["fp32"].violations(same) == []
    off = {k: v.copy() for k, v in ref.items()}
    off["logits_3d"] += 0.3  # a uniform shift keeps every label
    stats = compare_outputs(off, ref)
    assert stats["max_abs_diff"] == pytest.approx(0.3, abs=1e-5) and stats["label_agreement"] == 1
    assert DEFAULT_TOLERANCES["fp16"].violations(stats) == []
    assert "logits_3d: max |diff|" in DEFAULT_TOLERANCES["fp32"].violations(stats)[0]
    off["logits_2d"][0, 0] += 100.0  # class 0 wins everywhere: labels disagree
    problems = ValidationTolerance(1e9, 0.95).violations(compare_outputs(off, ref))
    assert len(problems) == 1 and "logits_2d: label agreement" in problems[0]
    off["logits_2d"][0, 0, 0, 0] = np.nan
    assert DEFAULT_TOLERANCES["fp16"].violations(compare_outputs(off, ref))  # NaN never passes


# ------------------------------------------------------------------------------ without TensorRT

def test_backend_without_tensorrt_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
    with pytest.raises(BackendError, match=r"TensorRT is not installed.*\.\[trt\]"):
        TensorRTBackend(small_model(), header(), precision="fp16", cache_dir=tmp_path)
    write_export(small_model(), header(), tmp_path / "export")
    with pytest.raises(BackendError, match=r"TensorRT is not installed"):
        build_engine_from_export(tmp_path / "export", "fp16", cache_dir=tmp_path / "cache")


def test_backend_without_cuda_says_so(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.3.0"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(BackendError, match="no CUDA GPU"):
        TensorRTBackend(small_model(), header(), cache_dir=tmp_path)
    with pytest.raises(BackendError, match="precision"):
        TensorRTBackend(small_model(), header(), precision="int8", cache_dir=tmp_path)


def test_build_from_export_checks_the_export_first(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(BackendError, match="model.onnx not found"):
        build_engine_from_export(tmp_path / "nothing", "fp16")
    out = tmp_path / "export"
    _, json_path = write_export(small_model(), header(), out)
    meta = json.loads(json_path.read_text())
    meta["onnx_sha256"] = "0" * 64  # the sidecar of another export
    json_path.write_text(json.dumps(meta))
    with pytest.raises(BackendError, match="different exports"):
        build_engine_from_export(out, "fp16", cache_dir=tmp_path / "cache")
    json_path.write_text("{broken")
    with pytest.raises(BackendError, match="not a pl3d export sidecar"):
        build_engine_from_export(out, "fp16", cache_dir=tmp_path / "cache")


# ------------------------------------------------------------------------------ GPU

@pytest.fixture
def trt_gpu():
    """Skip unless TensorRT imports and a CUDA GPU is present."""
    trt = pytest.importorskip(
        "tensorrt", reason="TensorRT not installed (pip install '.[trt]' on an NVIDIA GPU machine)")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU available (torch.cuda.is_available() is False)")
    return trt


def _reference(model):
    from pl3d_ros.runtime.onnxruntime_backend import OnnxRuntimeBackend

    return OnnxRuntimeBackend(model, header(), providers=["CPUExecutionProvider"]).run(inputs())


def _assert_close(out, ref, max_abs, min_agree):
    stats = compare_outputs(out, ref)
    assert stats["max_abs_diff"] < max_abs and stats["label_agreement"] >= min_agree, stats


@pytest.mark.gpu
def test_fp32_engine_builds_caches_and_matches_onnxruntime(trt_gpu, tmp_path):
    model = small_model()
    backend = TensorRTBackend(model, header(), precision="fp32", cache_dir=tmp_path)
    d = backend.describe()
    assert d["engine_cache"] == "miss" and d["precision"] == "fp32"
    assert d["last_validation"]["passed"] and d["tensorrt_version"] == trt_gpu.__version__
    assert backend.engine_path.is_file()
    _assert_close(backend.run(inputs()), _reference(model), 1e-3, 0.999)
    again = TensorRTBackend(model, header(), precision="fp32", cache_dir=tmp_path)
    assert again.describe()["engine_cache"] == "hit"
    _assert_close(again.run(inputs()), _reference(model), 1e-3, 0.999)


@pytest.mark.gpu
def test_fp16_engine_parity(trt_gpu, tmp_path):
    model = small_model()
    ref = _reference(model)
    backend = TensorRTBackend(model, header(), precision="fp16", cache_dir=tmp_path)
    _assert_close(backend.run(inputs()), ref, 0.5, 0.95)
    fp32 = TensorRTBackend(model, header(), precision="fp32", cache_dir=tmp_path)
    assert fp32.engine_path != backend.engine_path  # separate cache entries


@pytest.mark.gpu
def test_swap_under_hammering_thread_never_mixes_weights(trt_gpu, tmp_path):
    model_a, model_b = small_model(0), small_model(1)
    ref_a, ref_b = _reference(model_a), _reference(model_b)
    backend = TensorRTBackend(model_a, header(), precision="fp32", cache_dir=tmp_path)
    seen = hammer_during_swaps(backend, model_a, model_b, ref_a, ref_b, inputs())
    assert seen == {"aa", "bb"}, seen
    assert backend.swaps == 5 and backend.describe()["last_validation"]["passed"]


@pytest.mark.gpu
def test_failed_validation_keeps_the_old_engine(trt_gpu, tmp_path):
    model_a, model_b = small_model(0), small_model(1)
    ref_a = _reference(model_a)
    backend = TensorRTBackend(model_a, header(), precision="fp32", cache_dir=tmp_path)
    backend.tolerance = ValidationTolerance(max_abs_diff=-1.0, min_agreement=2.0)  # nothing passes
    with pytest.raises(BackendError, match="disagrees with ONNX Runtime"):
        backend.swap_weights(model_b.state_dict())
    assert backend.swaps == 0 and backend.describe()["last_validation"]["passed"] is False
    _assert_close(backend.run(inputs()), ref_a, 1e-3, 0.999)


@pytest.mark.gpu
def test_build_engine_from_export_then_backend_hits_the_cache(trt_gpu, tmp_path):
    model = small_model()
    write_export(model, header(), tmp_path / "export")
    path = build_engine_from_export(tmp_path / "export", "fp32", cache_dir=tmp_path / "cache")
    assert path.is_file() and path.parent == tmp_path / "cache"
    assert build_engine_from_export(tmp_path / "export", "fp32", cache_dir=tmp_path / "cache") == path
    backend = TensorRTBackend(model, header(), precision="fp32", cache_dir=tmp_path / "cache")
    assert backend.describe()["engine_cache"] == "hit" and backend.engine_path == path
