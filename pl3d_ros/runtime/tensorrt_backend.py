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
REFIT; FP16 has broken other segmenters' accuracy). The export is canonical (``export.py``), so
the re-exported graph has the engine's weight names whatever the values. A refit is accepted
only when every refittable engine weight was set from the new ONNX (:func:`refit_weights`). A
failed refit or validation raises ``BackendError``, the old engine stays, and ``describe()`` keeps
reporting the running engine (the rejection goes to ``last_rejected_swap``).

TensorRT's setup failures (CUDA initialisation, an unsupported GPU, a non-refittable engine)
come out of its pybind factories as ``TypeError: ... returned nullptr``; :func:`trt_create` turns
them into BackendError. TensorRT is checked to be built for torch's CUDA major (the pip extras
``trt-cu12`` / ``trt-cu13``; JetPack's system TensorRT on a Jetson), and that major is part of the
engine-cache key.

``tensorrt`` is imported lazily, so this module imports (and its pure helpers are tested) on
machines without TensorRT or a GPU.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
import os
import re
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

INSTALL_HINT = ("install the TensorRT build for torch's CUDA major on a machine with an NVIDIA GPU: "
                "pip install '.[trt-cu12]' or '.[trt-cu13]' (python -c 'import torch; "
                "print(torch.version.cuda)' says which); on a Jetson use JetPack's TensorRT "
                "(apt python3-libnvinfer, seen from a venv made with --system-site-packages); or "
                "use the onnxruntime / torch backend")
#: Set to 1 to use a TensorRT built for another CUDA major than torch (at your own risk: two
#: CUDA runtimes in one process, and the newer one's driver requirement).
ALLOW_CUDA_MISMATCH_ENV = "PL3D_TRT_ALLOW_CUDA_MISMATCH"


# --------------------------------------------------------------------------------------------
# Environment: TensorRT and CUDA
# --------------------------------------------------------------------------------------------

def import_tensorrt() -> Any:
    """The ``tensorrt`` module, or BackendError saying how to get it (also when it is built for
    another CUDA major than torch, see :func:`check_cuda_match`)."""
    major = torch_cuda_major()
    this = (f" (this torch is built for CUDA {torch.version.cuda}: '.[trt-cu{major}]')"
            if major else " (this torch is a CPU-only build)")
    try:
        import tensorrt as trt
    except ImportError as exc:  # also covers sys.modules["tensorrt"] = None
        raise BackendError(f"TensorRT is not installed ({exc}); {INSTALL_HINT}{this}") from exc
    except OSError as exc:  # a wheel whose CUDA libraries cannot be loaded
        raise BackendError(f"TensorRT cannot be loaded ({exc}); {INSTALL_HINT}{this}") from exc
    check_cuda_match(tensorrt_cuda_major(), torch_cuda_major())
    return trt


def trt_create(what: str, factory: Any, *args: Any, hint: str = "") -> Any:
    """``factory(*args)`` for a TensorRT object, with its failures as BackendError.

    TensorRT's pybind constructors (Builder, Runtime, Refitter, OnnxParser, ...) turn a null
    object from the C++ factory (CUDA initialisation failed, GPU not supported by this build,
    engine not refittable, out of memory) into ``TypeError: pybind11::init(): factory function
    returned nullptr``; methods such as ``create_execution_context`` return None instead.
    Callers that handle BackendError (the bench, the runner's fallback) would crash on the
    TypeError. The details are in TensorRT's log (logger 'pl3d_ros.tensorrt').
    """
    try:
        obj = factory(*args)
    except (TypeError, RuntimeError, MemoryError) as exc:
        raise BackendError(f"TensorRT could not create {what}: {type(exc).__name__}: {exc}"
                           + (f" ({hint})" if hint else "")
                           + "; TensorRT's messages are in the log (logger 'pl3d_ros.tensorrt')") from exc
    if obj is None:
        raise BackendError(f"TensorRT could not create {what}" + (f" ({hint})" if hint else "")
                           + "; TensorRT's messages are in the log (logger 'pl3d_ros.tensorrt')")
    return obj


#: Why creating a builder / runtime usually fails.
_SETUP_HINT = ("CUDA initialisation failed, the GPU is not supported by this TensorRT build, or "
               "TensorRT's CUDA needs a newer driver; check nvidia-smi and that TensorRT's CUDA "
               "major matches the driver's")


@functools.lru_cache(maxsize=1)
def tensorrt_cuda_major() -> str | None:
    """The CUDA major the installed ``tensorrt`` package is built for, e.g. "12", or None.

    NVIDIA's pip wheels say it in their distribution names only (tensorrt_cu12_bindings,
    tensorrt_cu13_libs, ...; TensorRT's python/packaging/tensorrt_build_backend names them so), so
    it is read from the distribution that provides the ``tensorrt`` package. None for a
    TensorRT not installed from those wheels (JetPack's system TensorRT, a local build), or when
    wheels of two CUDA majors are installed at once.
    """
    from importlib import metadata

    try:
        dists = metadata.packages_distributions().get("tensorrt", [])
    except Exception:  # a broken metadata entry elsewhere must not stop the backend
        return None
    majors = {m[1] for d in dists
              if (m := re.fullmatch(r"tensorrt[-_]cu(\d+)(?:[-_](?:bindings|libs))?", d.lower()))}
    return majors.pop() if len(majors) == 1 else None


def torch_cuda_major() -> str | None:
    """The CUDA major torch is built for ("12" for 12.8), None for a CPU-only torch."""
    version = getattr(torch.version, "cuda", None)
    return str(version).split(".")[0] if version else None


def check_cuda_match(trt_major: str | None, torch_major: str | None) -> None:
    """BackendError when TensorRT and torch are built for different CUDA majors.

    The usual way to get there: ``tensorrt>=10`` from pip now resolves to a CUDA 13 build
    (10.16 requires tensorrt_cu13, which needs driver R580+) while torch is a CUDA 12 build.
    Then TensorRT cannot start, or two CUDA runtimes share one process and its buffers. Unknown
    majors (JetPack's TensorRT, CPU torch) pass. :data:`ALLOW_CUDA_MISMATCH_ENV` = 1 lets a
    mismatch through with a warning.
    """
    if trt_major is None or torch_major is None or trt_major == torch_major:
        return
    msg = (f"TensorRT is built for CUDA {trt_major} but torch for CUDA {torch.version.cuda}: "
           f"install the matching build, pip install '.[trt-cu{torch_major}]' (it replaces "
           f"tensorrt-cu{trt_major}), or a torch for CUDA {trt_major}")
    if os.environ.get(ALLOW_CUDA_MISMATCH_ENV) == "1":
        log.warning("%s (%s=1: going on)", msg, ALLOW_CUDA_MISMATCH_ENV)
        return
    raise BackendError(f"{msg}; set {ALLOW_CUDA_MISMATCH_ENV}=1 to try anyway")


def cuda_major() -> str:
    """The CUDA major of the engine-cache key: TensorRT's (what its plans are built by), else
    torch's, else "unknown"."""
    return tensorrt_cuda_major() or torch_cuda_major() or "unknown"


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
    try:
        major, minor = torch.cuda.get_device_capability(_cuda_device(device))
    except (RuntimeError, AssertionError) as exc:  # CUDA initialisation errors surface here
        raise BackendError(f"cannot query the CUDA device {device}: {exc}") from exc
    return f"{major}.{minor}"


def engine_key(onnx_bytes: bytes, precision: str,
               device: int | str | torch.device | None = None) -> EngineKey:
    """The cache key of the engine for ``onnx_bytes`` at ``precision`` on this TensorRT (and its
    CUDA major) and GPU."""
    _check_precision(precision)
    trt = import_tensorrt()
    require_cuda()
    dev = _cuda_device(device)
    cc = gpu_compute_capability(dev)
    try:
        name = torch.cuda.get_device_name(dev)
    except (RuntimeError, AssertionError) as exc:
        raise BackendError(f"cannot query the CUDA device {dev}: {exc}") from exc
    return EngineKey.for_onnx(onnx_bytes, precision, str(trt.__version__), cc, name,
                              cuda_major=cuda_major())


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
    builder = trt_create("a builder", trt.Builder, logger, hint=_SETUP_HINT)
    # explicit batch is the only mode in TensorRT 10
    network = trt_create("a network definition", builder.create_network, 0)
    parser = trt_create("an ONNX parser", trt.OnnxParser, network, logger)
    if not parser.parse(onnx_bytes):
        errors = _parser_errors(parser) or ["(no error recorded)"]
        raise BackendError("TensorRT cannot parse the ONNX graph:\n  " + "\n  ".join(errors))

    config = trt_create("a builder config", builder.create_builder_config)
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


def _initializer_arrays(onnx_bytes: bytes) -> dict[str, np.ndarray]:
    """The graph's initializers as numpy arrays by name (what a refit sets the weights to)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load_model_from_string(onnx_bytes)
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def refit_weights(trt: Any, refitter: Any, parser_refitter: Any, onnx_bytes: bytes) -> dict[str, Any]:
    """Set every refittable weight of ``refitter``'s engine from ``onnx_bytes`` and refit it.

    TensorRT objects are passed in (``trt`` for ``trt.Weights``), so the logic is tested with
    fakes. ``OnnxParserRefitter.refit_from_bytes`` sets the weights by initializer name. When it
    reports failure it may have stopped part-way, and ``get_missing_weights`` lists only weights
    missing from a partly set combination, not weights never set at all: refitting then would
    leave those at their old values, and the ONNX Runtime probe afterwards can miss a stale bias
    within the fp16 tolerance. So on failure every name of ``get_all_weights()`` must be an
    initializer of the new ONNX (otherwise BackendError: nothing would set it), and each of them
    is set explicitly from it (``set_named_weights``); only then, with nothing missing, is the
    engine refitted. Accepted only when every engine weight name was set.

    Returns:
        {"parser_ok": bool, "parser_errors": [...], "set_explicitly": number of weights set by
        name after a parser failure, "weights": number of refittable engine weights}.

    Raises:
        BackendError: weights missing, engine weights the ONNX cannot provide, a weight TensorRT
            refuses, or ``refit_cuda_engine`` failing. The engine must then not be used.
    """
    ok = bool(parser_refitter.refit_from_bytes(onnx_bytes))
    errors = _parser_errors(parser_refitter)
    report: dict[str, Any] = {"parser_ok": ok, "parser_errors": errors, "set_explicitly": 0}
    names = [str(n) for n in refitter.get_all_weights()]
    report["weights"] = len(names)
    keep: list[Any] = []  # the arrays must outlive refit_cuda_engine
    if not ok:
        detail = "; ".join(errors) or "no error recorded"
        inits = _initializer_arrays(onnx_bytes)
        unset = [n or "<unnamed>" for n in names if n not in inits]
        if unset:
            raise BackendError(
                f"TensorRT could not refit from the ONNX graph ({detail}) and {len(unset)} of the "
                f"engine's {len(names)} refittable weights have no initializer in it (first: "
                f"{unset[:5]}): they would keep their old values; keeping the old engine")
        for name in names:
            arr = np.ascontiguousarray(inits[name])
            try:
                weights = trt.Weights(arr)
                accepted = refitter.set_named_weights(name, weights)
            except (TypeError, RuntimeError, ValueError) as exc:
                raise BackendError(f"TensorRT refuses weight {name!r} ({arr.dtype} {arr.shape}): "
                                   f"{exc}; keeping the old engine") from exc
            if not accepted:
                raise BackendError(f"TensorRT refuses weight {name!r} ({arr.dtype} {arr.shape}); "
                                   "keeping the old engine")
            keep.append((arr, weights))
        report["set_explicitly"] = len(names)
        log.warning("OnnxParserRefitter reported failure (%s); all %d engine weights were set by "
                    "name from the new ONNX instead", detail, len(names))
    missing = [str(n) or "<unnamed>" for n in refitter.get_missing_weights()]
    if missing:
        raise BackendError(f"refit left {len(missing)} engine weights unset "
                           f"(first: {missing[:5]}); keeping the old engine")
    if not refitter.refit_cuda_engine():
        raise BackendError("TensorRT refit_cuda_engine failed; keeping the old engine")
    del keep
    return report


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
        # What this engine's last check against ONNX Runtime found (None: not validated);
        # ``describe()`` reports the running holder's, so a rejected swap cannot overwrite it.
        self.validation: dict[str, Any] | None = None
        self.refit: dict[str, Any] | None = None
        # Under the engine's device: a context (its scratch memory) made while another device is
        # current lands there and fails at the first execute.
        with torch.cuda.device(device):
            self.context = trt_create("an execution context", engine.create_execution_context,
                                      hint="out of GPU memory?")
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

    def run_device(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``run`` without leaving the GPU: device-to-device copies in, float32 copies of the
        outputs back on the device (the buffers are reused by the next run)."""
        with self.lock, torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            # The inputs were made on the caller's stream: wait for them, not for the whole GPU.
            self.stream.wait_stream(torch.cuda.default_stream(self.device))
            for name in INPUT_NAMES:
                self.buffers[name].copy_(inputs[name].to(self.device))
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise BackendError("TensorRT execute_async_v3 failed (see the TensorRT log)")
            outs = {name: self.buffers[name].to(torch.float32, copy=True) for name in OUTPUT_NAMES}
            self.stream.synchronize()  # before the lock is released and the buffers reused
        return outs

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
        self.last_rejected_swap: dict[str, Any] | None = None
        self._template = copy.deepcopy(model).cpu().eval()

        onnx_bytes = export_onnx(self._template, header)
        spec = sidecar(header, onnx_bytes)
        self._shapes = {name: tuple(spec["inputs"][name]["shape"]) for name in INPUT_NAMES}
        self._shapes.update({name: tuple(spec["outputs"][name]["shape"]) for name in OUTPUT_NAMES})
        self._weight_names = _initializer_names(onnx_bytes)
        self._cache = EngineCache(cache_dir)
        self.key = engine_key(onnx_bytes, precision, self.device)
        with torch.cuda.device(self.device):
            self._runtime = trt_create("a runtime", trt.Runtime, _trt_logger(), hint=_SETUP_HINT)

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
            holder.validation = self._validate(holder, onnx_bytes)
        self._engine = holder

    @property
    def last_validation(self) -> dict[str, Any] | None:
        """The running engine's check against ONNX Runtime (a rejected swap's is in
        ``last_rejected_swap``)."""
        return self._engine.validation

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
        try:
            with torch.cuda.device(self.device):
                engine = self._runtime.deserialize_cuda_engine(plan)
        except (TypeError, RuntimeError) as exc:
            raise _EngineMismatch(f"TensorRT could not deserialise the plan: {exc}") from exc
        if engine is None:
            raise _EngineMismatch("TensorRT could not deserialise the plan (other TensorRT build or GPU?)")
        return engine

    def _holder(self, plan: bytes, engine: Any = None) -> _Engine:
        trt = import_tensorrt()
        engine = engine if engine is not None else self._deserialize(plan)
        return _Engine(trt, engine, self._shapes, self.device)

    def _validate(self, holder: _Engine, onnx_bytes: bytes) -> dict[str, Any]:
        """Run ``holder`` and ONNX Runtime (same ONNX) on the probe; returns the stats, or raises
        BackendError (carrying them as ``.validation``) if they disagree. Records nothing on
        the backend: the caller attaches the stats to the holder that goes live."""
        t0 = time.monotonic()
        probe = probe_inputs(self.input_shapes, self.probe_seed)
        stats = compare_outputs(holder.run(probe), onnxruntime_reference(onnx_bytes, probe))
        problems = self.tolerance.violations(stats)
        stats.update(passed=not problems, tolerance=asdict(self.tolerance),
                     ms=round((time.monotonic() - t0) * 1e3, 1))
        if problems:
            err = BackendError(f"TensorRT {self.precision} engine disagrees with ONNX Runtime on "
                               f"the probe input ({'; '.join(problems)}); the engine is not used")
            err.validation = stats
            raise err
        return stats

    def _build_engine(self, state_dict: dict[str, torch.Tensor]) -> _Engine:
        """A second engine from the cached plan, refitted with ``state_dict`` and validated.

        The running engine is never touched. Whatever fails is a BackendError; the reason (and
        a failed validation's stats) goes to ``last_rejected_swap``, never to what
        ``describe()`` says about the running engine.
        """
        try:
            return self._refitted(state_dict)
        except BackendError as exc:
            self.last_rejected_swap = {
                "time": time.time(), "error": str(exc),
                "validation": getattr(exc, "validation", None)}
            raise

    def _refitted(self, state_dict: dict[str, torch.Tensor]) -> _Engine:
        trt = import_tensorrt()
        onnx_bytes = export_onnx(self._template_with(state_dict), self.header)
        if _initializer_names(onnx_bytes) != self._weight_names:
            raise BackendError("the re-exported graph names its weights differently from the one the "
                               "engine was built from (another architecture or exporter?); cannot refit")
        logger = _trt_logger()
        engine = self._deserialize(self._plan)
        with torch.cuda.device(self.device):
            refitter = trt_create("a refitter", trt.Refitter, engine, logger,
                                  hint="is the engine built with BuilderFlag.REFIT? rebuild it "
                                       "with runtime.force_rebuild")
            parser_refitter = trt_create("an ONNX parser refitter", trt.OnnxParserRefitter,
                                         refitter, logger)
            report = refit_weights(trt, refitter, parser_refitter, onnx_bytes)
            del parser_refitter, refitter
        holder = self._holder(self._plan, engine)
        holder.refit = report
        if self.validate:
            holder.validation = self._validate(holder, onnx_bytes)
        return holder

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.check_inputs(inputs)
        holder = self._engine  # read once: this run uses one engine from start to end
        return holder.run(inputs)

    def run_device(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.check_inputs(inputs)
        return self._engine.run_device(inputs)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "precision": self.precision,
                "tensorrt_version": self.tensorrt_version, "gpu": self.key.gpu_name,
                "compute_capability": self.key.compute_capability, "device": str(self.device),
                "engine_path": str(self.engine_path), "engine_cache": "hit" if self.cache_hit else "miss",
                "cuda_major": self.key.cuda_major, "load_s": round(self.load_s, 2),
                "last_validation": self.last_validation, "last_refit": self._engine.refit,
                "last_rejected_swap": self.last_rejected_swap}


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
