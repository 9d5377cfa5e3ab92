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
                  gpu_name="NVIDIA GeForce RTX 4090", cuda_major="12")
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
    assert k.filename.startswith(k.onnx_sha256[:12] + "-fp16-trt10.3.0-cu12-sm89-")
    names = {key().filename, key(precision="fp32").filename, key(tensorrt_version="10.4.0").filename,
             key(compute_capability="8.7").filename, key(gpu_name="NVIDIA L4").filename,
             key(onnx_sha256="0" * 64).filename, key(cuda_major="13").filename}
    assert len(names) == 7  # every field changes the name
    assert key().digest == key().digest and len(key().digest) == 16
    assert EngineKey.for_onnx(ONNX, "fp16", "10.3.0", "8.9", "NVIDIA GeForce RTX 4090",
                              cuda_major="12") == key()
    with pytest.raises(ValueError, match="cuda_major"):
        key(cuda_major="")
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
                                         ("onnx_sha256", "f" * 64), ("cuda_major", "13")])
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
    with pytest.raises(BackendError, match=r"TensorRT is not installed.*\.\[trt-cu12\]' or '\.\[trt-cu13\]"):
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


# ------------------------------------------------------------------------------ refit logic (fakes)

class FakeRefitter:
    """Stands in for trt.Refitter: records what was set; names/missing/refit result as given."""

    def __init__(self, names, missing=(), refit_ok=True, refuse=()):
        self.names, self.missing, self.refit_ok, self.refuse = list(names), list(missing), refit_ok, set(refuse)
        self.set: dict[str, object] = {}
        self.refitted = False

    def get_all_weights(self):
        return list(self.names)

    def get_missing_weights(self):
        return list(self.missing)

    def set_named_weights(self, name, weights):
        if name in self.refuse:
            return False
        self.set[name] = weights
        return True

    def refit_cuda_engine(self):
        self.refitted = True
        return self.refit_ok


class FakeParserRefitter:
    """Stands in for trt.OnnxParserRefitter: reports ``ok`` after setting only ``sets``."""

    def __init__(self, refitter, ok=True, sets=None, errors=()):
        self.refitter, self.ok, self.sets, self.errors = refitter, ok, sets, list(errors)

    def refit_from_bytes(self, data):
        for name in self.refitter.names if self.sets is None else self.sets:
            self.refitter.set[name] = "parser"
        return self.ok

    @property
    def num_errors(self):
        return len(self.errors)

    def get_error(self, i):
        return self.errors[i]


FAKE_TRT = types.SimpleNamespace(Weights=lambda a: ("Weights", a))


@pytest.fixture(scope="module")
def onnx_and_names():
    from pl3d_ros.runtime.export import export_onnx
    from pl3d_ros.runtime.tensorrt_backend import _initializer_names

    data = export_onnx(small_model(1), header())
    return data, _initializer_names(data)


def test_refit_accepted_when_the_parser_succeeds(onnx_and_names):
    from pl3d_ros.runtime.tensorrt_backend import refit_weights

    data, names = onnx_and_names
    r = FakeRefitter(names[:10])
    report = refit_weights(FAKE_TRT, r, FakeParserRefitter(r), data)
    assert r.refitted and report["parser_ok"] and report["set_explicitly"] == 0
    assert set(r.set) == set(names[:10])


def test_refit_failure_sets_every_engine_weight_from_the_onnx(onnx_and_names, caplog):
    """The parser reports failure after setting only some weights and get_missing_weights says
    nothing (TensorRT's behaviour): every engine weight is then set by name from the ONNX."""
    import onnx
    from onnx import numpy_helper

    from pl3d_ros.runtime.tensorrt_backend import refit_weights

    data, names = onnx_and_names
    r = FakeRefitter(names)
    parser = FakeParserRefitter(r, ok=False, sets=names[:3], errors=["weight not found: x"])
    with caplog.at_level(logging.WARNING):
        report = refit_weights(FAKE_TRT, r, parser, data)
    assert r.refitted and not report["parser_ok"] and report["set_explicitly"] == len(names)
    assert "weight not found" in caplog.text
    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load_model_from_string(data).graph.initializer}
    for name in names:
        kind, arr = r.set[name]
        assert kind == "Weights" and np.array_equal(arr, inits[name]) and arr.flags.c_contiguous


@pytest.mark.parametrize("case", ["engine weight the onnx lacks", "unnamed engine weight",
                                  "missing", "refused", "refit fails"])
def test_refit_rejected_unless_every_weight_was_set(onnx_and_names, case):
    from pl3d_ros.runtime.tensorrt_backend import refit_weights

    data, names = onnx_and_names
    kw, ok, match = {}, False, ""
    if case == "engine weight the onnx lacks":
        kw["names"], match = names + ["ghost.bias"], r"no initializer.*ghost\.bias.*old values"
    elif case == "unnamed engine weight":
        kw["names"], match = names + [""], r"no initializer.*<unnamed>"
    elif case == "missing":
        kw, ok, match = {"names": names, "missing": [names[0]]}, True, "unset"
    elif case == "refused":
        kw["names"], kw["refuse"], match = names, {names[1]}, "refuses weight"
    else:
        kw, ok, match = {"names": names, "refit_ok": False}, True, "refit_cuda_engine failed"
    r = FakeRefitter(**kw)
    with pytest.raises(BackendError, match=match):
        refit_weights(FAKE_TRT, r, FakeParserRefitter(r, ok=ok, sets=[]), data)
    assert not r.refitted or case == "refit fails"


class FakeHolder:
    def __init__(self, validation=None):
        self.validation, self.refit = validation, None


@pytest.fixture
def fake_backend(monkeypatch, tmp_path):
    """A TensorRTBackend whose TensorRT and CUDA parts are fakes, so the swap logic runs on CPU."""
    import contextlib

    from pl3d_ros.runtime import tensorrt_backend as tb
    from pl3d_ros.runtime.base import Backend
    from pl3d_ros.runtime.export import export_onnx

    state = types.SimpleNamespace(refitter_names=None, parser_ok=True, refitter_error=None,
                                  validation=None)

    def make_refitter(engine, logger):
        if state.refitter_error:
            raise state.refitter_error
        return FakeRefitter(state.refitter_names)

    fake = types.SimpleNamespace(Weights=lambda a: ("Weights", a), Refitter=make_refitter,
                                 OnnxParserRefitter=lambda r, lg: FakeParserRefitter(r, ok=state.parser_ok, sets=[]))
    monkeypatch.setattr(tb, "import_tensorrt", lambda: fake)
    monkeypatch.setattr(tb, "_trt_logger", lambda: "logger")
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    b = object.__new__(TensorRTBackend)
    Backend.__init__(b, header().input_shapes)
    b.header, b.precision, b.device, b.validate = header(), "fp16", torch.device("cpu"), True
    b.tolerance, b.probe_seed, b.tensorrt_version = DEFAULT_TOLERANCES["fp16"], 0, "10.3.0"
    b.last_rejected_swap, b._template = None, small_model(0)
    b._weight_names = tb._initializer_names(export_onnx(b._template, header()))
    state.refitter_names = list(b._weight_names)
    b._cache, b.key, b._plan, b.cache_hit, b.load_s = EngineCache(tmp_path), key(), b"plan", True, 0.0
    b._engine = FakeHolder({"passed": True, "which": "the running engine"})
    b._deserialize = lambda plan: object()
    b._holder = lambda plan, engine=None: FakeHolder()

    def validate(holder, onnx_bytes):
        if state.validation is not None:
            err = BackendError("TensorRT fp16 engine disagrees with ONNX Runtime")
            err.validation = state.validation
            raise err
        return {"passed": True, "which": "the new engine"}

    b._validate = validate
    return b, state


def test_swap_from_another_seed_refits_by_the_same_names(fake_backend):
    """Item 9 + 10 together: the re-export of other weights has the engine's weight names (no
    'names its weights differently'), and a parser failure is repaired by setting every weight."""
    b, state = fake_backend
    state.parser_ok = False
    b.swap_weights(small_model(1).state_dict())
    d = b.describe()
    assert b.swaps == 1 and d["last_validation"]["which"] == "the new engine"
    assert d["last_refit"]["set_explicitly"] == len(b._weight_names) and d["last_rejected_swap"] is None


@pytest.mark.parametrize("failure", ["ghost weight", "validation", "non-refittable engine"])
def test_rejected_swap_leaves_describe_of_the_running_engine_unchanged(fake_backend, failure):
    b, state = fake_backend
    running = b._engine
    before = b.describe()
    if failure == "ghost weight":
        state.parser_ok, match = False, "ghost"
        state.refitter_names = state.refitter_names + ["ghost"]
    elif failure == "validation":
        state.validation, match = {"passed": False, "max_abs_diff": 3.0}, "disagrees"
    else:
        state.refitter_error = TypeError("pybind11::init(): factory function returned nullptr")
        match = "could not create a refitter.*REFIT"
    with pytest.raises(BackendError, match=match):
        b.swap_weights(small_model(1).state_dict())
    after = b.describe()
    assert b._engine is running and b.swaps == 0
    assert {k: v for k, v in after.items() if k != "last_rejected_swap"} == \
        {k: v for k, v in before.items() if k != "last_rejected_swap"}
    assert after["last_validation"] == {"passed": True, "which": "the running engine"}
    rejected = after["last_rejected_swap"]
    assert re.search(match, rejected["error"])
    if failure == "validation":
        assert rejected["validation"]["passed"] is False


# ------------------------------------------------------------------------------ setup errors, CUDA major

def test_trt_create_maps_nullptr_and_none_to_backend_error():
    from pl3d_ros.runtime.tensorrt_backend import trt_create

    def nullptr(*args):
        raise TypeError("pybind11::init(): factory function returned nullptr")

    with pytest.raises(BackendError, match=r"could not create a runtime: TypeError.*nullptr \(check"):
        trt_create("a runtime", nullptr, "logger", hint="check the driver")
    with pytest.raises(BackendError, match="could not create an execution context"):
        trt_create("an execution context", lambda: None)
    assert trt_create("x", lambda a: a + 1, 1) == 2


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch believes a CUDA GPU is there (device queries answer, device() is a no-op)."""
    import contextlib

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Fake GPU")
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())


def test_setup_failures_are_backend_errors(monkeypatch, tmp_path, fake_cuda):
    """CUDA init failure / unsupported GPU: TensorRT's factories return nullptr (pybind's
    TypeError); callers that catch BackendError (bench/latency.py) must get one."""
    from pl3d_ros.runtime import tensorrt_backend as tb

    def nullptr(*args):
        raise TypeError("pybind11::init(): factory function returned nullptr")

    fake = types.SimpleNamespace(__version__="10.3.0", Runtime=nullptr, Builder=nullptr)
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(tb, "_trt_logger", lambda: "logger")
    with pytest.raises(BackendError, match="could not create a runtime.*CUDA initialisation failed"):
        TensorRTBackend(small_model(), header(), cache_dir=tmp_path)
    with pytest.raises(BackendError, match="could not create a builder"):
        tb.build_engine(b"onnx", "fp32")

    class Engine:  # deserialises, but cannot make a context (out of memory)
        num_io_tensors = 4

        def get_tensor_name(self, i):
            return ("image", "range_image", "logits_2d", "logits_3d")[i]

        def get_tensor_mode(self, name):
            return "in" if name in ("image", "range_image") else "out"

        def get_tensor_shape(self, name):
            return shapes[name]

        def create_execution_context(self):
            return None

    shapes = {"image": (1, 3, 32, 64), "range_image": (1, 5, 16, 64), "logits_2d": (1, 10, 32, 64),
              "logits_3d": (1, 10, 16, 64)}
    trt = types.SimpleNamespace(TensorIOMode=types.SimpleNamespace(INPUT="in"))
    with pytest.raises(BackendError, match="could not create an execution context.*out of GPU memory"):
        tb._Engine(trt, Engine(), shapes, torch.device("cuda", 0))


def test_cuda_major_of_the_installed_tensorrt(monkeypatch):
    from importlib import metadata

    from pl3d_ros.runtime import tensorrt_backend as tb

    cases = [({"tensorrt": ["tensorrt_cu13_bindings", "tensorrt_cu13"]}, "13"),
             ({"tensorrt": ["tensorrt-cu12-bindings"]}, "12"),
             ({"tensorrt": ["tensorrt"]}, None),  # JetPack's system TensorRT
             ({"tensorrt": ["tensorrt_cu12_bindings", "tensorrt_cu13_bindings"]}, None),  # ambiguous
             ({}, None)]
    try:
        for dists, expected in cases:
            tb.tensorrt_cuda_major.cache_clear()
            monkeypatch.setattr(metadata, "packages_distributions", lambda d=dists: d)
            assert tb.tensorrt_cuda_major() == expected, dists
    finally:
        tb.tensorrt_cuda_major.cache_clear()


def test_cuda_major_mismatch_is_refused_with_the_extra_to_install(monkeypatch, caplog):
    from pl3d_ros.runtime.tensorrt_backend import ALLOW_CUDA_MISMATCH_ENV, check_cuda_match

    for same in (("12", "12"), (None, "12"), ("13", None), (None, None)):
        check_cuda_match(*same)
    monkeypatch.delenv(ALLOW_CUDA_MISMATCH_ENV, raising=False)
    with pytest.raises(BackendError, match=r"built for CUDA 13 but torch.*\.\[trt-cu12\]"):
        check_cuda_match("13", "12")
    monkeypatch.setenv(ALLOW_CUDA_MISMATCH_ENV, "1")
    with caplog.at_level(logging.WARNING):
        check_cuda_match("13", "12")
    assert "going on" in caplog.text


def test_engine_key_carries_the_cuda_major(monkeypatch, fake_cuda):
    from pl3d_ros.runtime import tensorrt_backend as tb

    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.3.0"))
    monkeypatch.setattr(tb, "tensorrt_cuda_major", lambda: None)
    monkeypatch.setattr(tb, "torch_cuda_major", lambda: "12")
    k = tb.engine_key(ONNX, "fp16")
    assert k.cuda_major == "12" and "-cu12-sm90-" in k.filename and k.gpu_name == "Fake GPU"
    monkeypatch.setattr(tb, "tensorrt_cuda_major", lambda: "13")
    monkeypatch.setattr(tb, "torch_cuda_major", lambda: "13")
    assert tb.engine_key(ONNX, "fp16").cuda_major == "13"  # TensorRT's own build wins
    monkeypatch.setattr(tb, "torch_cuda_major", lambda: "12")
    with pytest.raises(BackendError, match="trt-cu12"):
        tb.engine_key(ONNX, "fp16")


# ------------------------------------------------------------------------------ GPU
#
# The GPU plan (engines/README.md) runs these in file order: the swap from a freshly initialised
# model first (every swap of such a model was refused before the export was canonical), then
# parity, concurrency and the failure paths. One engine cache per session, so each plan is built
# once and later tests hit it.

@pytest.fixture
def trt_gpu():
    """Skip unless TensorRT imports and a CUDA GPU is present; with PL3D_REQUIRE_GPU=1 (the GPU
    plan in engines/README.md) fail instead, so a GPU run cannot pass by skipping."""
    def missing(reason: str):
        if os.environ.get("PL3D_REQUIRE_GPU") == "1":
            pytest.fail(reason)
        pytest.skip(reason)

    try:
        import tensorrt as trt
    except ImportError as exc:
        missing(f"TensorRT not installed ({exc}): pip install '.[trt-cu12]' or '.[trt-cu13]' "
                "matching torch.version.cuda, on an NVIDIA GPU machine")
    if not torch.cuda.is_available():
        missing("no CUDA GPU available (torch.cuda.is_available() is False)")
    return trt


@pytest.fixture(scope="session")
def gpu_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("engines")


def _reference(model):
    from pl3d_ros.runtime.onnxruntime_backend import OnnxRuntimeBackend

    return OnnxRuntimeBackend(model, header(), providers=["CPUExecutionProvider"]).run(inputs())


def _assert_close(out, ref, max_abs, min_agree):
    stats = compare_outputs(out, ref)
    assert stats["max_abs_diff"] < max_abs and stats["label_agreement"] >= min_agree, stats


def fresh_model():
    """A freshly initialised net (default init: zero biases, BN mean 0 / var 1), as a user gets
    before training or from a new architecture: the case whose swaps were all refused."""
    from pl3d_ros.models.two_stream import build_model
    from fakes import SMALL

    torch.manual_seed(0)
    return build_model(SMALL, 10).eval()


@pytest.mark.gpu
@pytest.mark.parametrize("precision,tol,agree", [("fp32", 1e-3, 0.999), ("fp16", 0.5, 0.95)])
def test_swap_from_a_freshly_initialised_model(trt_gpu, gpu_cache, precision, tol, agree):
    start, trained = fresh_model(), small_model(1)
    backend = TensorRTBackend(start, header(), precision=precision, cache_dir=gpu_cache)
    _assert_close(backend.run(inputs()), _reference(start), tol, agree)
    backend.swap_weights(trained.state_dict())
    d = backend.describe()
    assert backend.swaps == 1 and d["last_validation"]["passed"] and d["last_rejected_swap"] is None
    _assert_close(backend.run(inputs()), _reference(trained), tol, agree)
    backend.swap_weights(start.state_dict())  # and back
    _assert_close(backend.run(inputs()), _reference(start), tol, agree)
    assert d["cuda_major"] == backend.key.cuda_major != "unknown"


@pytest.mark.gpu
def test_fp32_engine_builds_caches_and_matches_onnxruntime(trt_gpu, tmp_path):
    model = small_model()
    backend = TensorRTBackend(model, header(), precision="fp32", cache_dir=tmp_path)
    d = backend.describe()
    assert d["engine_cache"] == "miss" and d["precision"] == "fp32"
    assert d["last_validation"]["passed"] and d["tensorrt_version"] == trt_gpu.__version__
    assert backend.engine_path.is_file() and f"-cu{backend.key.cuda_major}-" in backend.engine_path.name
    _assert_close(backend.run(inputs()), _reference(model), 1e-3, 0.999)
    again = TensorRTBackend(model, header(), precision="fp32", cache_dir=tmp_path)
    assert again.describe()["engine_cache"] == "hit"
    _assert_close(again.run(inputs()), _reference(model), 1e-3, 0.999)


@pytest.mark.gpu
def test_fp16_engine_parity(trt_gpu, gpu_cache):
    model = small_model()
    ref = _reference(model)
    backend = TensorRTBackend(model, header(), precision="fp16", cache_dir=gpu_cache)
    _assert_close(backend.run(inputs()), ref, 0.5, 0.95)
    fp32 = TensorRTBackend(model, header(), precision="fp32", cache_dir=gpu_cache)
    assert fp32.engine_path != backend.engine_path  # separate cache entries
    _assert_close(fp32.run(inputs()), ref, 1e-3, 0.999)


@pytest.mark.gpu
def test_swap_under_hammering_thread_never_mixes_weights(trt_gpu, gpu_cache):
    model_a, model_b = small_model(0), small_model(1)
    ref_a, ref_b = _reference(model_a), _reference(model_b)
    backend = TensorRTBackend(model_a, header(), precision="fp32", cache_dir=gpu_cache)
    seen = hammer_during_swaps(backend, model_a, model_b, ref_a, ref_b, inputs())
    assert seen == {"aa", "bb"}, seen
    assert backend.swaps == 5 and backend.describe()["last_validation"]["passed"]


@pytest.mark.gpu
def test_failed_validation_keeps_the_old_engine(trt_gpu, gpu_cache):
    model_a, model_b = small_model(0), small_model(1)
    ref_a = _reference(model_a)
    backend = TensorRTBackend(model_a, header(), precision="fp32", cache_dir=gpu_cache)
    before = backend.describe()
    backend.tolerance = ValidationTolerance(max_abs_diff=-1.0, min_agreement=2.0)  # nothing passes
    with pytest.raises(BackendError, match="disagrees with ONNX Runtime"):
        backend.swap_weights(model_b.state_dict())
    after = backend.describe()
    assert backend.swaps == 0
    assert after["last_validation"] == before["last_validation"] and after["last_validation"]["passed"]
    assert after["last_rejected_swap"]["validation"]["passed"] is False
    _assert_close(backend.run(inputs()), ref_a, 1e-3, 0.999)


@pytest.mark.gpu
def test_non_refittable_engine_is_a_backend_error(trt_gpu, gpu_cache):
    from pl3d_ros.runtime.export import export_onnx
    from pl3d_ros.runtime.tensorrt_backend import build_engine

    model = small_model(0)
    backend = TensorRTBackend(model, header(), precision="fp32", cache_dir=gpu_cache)
    backend._plan = build_engine(export_onnx(model, header()), "fp32", refit=False)
    with pytest.raises(BackendError, match="could not create a refitter.*REFIT"):
        backend.swap_weights(small_model(1).state_dict())
    assert backend.swaps == 0 and backend.describe()["last_rejected_swap"] is not None


@pytest.mark.gpu
def test_build_engine_from_export_then_backend_hits_the_cache(trt_gpu, tmp_path):
    model = small_model()
    write_export(model, header(), tmp_path / "export")
    path = build_engine_from_export(tmp_path / "export", "fp32", cache_dir=tmp_path / "cache")
    assert path.is_file() and path.parent == tmp_path / "cache"
    assert build_engine_from_export(tmp_path / "export", "fp32", cache_dir=tmp_path / "cache") == path
    backend = TensorRTBackend(model, header(), precision="fp32", cache_dir=tmp_path / "cache")
    assert backend.describe()["engine_cache"] == "hit" and backend.engine_path == path


def test_gpu_plan_names_exactly_these_tests_in_this_order():
    """engines/README.md's GPU plan and the gpu tests here agree (names, marks, order)."""
    from pathlib import Path

    plan = (Path(__file__).resolve().parents[1] / "engines" / "README.md").read_text()
    named = []
    for name in re.findall(r"^\| \d+ \| `(test_\w+)", plan, flags=re.M):
        if name not in named:
            named.append(name)
    module = sys.modules[__name__]
    gpu_tests = [n for n, f in vars(module).items() if n.startswith("test_") and callable(f)
                 and any(m.name == "gpu" for m in getattr(f, "pytestmark", []))]
    assert named == gpu_tests
    assert named[0] == "test_swap_from_a_freshly_initialised_model"
