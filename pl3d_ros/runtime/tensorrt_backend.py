"""TensorRT 10 backend: engine build with progress, cached plans, refit-based weight swaps.

Shapes (static, from the checkpoint header; see base.py):
    image        (1, 3, H, W)        float32 in      logits_2d  (1, C, H, W)        float32 out
    range_image  (1, 5, rows, cols)  float32 in      logits_3d  (1, C, rows, cols)  float32 out

The engine is built once from the exported ONNX (``export_onnx``) with ``BuilderFlag.REFIT`` and
cached under an :class:`EngineKey` (ONNX sha256, precision, TensorRT version, GPU). An engine, its
execution context, its CUDA stream and its torch CUDA I/O buffers form one ``_Engine`` holder,
which is what ``Backend._engine`` points at: ``run`` reads that reference once and uses only that
holder, so a weight swap (which assigns a whole new holder) can never mix old and new weights.

A weight swap never touches the engine that is running. It deserialises a second engine from the
same cached plan, refits it from an ONNX re-exported with the new weights (through
``OnnxParserRefitter``: the exporter folds BatchNorm into the convolutions, so ONNX weight names
do not map 1:1 to the state dict), and validates it on a fixed probe input against ONNX Runtime on
that same ONNX before it may be swapped in (a known TensorRT issue can drop a GEMM bias under
REFIT; FP16 has broken other segmenters' accuracy). A failed validation raises ``BackendError`` and
the old engine stays.

``tensorrt`` is imported lazily, so this module imports (and its pure helpers are tested) on
machines without TensorRT or a GPU.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pl3d_ros.models.checkpoint import CheckpointHeader
from pl3d_ros.runtime.base import INPUT_NAMES, OUTPUT_NAMES, Backend, BackendError
from pl3d_ros.runtime.engine_cache import PRECISIONS, EngineCache, EngineKey
from pl3d_ros.runtime.export import export_onnx, sidecar

log = logging.getLogger(__name__)

DEFAULT_WORKSPACE_MB = 1024
PROGRESS_INTERVAL_S = 5.0  # a step-progress log line at most this often during a build

INSTALL_HINT = ("install the TensorRT extra on a machine with an NVIDIA GPU and CUDA 12: "
                "pip install '.[trt]' (or use the onnxruntime / torch backend)")


# --------------------------------------------------------------------------------------------
# Environment: TensorRT and CUDA
# --------------------------------------------------------------------------------------------

def import_tensorrt() -> Any:
    """The ``tensorrt`` module, or BackendError saying how to get it."""
    try:
        import tensorrt as trt
    except ImportError as exc:  # also covers sys.modules["tensorrt"] = None
        raise BackendError(f"TensorRT is not installed ({exc}); {INSTALL_HINT}") from exc
    return trt


def require_cuda() -> None:
    """BackendError unless torch sees a CUDA GPU (TensorRT runs on nothing else)."""
    if not torch.cuda.is_available():
        raise BackendError("no CUDA GPU is available (torch.cuda.is_available() is False): the "
                           "TensorRT backend needs an NVIDIA GPU with a working driver and a "
                           "CUDA build of torch; use the onnxruntime or torch backend here")


def _cuda_device(device: int | str | torch.device | None) -> torch.device:
    dev = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
    if dev.type != "cuda":
        raise BackendError(f"the TensorRT backend runs on a CUDA device, not {dev}")
    return torch.device("cuda", dev.index if dev.index is not None else torch.cuda.current_device())


def gpu_compute_capability(device: int | str | torch.device | None = None) -> str:
    """The GPU's compute capability as "major.minor", e.g. "8.9" (RTX 40xx), "8.7" (AGX Orin)."""
    require_cuda()
    major, minor = torch.cuda.get_device_capability(_cuda_device(device))
    return f"{major}.{minor}"


def engine_key(onnx_bytes: bytes, precision: str,
               device: int | str | torch.device | None = None) -> EngineKey:
    """The cache key of the engine for ``onnx_bytes`` at ``precision`` on this TensorRT and GPU."""
    _check_precision(precision)
    trt = import_tensorrt()
    require_cuda()
    dev = _cuda_device(device)
    return EngineKey.for_onnx(onnx_bytes, precision, str(trt.__version__),
                              gpu_compute_capability(dev), torch.cuda.get_device_name(dev))


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise BackendError(f"precision must be one of {PRECISIONS}, got {precision!r}")


@functools.lru_cache(maxsize=1)
def _trt_logger() -> Any:
    """One process-wide ILogger that forwards TensorRT's messages to Python logging.

    One instance, because TensorRT warns (and keeps the first) when builders, runtimes and
    refitters are handed different loggers.
    """
    trt = import_tensorrt()
    sev = trt.ILogger.Severity
    levels = {sev.INTERNAL_ERROR: logging.CRITICAL, sev.ERROR: logging.ERROR,
              sev.WARNING: logging.WARNING, sev.INFO: logging.DEBUG, sev.VERBOSE: logging.DEBUG}
    trt_log = logging.getLogger("pl3d_ros.tensorrt")

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity: Any, msg: str) -> None:
            trt_log.log(levels.get(severity, logging.INFO), "%s", msg)

    return _Logger()


# --------------------------------------------------------------------------------------------
# Engine build
# --------------------------------------------------------------------------------------------

def _progress_monitor(trt: Any, cancel: threading.Event | None, interval_s: float) -> Any:
    """A trt.IProgressMonitor that logs top-level phases and, every ``interval_s``, the step.

    TensorRT calls it from several internal threads, hence the lock; an exception must never
    escape into TensorRT's C++ side, hence the blanket try/except. Returning False from
    step_complete cancels the build (used when ``cancel`` is set, e.g. at node shutdown).
    """

    class _Monitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self._lock = threading.Lock()
            self._phases: dict[str, tuple[int, str | None]] = {}
            self._t0 = time.monotonic()
            self._last = self._t0

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            try:
                with self._lock:
                    self._phases[phase_name] = (num_steps, parent_phase)
                if parent_phase is None:
                    log.info("TensorRT build: %s started (%d steps, %.0f s elapsed)",
                             phase_name, num_steps, time.monotonic() - self._t0)
            except Exception:  # never raise into TensorRT
                pass

        def step_complete(self, phase_name: str, step: int) -> bool:
            try:
                now = time.monotonic()
                with self._lock:
                    due = now - self._last >= interval_s
                    if due:
                        self._last = now
                    steps, _ = self._phases.get(phase_name, (0, None))
                if due:
                    log.info("TensorRT build: %s step %d/%d (%.0f s elapsed)",
                             phase_name, step + 1, steps, now - self._t0)
                return not (cancel is not None and cancel.is_set())
            except Exception:
                return True

        def phase_finish(self, phase_name: str) -> None:
            try:
                with self._lock:
                    _, parent = self._phases.pop(phase_name, (0, None))
                if parent is None:
                    log.info("TensorRT build: %s finished (%.0f s elapsed)",
                             phase_name, time.monotonic() - self._t0)
            except Exception:
                pass

    return _Monitor()


def _parser_errors(parser: Any) -> list[str]:
    """Readable text of every error an OnnxParser / OnnxParserRefitter recorded."""
    out = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        try:
            text = str(err).strip() or err.desc()
        except Exception:
            text = repr(err)
        out.append(text)
    return out


def build_engine(onnx_bytes: bytes, precision: str = "fp16", refit: bool = True,
                 workspace_mb: int = DEFAULT_WORKSPACE_MB, log_progress: bool = True,
                 cancel: threading.Event | None = None) -> bytes:
    """Parse ``onnx_bytes`` (static shapes) and build a serialised TensorRT plan.

    precision:     "fp16" lets TensorRT pick FP16 kernels (I/O stays float32); "fp32" also
                   clears TF32, so fp32 means fp32 and its parity tolerance stays tight.
    refit:         build with BuilderFlag.REFIT so weights can be swapped without a rebuild.
    workspace_mb:  upper bound of TensorRT's scratch memory (MiB); a Jetson shares it with the CPU.
    log_progress:  log build phases every few seconds (a Jetson build can take many minutes).
    cancel:        set it to abort the build (BackendError "cancelled").
    Raises BackendError naming the parser's errors, or when the build fails.
    """
    _check_precision(precision)
    trt = import_tensorrt()
    require_cuda()
    logger = _trt_logger()
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_bytes):
        errors = _parser_errors(parser) or ["(no error recorded)"]
        raise BackendError("TensorRT cannot parse the ONNX graph:\n  " + "\n  ".join(errors))

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    if refit:
        config.set_flag(trt.BuilderFlag.REFIT)
    if precision == "fp16":
        fp16 = getattr(trt.BuilderFlag, "FP16", None)
        if fp16 is None:  # TensorRT 11 removed weakly-typed precision flags
            raise BackendError(f"TensorRT {trt.__version__} has no BuilderFlag.FP16 (removed in "
                               f"TensorRT 11): use precision fp32 or install tensorrt 10.x")
        if not getattr(builder, "platform_has_fast_fp16", True):
            log.warning("this GPU has no fast FP16; the fp16 engine may be no faster than fp32")
        config.set_flag(fp16)
    else:
        tf32 = getattr(trt.BuilderFlag, "TF32", None)
        if tf32 is not None:  # on by default since Ampere; ~1e-3 relative error per GEMM
            config.clear_flag(tf32)

    monitor = None
    if log_progress and hasattr(trt, "IProgressMonitor"):
        monitor = _progress_monitor(trt, cancel, PROGRESS_INTERVAL_S)
        config.progress_monitor = monitor  # must outlive the build: held in `monitor`
    t0 = time.monotonic()
    log.info("building TensorRT %s engine (%s, workspace %d MiB, refit %s)...",
             precision, trt.__version__, workspace_mb, refit)
    plan = builder.build_serialized_network(network, config)
    elapsed = time.monotonic() - t0
    del config, monitor  # the config references the monitor; drop it first
    if plan is None:
        if cancel is not None and cancel.is_set():
            raise BackendError(f"TensorRT engine build cancelled after {elapsed:.1f} s")
        raise BackendError(f"TensorRT failed to build the engine after {elapsed:.1f} s "
                           f"(its errors are in the log, logger 'pl3d_ros.tensorrt')")
    data = bytes(plan)
    log.info("built TensorRT %s engine in %.1f s (%.1f MB)", precision, elapsed, len(data) / 1e6)
    return data


# --------------------------------------------------------------------------------------------
# Validation against ONNX Runtime (pure numpy; tested without a GPU)
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ValidationTolerance:
    """Acceptance of an engine against ONNX Runtime on the probe input.

    max_abs_diff:   largest |logit difference| allowed over both outputs
    min_agreement:  smallest fraction of pixels/cells whose argmax label must agree (per output)
    """

    max_abs_diff: float
    min_agreement: float

    def violations(self, stats: dict[str, Any]) -> list[str]:
        """What in ``compare_outputs``'s stats breaks this tolerance (empty: it passes).

        Written as ``not (x <= tol)`` so a NaN fails.
        """
        problems = []
        for name, s in stats["outputs"].items():
            if not s["max_abs_diff"] <= self.max_abs_diff:
                problems.append(f"{name}: max |diff| {s['max_abs_diff']:.3g} > {self.max_abs_diff:g}")
            if not s["label_agreement"] >= self.min_agreement:
                problems.append(f"{name}: label agreement {s['label_agreement']:.4f} < {self.min_agreement:g}")
        return problems


DEFAULT_TOLERANCES = {
    "fp32": ValidationTolerance(max_abs_diff=1e-2, min_agreement=0.99),
    "fp16": ValidationTolerance(max_abs_diff=5e-1, min_agreement=0.95),
}


def probe_inputs(input_shapes: dict[str, Any], seed: int = 0) -> dict[str, np.ndarray]:
    """A fixed, plausible input for validation: image in [0, 1]; range image with ranges up to
    50 m, coordinates within +-50 m, intensity in [0, 1], and every 7th column empty (zeros)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name in INPUT_NAMES:
        shape = tuple(input_shapes[name])
        if name == "range_image":
            arr = np.empty(shape, np.float32)
            arr[:, 0] = rng.uniform(0.5, 50.0, (shape[0],) + shape[2:])
            arr[:, 1:4] = rng.uniform(-50.0, 50.0, (shape[0], 3) + shape[2:])
            arr[:, 4:] = rng.uniform(0.0, 1.0, (shape[0], shape[1] - 4) + shape[2:])
            arr[..., ::7] = 0.0
        else:
            arr = rng.uniform(0.0, 1.0, shape).astype(np.float32)
        out[name] = np.ascontiguousarray(arr, dtype=np.float32)
    return out


def compare_outputs(outputs: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> dict[str, Any]:
    """Per output: max |diff| and argmax-label agreement over the class axis (axis 1).

    Returns {"max_abs_diff": worst, "label_agreement": worst, "outputs": {name: {...}}}.
    """
    per: dict[str, dict[str, float]] = {}
    for name in OUTPUT_NAMES:
        a = np.asarray(outputs[name], dtype=np.float32)
        b = np.asarray(reference[name], dtype=np.float32)
        if a.shape != b.shape:
            raise BackendError(f"{name}: engine output {a.shape} vs reference {b.shape}")
        diff = float(np.abs(a - b).max()) if a.size else 0.0
        agree = float((a.argmax(1) == b.argmax(1)).mean()) if a.size else 1.0
        per[name] = {"max_abs_diff": diff, "label_agreement": agree}
    return {"max_abs_diff": max(s["max_abs_diff"] for s in per.values()),
            "label_agreement": min(s["label_agreement"] for s in per.values()),
            "outputs": per}


def onnxruntime_reference(onnx_bytes: bytes, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The outputs of ``onnx_bytes`` on ``inputs`` with ONNX Runtime's CPU provider (the judge)."""
    import onnxruntime as ort

    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    outs = session.run(list(OUTPUT_NAMES), {k: inputs[k] for k in INPUT_NAMES})
    return dict(zip(OUTPUT_NAMES, outs))


def _initializer_names(onnx_bytes: bytes) -> list[str]:
    """The graph's weight names in order: what OnnxParserRefitter matches engine weights by."""
    import onnx

    return [init.name for init in onnx.load_model_from_string(onnx_bytes).graph.initializer]


# --------------------------------------------------------------------------------------------
# The engine holder and the backend
# --------------------------------------------------------------------------------------------

class _EngineMismatch(BackendError):
    """A deserialised engine's I/O names or shapes differ from what the header asks for."""


def _torch_dtype(trt: Any, dtype: Any) -> torch.dtype:
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32,
             trt.int8: torch.int8, trt.bool: torch.bool}
    for attr, tdt in (("bfloat16", torch.bfloat16), ("int64", torch.int64), ("uint8", torch.uint8)):
        if hasattr(trt, attr):
            table[getattr(trt, attr)] = tdt
    if dtype not in table:
        raise BackendError(f"unsupported engine I/O dtype {dtype}")
    return table[dtype]


class _Engine:
    """One engine with its own execution context, CUDA stream and torch CUDA I/O buffers.

    Swapped as one reference. ``lock`` serialises runs on this context (two threads must not
    fill the same input buffers or enqueue on one context at once).
    """

    def __init__(self, trt: Any, engine: Any, shapes: dict[str, tuple[int, ...]],
                 device: torch.device) -> None:
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        if sorted(names) != sorted(shapes):
            raise _EngineMismatch(f"engine tensors {names}, expected {sorted(shapes)}")
        for name in names:
            is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            if is_input != (name in INPUT_NAMES):
                raise _EngineMismatch(f"engine tensor {name} has the wrong direction")
            got = tuple(engine.get_tensor_shape(name))
            if got != tuple(shapes[name]):
                raise _EngineMismatch(f"engine tensor {name} has shape {got}, expected {tuple(shapes[name])}")
        self.device = device
        self.engine = engine
        self.context = engine.create_execution_context()
        if self.context is None:
            raise BackendError("TensorRT could not create an execution context (out of GPU memory?)")
        self.stream = torch.cuda.Stream(device=device)
        self.buffers: dict[str, torch.Tensor] = {}
        # Allocated on our stream, so the caching allocator ties the blocks to it.
        with torch.cuda.device(device), torch.cuda.stream(self.stream):
            for name in names:
                buf = torch.empty(shapes[name], dtype=_torch_dtype(trt, engine.get_tensor_dtype(name)),
                                  device=device)
                if not self.context.set_tensor_address(name, buf.data_ptr()):
                    raise BackendError(f"TensorRT rejected the buffer address of {name}")
                self.buffers[name] = buf
        self.stream.synchronize()
        self.lock = threading.Lock()

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Copy inputs in, execute on this holder's stream, wait, copy outputs out (float32)."""
        with self.lock, torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            for name in INPUT_NAMES:
                arr = np.ascontiguousarray(inputs[name])
                if not arr.flags.writeable:  # torch.from_numpy warns on read-only views (rosbags)
                    arr = arr.copy()
                self.buffers[name].copy_(torch.from_numpy(arr))
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise BackendError("TensorRT execute_async_v3 failed (see the TensorRT log)")
            outs = {name: self.buffers[name].float().to("cpu", non_blocking=False) for name in OUTPUT_NAMES}
            self.stream.synchronize()  # before the lock is released and the buffers reused
        return {name: t.numpy() for name, t in outs.items()}

    def __del__(self) -> None:
        # The context must go before its engine.
        try:
            del self.context
            del self.engine
        except AttributeError:
            pass


class TensorRTBackend(Backend):
    """TensorRT inference with cached engines and validated refit swaps (see module docstring).

    model:        the TwoStreamNet (any device; a CPU copy is kept as the template for swaps)
    header:       its checkpoint header (static input shapes, class count)
    precision:    "fp16" (default) or "fp32"
    cache_dir:    engine cache directory (default: ``default_cache_dir()``)
    device:       CUDA device (default: the current one)
    workspace_mb: TensorRT builder workspace limit (MiB)
    force_rebuild: rebuild the engine even if a valid cached one exists
    validate:     check the first engine and every refitted one against ONNX Runtime
    tolerance:    acceptance for that check (default: DEFAULT_TOLERANCES[precision])
    """

    name = "tensorrt"

    def __init__(self, model: torch.nn.Module, header: CheckpointHeader, precision: str = "fp16",
                 cache_dir: str | Path | None = None, *, device: int | str | torch.device | None = None,
                 workspace_mb: int = DEFAULT_WORKSPACE_MB, force_rebuild: bool = False,
                 validate: bool = True, tolerance: ValidationTolerance | None = None,
                 probe_seed: int = 0) -> None:
        _check_precision(precision)
        trt = import_tensorrt()  # fail fast, before the export, with the install hint
        require_cuda()
        super().__init__(header.input_shapes)
        self.header = header
        self.precision = precision
        self.device = _cuda_device(device)
        self.workspace_mb = workspace_mb
        self.validate = validate
        self.tolerance = tolerance or DEFAULT_TOLERANCES[precision]
        self.probe_seed = probe_seed
        self.tensorrt_version = str(trt.__version__)
        self.last_validation: dict[str, Any] | None = None
        self._template = copy.deepcopy(model).cpu().eval()

        onnx_bytes = export_onnx(self._template, header)
        spec = sidecar(header, onnx_bytes)
        self._shapes = {name: tuple(spec["inputs"][name]["shape"]) for name in INPUT_NAMES}
        self._shapes.update({name: tuple(spec["outputs"][name]["shape"]) for name in OUTPUT_NAMES})
        self._weight_names = _initializer_names(onnx_bytes)
        self._cache = EngineCache(cache_dir)
        self.key = engine_key(onnx_bytes, precision, self.device)
        self._runtime = trt.Runtime(_trt_logger())

        t0 = time.monotonic()
        plan, built = self._get_plan(onnx_bytes, force_rebuild)
        try:
            holder = self._holder(plan)
        except _EngineMismatch as exc:
            if built:
                raise
            # A cached plan that deserialises to the wrong I/O (or not at all): rebuild once.
            log.warning("cached engine %s unusable (%s); rebuilding", self.engine_path, exc)
            plan, built = self._get_plan(onnx_bytes, True)
            holder = self._holder(plan)
        self._plan = plan  # kept in memory: every swap deserialises a fresh engine from it
        self.cache_hit = not built
        self.load_s = time.monotonic() - t0
        if validate:
            self._validate(holder, onnx_bytes)
        self._engine = holder

    @property
    def engine_path(self) -> Path:
        """Where this backend's plan is cached."""
        return self._cache.path(self.key)

    def _get_plan(self, onnx_bytes: bytes, force: bool) -> tuple[bytes, bool]:
        def build() -> bytes:
            with torch.cuda.device(self.device):
                return build_engine(onnx_bytes, self.precision, refit=True,
                                    workspace_mb=self.workspace_mb)

        return self._cache.get_or_build(self.key, build, progress=log.info, force=force)

    def _deserialize(self, plan: bytes) -> Any:
        with torch.cuda.device(self.device):
            engine = self._runtime.deserialize_cuda_engine(plan)
        if engine is None:
            raise _EngineMismatch("TensorRT could not deserialise the plan (other TensorRT build or GPU?)")
        return engine

    def _holder(self, plan: bytes, engine: Any = None) -> _Engine:
        trt = import_tensorrt()
        engine = engine if engine is not None else self._deserialize(plan)
        return _Engine(trt, engine, self._shapes, self.device)

    def _validate(self, holder: _Engine, onnx_bytes: bytes) -> dict[str, Any]:
        """Run ``holder`` and ONNX Runtime (same ONNX) on the probe; BackendError if they disagree."""
        t0 = time.monotonic()
        probe = probe_inputs(self.input_shapes, self.probe_seed)
        stats = compare_outputs(holder.run(probe), onnxruntime_reference(onnx_bytes, probe))
        problems = self.tolerance.violations(stats)
        stats.update(passed=not problems, tolerance=asdict(self.tolerance),
                     ms=round((time.monotonic() - t0) * 1e3, 1))
        self.last_validation = stats
        if problems:
            raise BackendError(f"TensorRT {self.precision} engine disagrees with ONNX Runtime on the "
                               f"probe input ({'; '.join(problems)}); the engine is not used")
        return stats

    def _build_engine(self, state_dict: dict[str, torch.Tensor]) -> _Engine:
        """A second engine from the cached plan, refitted with ``state_dict`` and validated."""
        trt = import_tensorrt()
        onnx_bytes = export_onnx(self._template_with(state_dict), self.header)
        if _initializer_names(onnx_bytes) != self._weight_names:
            raise BackendError("the re-exported graph names its weights differently from the one the "
                               "engine was built from (another architecture or exporter?); cannot refit")
        logger = _trt_logger()
        engine = self._deserialize(self._plan)
        with torch.cuda.device(self.device):
            refitter = trt.Refitter(engine, logger)
            parser_refitter = trt.OnnxParserRefitter(refitter, logger)
            ok = parser_refitter.refit_from_bytes(onnx_bytes)
            errors = _parser_errors(parser_refitter)
            missing = list(refitter.get_missing_weights())
            if missing:
                raise BackendError(f"refit left {len(missing)} engine weights unset "
                                   f"(first: {missing[:5]}); keeping the old engine")
            if not ok:
                detail = "; ".join(errors) or "no error recorded"
                if not self.validate:
                    raise BackendError(f"TensorRT could not refit from the ONNX graph: {detail}")
                # Some TensorRT 10 releases report failure while every engine weight was set (an
                # ONNX weight with no engine slot, e.g. one folded away at build time). Nothing is
                # missing, so the validation against ONNX Runtime below decides.
                log.warning("OnnxParserRefitter reported failure (%s) but no engine weight is "
                            "missing; the validation decides", detail)
            if not refitter.refit_cuda_engine():
                raise BackendError("TensorRT refit_cuda_engine failed; keeping the old engine")
            del parser_refitter, refitter
        holder = self._holder(self._plan, engine)
        if self.validate:
            self._validate(holder, onnx_bytes)
        return holder

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.check_inputs(inputs)
        holder = self._engine  # read once: this run uses one engine from start to end
        return holder.run(inputs)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "precision": self.precision,
                "tensorrt_version": self.tensorrt_version, "gpu": self.key.gpu_name,
                "compute_capability": self.key.compute_capability, "device": str(self.device),
                "engine_path": str(self.engine_path), "engine_cache": "hit" if self.cache_hit else "miss",
                "load_s": round(self.load_s, 2), "last_validation": self.last_validation}


# --------------------------------------------------------------------------------------------
# Build-only entry point (`pl3d build-engine DIR --precision ...`)
# --------------------------------------------------------------------------------------------

def build_engine_from_export(export_dir: str | Path, precision: str = "fp16",
                             cache_dir: str | Path | None = None, *, force: bool = False,
                             workspace_mb: int = DEFAULT_WORKSPACE_MB) -> Path:
    """Build (or reuse) the cached engine for DIR/model.onnx; returns the engine's path.

    Checks first, without TensorRT, that DIR holds model.onnx and model.json and that the
    sidecar's onnx_sha256 is the ONNX file's, so a mixed-up export is refused with a clear error.
    """
    _check_precision(precision)
    export_dir = Path(export_dir)
    onnx_path, json_path = export_dir / "model.onnx", export_dir / "model.json"
    for p in (onnx_path, json_path):
        if not p.is_file():
            raise BackendError(f"{p} not found: expected the output of `pl3d export CKPT -o {export_dir}`")
    onnx_bytes = onnx_path.read_bytes()
    try:
        meta = json.loads(json_path.read_text(encoding="utf-8"))
        claimed = meta["onnx_sha256"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise BackendError(f"{json_path} is not a pl3d export sidecar: {exc!r}") from exc
    actual = hashlib.sha256(onnx_bytes).hexdigest()
    if claimed != actual:
        raise BackendError(f"{onnx_path.name} (sha256 {actual[:12]}...) is not the graph {json_path.name} "
                           f"describes (onnx_sha256 {str(claimed)[:12]}...): the files come from "
                           f"different exports; run `pl3d export` again")
    import_tensorrt()
    require_cuda()
    cache = EngineCache(cache_dir)
    key = engine_key(onnx_bytes, precision)
    _, built = cache.get_or_build(
        key, lambda: build_engine(onnx_bytes, precision, refit=True, workspace_mb=workspace_mb),
        progress=log.info, force=force)
    path = cache.path(key)
    if cache.load(key) is None:
        raise BackendError(f"the engine was built but could not be stored in {cache.dir} (see the log)")
    log.info("%s engine %s", "built" if built else "reusing cached", path)
    return path
