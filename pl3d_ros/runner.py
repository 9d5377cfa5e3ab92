"""The node's engine without ROS: a latest-frame slot, the inference thread, the adapter hand-off,
the CPU budget between inference and adaptation, and the diagnostics report.

    producer (message_filters callback, a bag, a test)
        │ submit(frame): a depth-1 slot; a newer frame replaces a waiting one (counted as a drop)
        ▼
    inference thread: take the newest frame ─► segmenter.infer ─► output(frame, prediction)
        │                                                       ─► on_timing(FrameTiming)
        └─► adapter.offer(frame)   (non-blocking; the adapter runs its own thread)

Nothing here waits for the adapter, and nothing the output callback or the adapter raises stops
the inference thread: errors are logged (throttled) and counted in :class:`Health`.

CPU budget (:class:`ThreadBudget`). On a 2-core robot computer an adaptation step (teacher
forward, student forward + backward) takes every core torch gives it: inference then ran ~1.5x
slower (bench/runner_overhead.py, "naive"). The runner therefore owns the threads and splits the
CPU:

* the inference thread pins its own torch intra-op thread count (``inference_threads``) as its
  first act. With torch's OpenMP backend the count is per thread (an OpenMP ICV), and a thread
  takes torch's process-wide default only on its first parallel op, so the pin survives what
  happens later;
* the adapter is started after that, with torch's process-wide default set to ``adapt_threads``,
  so the threads ``adapter.start()`` creates begin with that many intra-op threads;
* ``adapter.start()`` runs on a short-lived launcher thread that first lowers its own priority by
  ``adapt_nice`` (Linux: the nice value is per thread, and new threads inherit their creator's),
  so the adaptation thread and the OpenMP workers it spawns are niced: the kernel gives the CPU to
  inference whenever both want it, and adaptation soaks up the idle time between frames;
* a niced thread that builds an ONNX Runtime session (a weight swap) would hand its nice value to
  the session's worker threads, which inference then runs on. So while adaptation is niced,
  ``segmenter.backend.swap_weights`` is routed through a runner-owned swap thread started at
  normal priority (an instance attribute shadows the method; the adapter calls it as before and
  blocks until the swap is done).

With the nice increment (the default), inference keeps every CPU (``runtime.threads`` 0): the
kernel already gives it precedence, and fewer inference threads would cost latency whenever
adaptation is idle. Without it, the adaptation threads' CPUs are left out of inference's share.

Bench: ``bench/runner_overhead.py`` measures inference latency with and without a concurrent
adapter under these settings. On a shared, overloaded 2-core VM: naive 1.48x p50 / 1.17x p90 of
the no-adapter latency, thread split alone 1.38x / 1.11x, thread split + nice 0.91x / 1.18x of
the same thread count without adapter, default (2 inference threads, adapter 1 thread at nice
+10) 0.95x / 0.81x; the price is adaptation throughput (0.15 -> 0.05 steps/s there).

The second half of the module holds the node's ROS-free helpers (parameter specs, QoS presets,
YAML comments, extrinsics cache, messages -> Frame, Prediction -> output arrays, building the
segmenter), so that ``node.py`` stays glue and all of its logic is tested without ROS.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import sys
import threading
import time
import typing
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import numpy as np

from pl3d_ros.config import Config, ConfigError
from pl3d_ros.frame import Frame, Prediction, check_rigid

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Diagnostic levels, numerically equal to diagnostic_msgs/DiagnosticStatus OK / WARN / ERROR.
OK, WARN, ERROR = 0, 1, 2


# --------------------------------------------------------------------------------------------------
# What the runner drives
# --------------------------------------------------------------------------------------------------

class SegmenterLike(Protocol):
    """``pipeline.Segmenter`` or anything with its ``infer``."""

    def infer(self, frame: Frame) -> Prediction: ...


class AdapterLike(Protocol):
    """The adaptation thread's interface (``adapt.adapter.Adapter``).

    ``offer`` must not block; ``start`` starts the adapter's own thread(s); ``stop`` joins them
    within ``timeout_s`` and says whether it managed; ``health`` is a flat dict (steps,
    frames_offered, frames_dropped, errors, last_error, weight_swaps, last_swap_time, restores,
    collapse_restores, pseudo-label density, ...).
    """

    def offer(self, frame: Frame) -> None: ...

    def start(self) -> None: ...

    def stop(self, timeout_s: float) -> bool: ...

    def health(self) -> dict[str, Any]: ...

    def reset(self) -> None: ...

    def save(self, path: str | Path | None = None) -> Any: ...


OutputCallback = Callable[[Frame, Prediction], None]


# --------------------------------------------------------------------------------------------------
# The latest-frame slot
# --------------------------------------------------------------------------------------------------

class LatestSlot(Generic[T]):
    """A mailbox of depth 1: ``put`` replaces a waiting item, ``take`` waits for one.

    A robot's sensors do not slow down for a busy consumer, so the only bounded and fresh policy
    is to keep the newest item: memory holds at most one waiting item, and the consumer always
    gets the newest one there is. Replaced items are counted (``replaced``).

    ``cond`` is the slot's lock; an owner may pass its own Condition so that its counters and the
    slot's change under one lock (see Runner: frames in = out + dropped + failed + pending +
    in flight holds at every instant).
    """

    def __init__(self, cond: threading.Condition | None = None) -> None:
        self.cond = cond or threading.Condition()
        self._item: T | None = None
        self._full = False
        self._closed = False
        self.puts = 0
        self.replaced = 0

    def put(self, item: T) -> bool:
        """Store ``item``; True if it replaced a waiting one (that one is dropped)."""
        with self.cond:
            replaced = self._full
            self._item, self._full = item, True
            self.puts += 1
            self.replaced += int(replaced)
            self.cond.notify()
        return replaced

    def take(self, timeout: float | None = None,
             on_take: Callable[[], None] | None = None) -> T | None:
        """The waiting item (removing it), or None after ``timeout`` seconds or once closed (a
        closed slot keeps its waiting item: it stays counted as pending).

        ``on_take`` runs under the lock when an item is handed out.
        """
        with self.cond:
            if not self._full and not self._closed:
                self.cond.wait_for(lambda: self._full or self._closed, timeout)
            if not self._full or self._closed:
                return None
            item, self._item, self._full = self._item, None, False
            if on_take is not None:
                on_take()
            return item

    def close(self) -> None:
        """Wake every waiter; from now on ``take`` returns None at once."""
        with self.cond:
            self._closed = True
            self.cond.notify_all()

    @property
    def pending(self) -> int:
        """1 if an item waits, else 0."""
        with self.cond:
            return int(self._full)

    @property
    def pending_locked(self) -> int:
        """``pending`` for a caller that already holds ``cond``."""
        return int(self._full)


# --------------------------------------------------------------------------------------------------
# CPU budget
# --------------------------------------------------------------------------------------------------

def available_cpus() -> int:
    """CPUs this process may run on (the affinity mask honours cgroup cpusets and taskset)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class ThreadBudget:
    """How the runner splits the CPU between inference and adaptation (module docstring).

    inference_threads: torch intra-op threads of the inference thread (pre/postprocessing and the
        torch backend; the ONNX Runtime backend takes the same number for its session); 0 leaves
        torch's setting alone.
    adapt_threads: torch intra-op threads of the threads ``adapter.start()`` creates; 0 leaves
        torch's setting alone.
    adapt_nice: nice increment of those threads (Linux); 0 keeps them at the caller's priority.
    """

    inference_threads: int = 0
    adapt_threads: int = 0
    adapt_nice: int = 0

    @classmethod
    def from_config(cls, cfg: Config, adapting: bool, cpus: int | None = None) -> ThreadBudget:
        """``runtime.threads``, ``runtime.adapt_threads`` and ``runtime.adapt_nice``.

        ``runtime.threads`` 0 means every CPU for inference. While adapting without a nice
        increment, the adaptation threads' CPUs are left out instead: then nothing but the thread
        split keeps adaptation from slowing inference. With the nice increment (the default) the
        kernel does that, and inference keeps all CPUs, which is faster whenever adaptation is
        idle (bench/runner_overhead.py compares both).
        """
        rt = cfg.runtime
        cpus = cpus or available_cpus()
        if not adapting:
            return cls(rt.threads or cpus, 0, 0)
        auto = cpus if rt.adapt_nice > 0 else max(1, cpus - rt.adapt_threads)
        return cls(rt.threads or auto, rt.adapt_threads, rt.adapt_nice)


def lower_thread_priority(increment: int) -> bool:
    """Raise the calling thread's nice value by ``increment`` (max 19). True if it was applied.

    Linux keeps the nice value per thread (setpriority on a thread id), and threads inherit it
    from the thread that creates them. Elsewhere this does nothing and returns False.
    """
    if increment <= 0 or not sys.platform.startswith("linux") or not hasattr(os, "setpriority"):
        return False
    tid = threading.get_native_id()
    try:
        current = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, min(19, current + increment))
    except OSError as exc:
        log.warning("cannot lower the adaptation thread's priority: %s", exc)
        return False
    return True


def thread_nice() -> int | None:
    """The calling thread's nice value (Linux), else None."""
    if not sys.platform.startswith("linux"):
        return None
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


class SwapThread:
    """Runs a backend's ``swap_weights`` on a thread started by the runner at normal priority.

    Installed as an instance attribute, so ``backend.swap_weights(state)`` called from the
    (niced) adaptation thread blocks until this thread has built and swapped the new engine:
    threads that engine creates (ONNX Runtime's intra-op pool) inherit normal priority.
    """

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self._original = backend.swap_weights
        self._queue: deque[tuple[Any, Future]] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="pl3d-swap", daemon=True)
        self._thread.start()  # now, from the caller: not lazily from the niced adapter thread
        backend.swap_weights = self.swap_weights

    def swap_weights(self, state_dict: Any) -> None:
        if threading.current_thread() is self._thread:
            return self._original(state_dict)
        fut: Future = Future()
        with self._cond:
            if self._closed:
                return self._original(state_dict)
            self._queue.append((state_dict, fut))
            self._cond.notify()
        return fut.result()

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._closed)
                if not self._queue:
                    return
                state_dict, fut = self._queue.popleft()
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(self._original(state_dict))
                except BaseException as exc:  # handed to the caller, who decides
                    fut.set_exception(exc)

    def close(self, timeout_s: float = 1.0) -> None:
        """Restore the backend's own method; finish queued swaps; join (bounded)."""
        if self.backend.__dict__.get("swap_weights") == self.swap_weights:
            del self.backend.swap_weights
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout_s)


# --------------------------------------------------------------------------------------------------
# Health (the diagnostics report)
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FrameTiming:
    """Timings of one processed frame, handed to ``on_timing`` (the node's debug topics).

    stages_ms: the segmenter's stages (preprocess, inference, postprocess), ``output`` (the
        output callback) and ``total`` (infer + output, measured by the runner).
    pipeline_latency_ms: stamp clock now minus the frame's stamp, None without a stamp clock.
    cyclic_ms: time since the previous frame finished, None for the first.
    """

    stamp_ns: int
    stages_ms: dict[str, float]
    pipeline_latency_ms: float | None
    cyclic_ms: float | None


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 1e6 else f"{value:.6g}"
    return str(value)


@dataclass(frozen=True)
class Health:
    """A consistent snapshot of the runner (every count read under one lock).

    frames_in = frames_out + frames_dropped + frames_failed + pending + in_flight, always.
    Processing time is infer + output callback of one frame (ms); mean and p90 over the last
    ``stats_window`` frames. ``consecutive_delay_ms`` spans the current run of over-budget frames:
    from the start of its first frame to the end of its latest (to now while a frame is still in
    inference past the budget, so a hung inference shows); 0 once a frame is within budget.
    ``adaptation`` is the adapter's own health dict (None: no adapter).
    """

    running: bool
    frames_in: int
    frames_out: int
    frames_dropped: int
    frames_failed: int
    pending: int
    in_flight: int
    output_errors: int
    last_error: str | None
    processing_ms_last: float | None
    processing_ms_mean: float | None
    processing_ms_p90: float | None
    stages_ms_last: dict[str, float]
    budget_ms: float
    max_consecutive_delay_ms: float
    frames_over_budget: int
    consecutive_over_budget: int
    consecutive_delay_ms: float
    pipeline_latency_ms_last: float | None
    cyclic_time_ms_last: float | None
    cyclic_time_ms_mean: float | None
    adapter_offer_errors: int
    adapter_error: str | None
    adaptation: dict[str, Any] | None

    @property
    def accounted(self) -> bool:
        """Every frame that came in is out, dropped, failed, waiting or being processed."""
        return self.frames_in == (self.frames_out + self.frames_dropped + self.frames_failed
                                  + self.pending + self.in_flight)

    def processing_status(self) -> tuple[int, str]:
        """(level, message) as Autoware's nodes report processing time."""
        if self.consecutive_delay_ms > self.max_consecutive_delay_ms:
            return ERROR, (f"processing over the {self.budget_ms:g} ms budget for "
                           f"{self.consecutive_delay_ms:.0f} ms ({self.consecutive_over_budget} "
                           f"frames in a row; limit {self.max_consecutive_delay_ms:g} ms)")
        if self.processing_ms_last is not None and self.processing_ms_last > self.budget_ms:
            return WARN, (f"processing time {self.processing_ms_last:.1f} ms exceeds the "
                          f"{self.budget_ms:g} ms budget")
        if not self.running:
            return WARN, "inference thread not running"
        if self.processing_ms_last is None:
            return OK, "waiting for frames"
        return OK, f"processing {self.processing_ms_last:.1f} ms (budget {self.budget_ms:g} ms)"

    def adaptation_status(self) -> tuple[int, str]:
        """(level, message) of the adaptation thread."""
        if self.adapter_error:
            return ERROR, f"adaptation failed: {self.adapter_error}"
        if self.adaptation is None:
            return OK, "adaptation off"
        a = self.adaptation
        if a.get("running") is False and self.running:
            return ERROR, "adaptation thread is not running"
        errors = int(a.get("errors", 0) or 0) + self.adapter_offer_errors
        if errors:
            last = a.get("last_error") or "see the log"
            return WARN, f"{errors} adaptation error(s); last: {last}"
        steps = a.get("steps", 0)
        return OK, f"{steps} adaptation steps, {a.get('weight_swaps', 0)} weight swaps"

    def processing_values(self) -> dict[str, str]:
        """Key/value strings for the processing-time diagnostic."""
        keys = ("frames_in", "frames_out", "frames_dropped", "frames_failed", "pending", "in_flight",
                "output_errors", "processing_ms_last", "processing_ms_mean", "processing_ms_p90",
                "budget_ms", "frames_over_budget", "consecutive_over_budget", "consecutive_delay_ms",
                "pipeline_latency_ms_last", "cyclic_time_ms_last", "cyclic_time_ms_mean",
                "last_error")
        out = {k: _fmt(getattr(self, k)) for k in keys}
        out.update({f"stage_{k}_ms": _fmt(v) for k, v in self.stages_ms_last.items()})
        return out

    def adaptation_values(self) -> dict[str, str]:
        """Key/value strings for the adaptation diagnostic (the adapter's health, verbatim)."""
        out = {k: _fmt(v) for k, v in (self.adaptation or {}).items()}
        swap_time = (self.adaptation or {}).get("last_swap_time")
        if isinstance(swap_time, (int, float)):  # wall-clock seconds: show its age too
            out["last_swap_age_s"] = _fmt(max(0.0, time.time() - float(swap_time)))
        out["offer_errors"] = str(self.adapter_offer_errors)
        if self.adapter_error:
            out["adapter_error"] = self.adapter_error
        return out

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "accounted": self.accounted}


# --------------------------------------------------------------------------------------------------
# The runner
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RunnerSettings:
    """budget_ms / max_consecutive_delay_ms: Autoware's max_allowed_processing_time_ms and
    max_acceptable_consecutive_delay_ms; stats_window: frames behind mean / p90; stop_timeout_s:
    default bound of ``stop``; poll_s: how often an idle inference thread checks for stop."""

    budget_ms: float = 100.0
    max_consecutive_delay_ms: float = 1000.0
    stats_window: int = 100
    stop_timeout_s: float = 5.0
    threads: ThreadBudget = field(default_factory=ThreadBudget)
    poll_s: float = 0.1

    @classmethod
    def from_config(cls, cfg: Config, adapting: bool) -> RunnerSettings:
        n = cfg.node
        return cls(n.max_allowed_processing_time_ms, n.max_acceptable_consecutive_delay_ms,
                   n.stats_window, n.stop_timeout_s, ThreadBudget.from_config(cfg, adapting))


class _Throttle:
    """Log an error the first time, then at most once per ``period_s`` per key (with a count)."""

    def __init__(self, period_s: float = 5.0) -> None:
        self.period_s = period_s
        self._last: dict[str, float] = {}
        self._count: dict[str, int] = {}

    def __call__(self, key: str, msg: str, exc: BaseException) -> None:
        self._count[key] = self._count.get(key, 0) + 1
        now = time.monotonic()
        if now - self._last.get(key, -1e18) >= self.period_s:
            first = key not in self._last
            self._last[key] = now
            log.error("%s (%d so far): %s: %s", msg, self._count[key], type(exc).__name__, exc,
                      exc_info=exc if first else None)


class Runner:
    """Latest-frame slot + inference thread + adapter hand-off (module docstring).

    Args:
        segmenter: anything with ``infer(frame) -> Prediction``.
        output: called on the inference thread with every (frame, prediction); exceptions are
            logged and counted, never fatal.
        adapter: optional; offered every processed frame; started and stopped with the runner.
        settings: budget, stats window, stop bound, thread budget.
        on_timing: called after ``output`` with the frame's :class:`FrameTiming` (debug topics).
        stamp_clock: nanoseconds on the clock of the frame stamps (the node passes its ROS clock,
            which follows /clock under use_sim_time); None: no pipeline latency.
        clock: monotonic seconds for durations (tests inject a fake one).
    """

    def __init__(self, segmenter: SegmenterLike, output: OutputCallback | None = None,
                 adapter: AdapterLike | None = None, *, settings: RunnerSettings | None = None,
                 on_timing: Callable[[FrameTiming], None] | None = None,
                 stamp_clock: Callable[[], int] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.segmenter = segmenter
        self.output = output
        self.adapter = adapter
        self.settings = settings or RunnerSettings()
        self.on_timing = on_timing
        self.stamp_clock = stamp_clock
        self.clock = clock
        self._slot: LatestSlot[Frame] = LatestSlot()
        self._lock = self._slot.cond  # one lock for the slot and every counter below
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._swap: SwapThread | None = None
        self._restore_threads: int | None = None
        self._throttle = _Throttle()
        self._adapter_started = False
        # counters and statistics (under self._lock)
        self._in_flight = 0
        self._current_start: float | None = None
        self._out = 0
        self._failed = 0
        self._output_errors = 0
        self._offer_errors = 0
        self._last_error: str | None = None
        self._adapter_error: str | None = None
        self._proc: deque[float] = deque(maxlen=self.settings.stats_window)
        self._cyclic: deque[float] = deque(maxlen=self.settings.stats_window)
        self._stages_last: dict[str, float] = {}
        self._over_budget = 0
        self._consecutive_over = 0
        self._over_since: float | None = None  # start of the first frame of the over-budget run
        self._over_end: float | None = None  # end of its latest frame
        self._latency_last: float | None = None
        self._last_done: float | None = None

    # -- producer side ----------------------------------------------------------------------------

    def submit(self, frame: Frame) -> bool:
        """Hand a frame to the inference thread; True if it replaced (dropped) a waiting one."""
        return self._slot.put(frame)

    # -- lifecycle --------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stop.is_set()

    def start(self) -> None:
        """Start the inference thread, then the adapter (niced, thread-limited; see ThreadBudget)."""
        if self._thread is not None:
            raise RuntimeError("runner already started (a runner starts once)")
        self._thread = threading.Thread(target=self._loop, name="pl3d-inference", daemon=True)
        self._thread.start()
        if not self._ready.wait(10.0):
            log.warning("inference thread slow to start")
        if self.adapter is not None:
            self._start_adapter()

    def _start_adapter(self) -> None:
        import torch

        budget = self.settings.threads
        backend = getattr(self.segmenter, "backend", None)
        if budget.adapt_nice > 0 and callable(getattr(backend, "swap_weights", None)):
            self._swap = SwapThread(backend)
        if budget.adapt_threads > 0:
            # New threads take torch's process-wide count on their first parallel op; the
            # inference thread has pinned its own already. Restored in stop().
            self._restore_threads = torch.get_num_threads()
            torch.set_num_threads(budget.adapt_threads)
        errors: list[BaseException] = []

        def launch() -> None:
            lower_thread_priority(budget.adapt_nice)  # inherited by the threads start() creates
            try:
                self.adapter.start()
            except BaseException as exc:  # reported below on the caller's thread
                errors.append(exc)

        launcher = threading.Thread(target=launch, name="pl3d-adapt-launcher", daemon=True)
        launcher.start()
        launcher.join()
        if errors:
            # Labeling goes on without adaptation: the robot needs the labels more than the tuning.
            exc = errors[0]
            with self._lock:
                self._adapter_error = f"start failed: {type(exc).__name__}: {exc}"
            log.error("adapter failed to start; continuing without adaptation: %s", exc,
                      exc_info=exc)
        else:
            self._adapter_started = True

    def stop(self, timeout_s: float | None = None) -> bool:
        """Stop the inference thread and the adapter, within ``timeout_s`` in total.

        Returns True if every thread finished in time (threads are daemons, so a stuck one does
        not keep the process alive). A waiting frame stays counted as pending.
        """
        timeout_s = self.settings.stop_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s  # real time, even with a fake duration clock
        self._stop.set()
        self._slot.close()
        ok = True
        if self._thread is not None:
            self._thread.join(max(0.0, deadline - time.monotonic()))
            ok = not self._thread.is_alive()
            if not ok:
                log.warning("inference thread did not stop within %.1f s", timeout_s)
        if self.adapter is not None and self._adapter_started:
            self._adapter_started = False
            try:
                ok = bool(self.adapter.stop(max(0.0, deadline - time.monotonic()))) and ok
            except Exception as exc:
                log.error("adapter stop failed: %s", exc, exc_info=exc)
                ok = False
        if self._swap is not None:
            self._swap.close(max(0.0, deadline - time.monotonic()))
            self._swap = None
        if self._restore_threads is not None:
            import torch

            torch.set_num_threads(self._restore_threads)
            self._restore_threads = None
        return ok

    # -- adapter services ---------------------------------------------------------------------------

    def reset_adaptation(self) -> None:
        """Back to the source model (the ~/reset_adaptation service)."""
        if self.adapter is None:
            raise RuntimeError("adaptation is off (adapt.method is source, or no adapter)")
        self.adapter.reset()

    def save_adaptation(self, path: str | Path | None = None) -> Any:
        """Checkpoint the adapted model (the ~/save_checkpoint service); None: the adapter's
        default (adapt.checkpoint_path)."""
        if self.adapter is None:
            raise RuntimeError("adaptation is off (adapt.method is source, or no adapter)")
        return self.adapter.save(path) if path else self.adapter.save()

    # -- the inference thread ------------------------------------------------------------------------

    def _pin_threads(self) -> None:
        n = self.settings.threads.inference_threads
        if n > 0:
            import torch

            torch.get_num_threads()  # lazy per-thread init first, so it cannot undo the pin later
            torch.set_num_threads(n)

    def _loop(self) -> None:
        try:
            self._pin_threads()
        finally:
            self._ready.set()
        while not self._stop.is_set():
            frame = self._slot.take(self.settings.poll_s, self._mark_taken)
            if frame is None:
                continue
            self._process(frame)
            del frame  # no reference outlives its processing: memory stays bounded

    def _mark_taken(self) -> None:  # under the lock, atomically with the slot hand-out
        self._in_flight = 1
        self._current_start = self.clock()

    def _process(self, frame: Frame) -> None:
        t0 = self._current_start if self._current_start is not None else self.clock()
        try:
            pred = self.segmenter.infer(frame)
        except Exception as exc:
            self._throttle("infer", "inference failed", exc)
            with self._lock:
                self._in_flight = 0
                self._failed += 1
                self._last_error = f"inference: {type(exc).__name__}: {exc}"
                self._current_start = None
            return
        t1 = self.clock()
        output_error = None
        if self.output is not None:
            try:
                self.output(frame, pred)
            except Exception as exc:
                output_error = exc
                self._throttle("output", "output callback failed", exc)
        t2 = self.clock()
        latency = None
        if self.stamp_clock is not None:
            try:
                latency = (int(self.stamp_clock()) - frame.stamp_ns) * 1e-6
            except Exception as exc:
                self._throttle("stamp_clock", "stamp clock failed", exc)
        total = (t2 - t0) * 1e3
        stages = {k: float(v) for k, v in pred.timings_ms.items() if k != "total"}
        stages.update(output=(t2 - t1) * 1e3, total=total)
        budget = self.settings.budget_ms
        with self._lock:
            self._in_flight = 0
            self._current_start = None
            self._out += 1
            if output_error is not None:
                self._output_errors += 1
                self._last_error = f"output: {type(output_error).__name__}: {output_error}"
            self._proc.append(total)
            self._stages_last = stages
            if total > budget:
                self._over_budget += 1
                self._consecutive_over += 1
                if self._over_since is None:
                    self._over_since = t0
                self._over_end = t2
            else:
                self._consecutive_over = 0
                self._over_since = self._over_end = None
            cyclic = None if self._last_done is None else (t2 - self._last_done) * 1e3
            if cyclic is not None:
                self._cyclic.append(cyclic)
            self._last_done = t2
            self._latency_last = latency
        if self.on_timing is not None:
            try:
                self.on_timing(FrameTiming(frame.stamp_ns, stages, latency, cyclic))
            except Exception as exc:
                self._throttle("on_timing", "timing callback failed", exc)
        if self.adapter is not None and self._adapter_started:
            try:
                self.adapter.offer(frame)
            except Exception as exc:
                self._throttle("offer", "adapter.offer failed", exc)
                with self._lock:
                    self._offer_errors += 1

    # -- diagnostics ------------------------------------------------------------------------------

    def health(self) -> Health:
        """A consistent snapshot, with the adapter's health merged in."""
        adaptation: dict[str, Any] | None = None
        adapter_error = None
        if self.adapter is not None:
            try:
                adaptation = dict(self.adapter.health())
            except Exception as exc:  # a broken adapter must not break the diagnostics
                adapter_error = f"health(): {type(exc).__name__}: {exc}"
        now = self.clock()
        with self._lock:
            proc = np.fromiter(self._proc, dtype=np.float64)
            cyc = np.fromiter(self._cyclic, dtype=np.float64)
            budget = self.settings.budget_ms
            since, end = self._over_since, self._over_end
            if self._current_start is not None and (now - self._current_start) * 1e3 > budget:
                # A frame stuck in inference is over budget too, and the run goes on until now.
                since = self._current_start if since is None else since
                end = now
            return Health(
                running=self.running,
                frames_in=self._slot.puts,
                frames_out=self._out,
                frames_dropped=self._slot.replaced,
                frames_failed=self._failed,
                pending=self._slot.pending_locked,
                in_flight=self._in_flight,
                output_errors=self._output_errors,
                last_error=self._last_error,
                processing_ms_last=float(proc[-1]) if proc.size else None,
                processing_ms_mean=float(proc.mean()) if proc.size else None,
                processing_ms_p90=float(np.percentile(proc, 90)) if proc.size else None,
                stages_ms_last=dict(self._stages_last),
                budget_ms=budget,
                max_consecutive_delay_ms=self.settings.max_consecutive_delay_ms,
                frames_over_budget=self._over_budget,
                consecutive_over_budget=self._consecutive_over,
                consecutive_delay_ms=0.0 if since is None else max(0.0, (end - since) * 1e3),
                pipeline_latency_ms_last=self._latency_last,
                cyclic_time_ms_last=float(cyc[-1]) if cyc.size else None,
                cyclic_time_ms_mean=float(cyc.mean()) if cyc.size else None,
                adapter_offer_errors=self._offer_errors,
                adapter_error=self._adapter_error or adapter_error,
                adaptation=adaptation,
            )


# ==================================================================================================
# ROS-free helpers of node.py
# ==================================================================================================

#: rclpy Parameter.Type member names by Python type of a setting.
_ROS_SCALAR_TYPES = {bool: "BOOL", int: "INTEGER", float: "DOUBLE", str: "STRING"}


@dataclass(frozen=True)
class ParameterSpec:
    """One ROS parameter of the node: a leaf of the Config tree.

    type_name is the rclpy ``Parameter.Type`` member (BOOL, INTEGER, DOUBLE, STRING,
    BOOL_ARRAY, INTEGER_ARRAY, DOUBLE_ARRAY, STRING_ARRAY), taken from the dataclass annotation
    so that an empty list default still gets its element type.
    """

    name: str
    default: Any
    type_name: str
    description: str = ""

    @property
    def ros_default(self) -> Any:
        """The default as the declared ROS type wants it (rclpy infers the type from the value:
        an int in a DOUBLE setting would make it INTEGER)."""
        if self.type_name == "DOUBLE":
            return float(self.default)
        if self.type_name == "DOUBLE_ARRAY":
            return [float(v) for v in self.default]
        return list(self.default) if isinstance(self.default, list) else self.default

    @property
    def declare_by_type(self) -> bool:
        """True for an empty-list default: rclpy would infer BYTE_ARRAY from ``[]``, so declare
        the parameter by type (it stays unset unless overridden, and reads back as None)."""
        return isinstance(self.default, list) and not self.default


def _ros_type(annotation: Any, default: Any, name: str) -> str:
    if isinstance(default, list):
        args = typing.get_args(annotation)
        elem = args[0] if args else (type(default[0]) if default else None)
        if elem not in _ROS_SCALAR_TYPES:
            raise TypeError(f"setting {name}: cannot map list element type {elem!r} to ROS")
        return _ROS_SCALAR_TYPES[elem] + "_ARRAY"
    for py_type in (bool, int, float, str):  # bool before int: bool is an int subclass
        if isinstance(default, py_type):
            return _ROS_SCALAR_TYPES[py_type]
    raise TypeError(f"setting {name}: no ROS parameter type for {type(default).__name__}")


def parameter_specs(cfg: Config | None = None,
                    descriptions: Mapping[str, str] | None = None) -> list[ParameterSpec]:
    """Every leaf of the Config tree as a ParameterSpec, in ``Config.flat()`` order.

    ``cfg`` gives the defaults (default: ``Config()``); ``descriptions`` maps dotted names to
    one-line descriptions (the node takes them from the installed config/pl3d.yaml comments, see
    :func:`read_yaml_comments`).
    """
    cfg = cfg if cfg is not None else Config()
    descriptions = descriptions or {}
    specs: list[ParameterSpec] = []

    def walk(prefix: str, obj: Any) -> None:
        hints = typing.get_type_hints(type(obj))
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            name = prefix + f.name
            if dataclasses.is_dataclass(value):
                walk(name + ".", value)
            else:
                default = list(value) if isinstance(value, list) else value
                specs.append(ParameterSpec(name, default, _ros_type(hints.get(f.name), value, name),
                                           descriptions.get(name, "")))

    walk("", cfg)
    return specs


def flat_from_parameters(values: Mapping[str, Any], specs: Sequence[ParameterSpec]) -> dict[str, Any]:
    """Parameter values as read back from ROS -> a flat dict for ``Config.from_flat``.

    None (an unset parameter: declared by type, or an empty ``[]`` override, which the ROS YAML
    parser cannot type) becomes the default; arrays (``array.array``, tuples) become lists.
    """
    out: dict[str, Any] = {}
    for spec in specs:
        value = values.get(spec.name)
        if value is None:
            value = list(spec.default) if isinstance(spec.default, list) else spec.default
        elif spec.type_name.endswith("_ARRAY") and not isinstance(value, list):
            value = list(value)
        out[spec.name] = value
    return out


def config_from_parameters(values: Mapping[str, Any],
                           specs: Sequence[ParameterSpec] | None = None) -> Config:
    """Validated Config from ROS parameter values (ConfigError names the bad setting)."""
    return Config.from_flat(flat_from_parameters(values, specs or parameter_specs()))


def qos_settings(preset: str, depth: int) -> dict[str, Any]:
    """A QoS preset name (``qos.input`` / ``qos.output``) -> plain settings for rclpy's QoSProfile.

    sensor_data is ROS's rmw_qos_profile_sensor_data (BEST_EFFORT, VOLATILE, KEEP_LAST); a
    RELIABLE subscriber receives nothing from a BEST_EFFORT publisher, so inputs default to it.
    """
    from pl3d_ros.config import QOS_PRESETS

    if preset not in QOS_PRESETS:
        raise ConfigError(f"unknown QoS preset {preset!r}; choose from {QOS_PRESETS}")
    if depth <= 0:
        raise ConfigError(f"QoS depth must be positive, got {depth}")
    return {"reliability": "reliable" if preset == "reliable" else "best_effort",
            "durability": "volatile", "history": "keep_last", "depth": int(depth)}


_YAML_KEY = re.compile(r"^(\s*)([A-Za-z_][\w.]*)\s*:(.*)$")


def _split_comment(text: str) -> tuple[str, str]:
    """'value  # comment' -> (value, comment), ignoring '#' inside quotes."""
    quote = None
    for i, ch in enumerate(text):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or text[i - 1].isspace()):
            return text[:i].strip(), text[i + 1:].strip()
    return text.strip(), ""


def read_yaml_comments(path: str | Path) -> dict[str, str]:
    """Dotted setting name -> its comment in a YAML settings file (nested or ROS params form).

    A leaf's comment is the one at the end of its line, else the comment lines right above it.
    The ``node_name: ros__parameters:`` prefix is dropped from the names.
    """
    stack: list[tuple[int, str]] = []
    above: list[str] = []
    out: dict[str, str] = {}
    for raw in Path(path).read_text().splitlines():
        stripped = raw.strip()
        if not stripped:
            above = []
            continue
        if stripped.startswith("#"):
            above.append(stripped.lstrip("#").strip())
            continue
        m = _YAML_KEY.match(raw)
        if not m:
            above = []
            continue
        indent, key = len(m.group(1)), m.group(2)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, key))
        value, comment = _split_comment(m.group(3))
        if value:
            names = [k for _, k in stack]
            if len(names) > 2 and names[1] == "ros__parameters":
                names = names[2:]
            out[".".join(names)] = comment or " ".join(above)
        above = []
    return out


class Extrinsics:
    """T_cam_lidar: the static-extrinsics setting, or tf2 lookups cached per frame pair.

    The node asks ``get`` on every synced set; a pair not known yet is remembered in ``wanted``,
    which a timer looks up in tf2 (never inside a message callback: a blocking lookup there can
    deadlock a single-threaded executor) and stores with ``store``. A camera-LiDAR mount is rigid,
    so a found transform is kept.
    """

    def __init__(self, static: Sequence[float] = (), camera_frame: str = "",
                 lidar_frame: str = "") -> None:
        self.static = (check_rigid(np.asarray(static, np.float64).reshape(4, 4), "static extrinsics")
                       if len(static) else None)
        self.camera_frame = camera_frame
        self.lidar_frame = lidar_frame
        self._lock = threading.Lock()
        self._known: dict[tuple[str, str], np.ndarray] = {}
        self._wanted: set[tuple[str, str]] = set()

    @classmethod
    def from_config(cls, cfg: Config) -> Extrinsics:
        f = cfg.frames
        return cls(f.static_extrinsics, f.camera_frame, f.lidar_frame)

    def frames(self, camera_header_frame: str, lidar_header_frame: str) -> tuple[str, str]:
        """(camera, lidar) frame names: the settings where given, else the headers'."""
        return (self.camera_frame or camera_header_frame, self.lidar_frame or lidar_header_frame)

    def get(self, camera: str, lidar: str) -> np.ndarray | None:
        """T_cam_lidar, or None while it is not known (the pair is then wanted)."""
        if self.static is not None:
            return self.static
        with self._lock:
            T = self._known.get((camera, lidar))
            if T is None:
                self._wanted.add((camera, lidar))
            return T

    def wanted(self) -> list[tuple[str, str]]:
        """(camera, lidar) pairs asked for and not found yet."""
        with self._lock:
            return sorted(self._wanted)

    def store(self, camera: str, lidar: str, T_cam_lidar: np.ndarray) -> None:
        T = check_rigid(T_cam_lidar, f"transform {lidar} -> {camera}")
        with self._lock:
            self._known[(camera, lidar)] = T
            self._wanted.discard((camera, lidar))

    def store_transform(self, transform_stamped: Any) -> tuple[str, str]:
        """Store a geometry_msgs/TransformStamped from ``lookup_transform(camera, lidar, ...)``
        (header.frame_id = camera, child_frame_id = lidar); returns the pair."""
        from types import SimpleNamespace

        from pl3d_ros.io.ros_msgs import tf_message_transforms

        (_, parent, child, T), = tf_message_transforms(SimpleNamespace(transforms=[transform_stamped]))
        self.store(parent, child, T)
        return parent, child


def frame_from_messages(image: Any, camera_info: Any, cloud: Any, T_cam_lidar: np.ndarray, *,
                        seq: int = 0, intensity_field: str | None = None,
                        camera_frame: str | None = None) -> Frame:
    """One synchronized Image + CameraInfo + PointCloud2 (rclpy or rosbags messages) -> Frame.

    The stamp is the cloud's. Raises FrameError / ros_msgs.MessageError on malformed input.
    """
    from pl3d_ros.io import ros_msgs

    camera = ros_msgs.camera_model_from_info(camera_info, T_cam_lidar, frame_id=camera_frame)
    points, _ = ros_msgs.cloud_to_points(cloud, intensity_field or None)
    return Frame(ros_msgs.stamp_to_ns(cloud.header), points, ros_msgs.image_to_rgb(image), camera,
                 seq=seq, lidar_frame_id=str(cloud.header.frame_id))


def output_arrays(frame: Frame, prediction: Prediction, palette: Any | None = None, *,
                  segmentation: bool = True, visualization: bool = True
                  ) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The two output clouds as structured arrays, each built only if wanted (has subscribers).

    palette: a ``labels.ClassSet`` (its ``colorize``) for the visualization cloud's rgb field.
    """
    from pl3d_ros.io.ros_msgs import segmentation_cloud_array

    seg = vis = None
    if segmentation:
        seg = segmentation_cloud_array(frame.points, prediction.labels, prediction.confidence)
    if visualization:
        if palette is None:
            from pl3d_ros.labels import load_class_set

            palette = load_class_set()
        vis = segmentation_cloud_array(frame.points, prediction.labels, prediction.confidence,
                                       rgb=palette.colorize(prediction.labels))
    return seg, vis


def resolve_model(path: str) -> Path:
    """``runtime.model`` -> the checkpoint file; "" = the bundled default model
    (``pl3d_ros.weights``). A relative path is taken from the working directory."""
    if path:
        p = Path(path).expanduser()
        if not p.is_file():
            raise ConfigError(f"runtime.model {p} does not exist")
        return p
    from pl3d_ros.models.checkpoint import CheckpointError
    from pl3d_ros.weights import default_model_path

    try:
        return default_model_path()
    except CheckpointError as exc:
        raise ConfigError(f"runtime.model is empty and {exc}") from exc


def build_segmenter(cfg: Config, threads: int = 0) -> tuple[Any, Any]:
    """(Segmenter, source model) from ``runtime.*``: checkpoint checked against class_set and
    sensor, backend from ``runtime.backend`` with ``threads`` CPU threads."""
    from pl3d_ros.models.checkpoint import load_checkpoint
    from pl3d_ros.pipeline import Segmenter
    from pl3d_ros.runtime.factory import create_backend

    rt = cfg.runtime
    model, header = load_checkpoint(resolve_model(rt.model), class_set=cfg.class_set,
                                    sensor=cfg.sensor)
    backend = create_backend(rt.backend, model, header, threads=threads, precision=rt.precision,
                             cache_dir=rt.engine_cache_dir or None, device=rt.device or None,
                             force_rebuild=rt.force_rebuild)
    return Segmenter(backend, header), model


def build_adapter(cfg: Config, segmenter: Any, model: Any) -> AdapterLike | None:
    """The adapter for ``adapt.method`` (None for ``source``: inference only).

    Adaptation runs on the GPU when there is one. Its weights reach the backend through a
    late-bound call of ``segmenter.backend.swap_weights``, so the runner's normal-priority swap
    thread (installed at start) is used rather than a method captured here.
    """
    if cfg.adapt.method == "source":
        return None
    import torch

    from pl3d_ros.adapt.adapter import Adapter

    device = "cuda" if torch.cuda.is_available() else "cpu"

    def on_weights(state_dict: Any) -> None:
        segmenter.backend.swap_weights(state_dict)

    return Adapter(model.to(device), segmenter.header, cfg, on_weights=on_weights)
