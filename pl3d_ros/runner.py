"""The node's engine without ROS: a latest-frame slot, the inference thread and the adapter
hand-off.

    producer (message_filters callback, a bag, a test)
        │ submit(frame): a depth-1 slot; a newer frame replaces a waiting one (counted as a drop)
        ▼
    inference thread: take the newest frame ─► segmenter.infer ─► output(frame, prediction)
        │                                                       ─► on_timing(FrameTiming)
        └─► adapter.offer(frame, prediction.inputs)   (non-blocking; the adapter has its thread)

Nothing here waits for the adapter, and nothing the output callback or the adapter raises stops
the inference thread: errors are logged (throttled) and counted in :class:`~pl3d_ros.health.Health`.
The runner applies the CPU budget (``cpu_budget.ThreadBudget``: inference threads pinned first,
the adapter started niced and thread-limited) and owns the weight deployer (closed on stop).

Bench: ``bench/runner_overhead.py`` measures inference latency with and without a concurrent
adapter under these settings.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import numpy as np

from pl3d_ros.config import Config
from pl3d_ros.cpu_budget import ThreadBudget, WeightDeployer, lower_thread_priority
from pl3d_ros.frame import Frame, Prediction
from pl3d_ros.guard import Throttle
from pl3d_ros.health import AdapterHealth, FrameTiming, Health

log = logging.getLogger(__name__)

T = TypeVar("T")


class SegmenterLike(Protocol):
    """``pipeline.Segmenter`` or anything with its ``infer``."""

    def infer(self, frame: Frame) -> Prediction: ...


class AdapterLike(Protocol):
    """The adaptation thread's interface (``adapt.adapter.Adapter``).

    ``offer`` must not block; ``start`` starts the adapter's own thread(s); ``stop`` joins them
    within ``timeout_s`` and says whether it managed; ``health`` is its AdapterHealth.
    """

    def offer(self, frame: Frame, inputs: Any = None) -> None: ...

    def start(self) -> None: ...

    def stop(self, timeout_s: float) -> bool: ...

    def health(self) -> AdapterHealth: ...

    def reset(self) -> None: ...

    def save(self, path: str | Path | None = None) -> Any: ...


OutputCallback = Callable[[Frame, Prediction], None]


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


class Runner:
    """Latest-frame slot + inference thread + adapter hand-off (module docstring).

    Args:
        segmenter: anything with ``infer(frame) -> Prediction``.
        output: called on the inference thread with every (frame, prediction); exceptions are
            logged and counted, never fatal.
        adapter: optional; offered every processed frame; started and stopped with the runner.
        deployer: the WeightDeployer the adapter hands its weights to (``app.build`` makes both);
            the runner closes it on stop.
        settings: budget, stats window, stop bound, thread budget.
        on_timing: called after ``output`` with the frame's :class:`FrameTiming` (debug topics).
        stamp_clock: nanoseconds on the clock of the frame stamps (the node passes its ROS clock,
            which follows /clock under use_sim_time); None: no pipeline latency.
        clock: monotonic seconds for durations (tests inject a fake one).
    """

    def __init__(self, segmenter: SegmenterLike, output: OutputCallback | None = None,
                 adapter: AdapterLike | None = None, *, deployer: WeightDeployer | None = None,
                 settings: RunnerSettings | None = None,
                 on_timing: Callable[[FrameTiming], None] | None = None,
                 stamp_clock: Callable[[], int] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.segmenter = segmenter
        self.output = output
        self.adapter = adapter
        self.deployer = deployer
        self.settings = settings or RunnerSettings()
        self.on_timing = on_timing
        self.stamp_clock = stamp_clock
        self.clock = clock
        self._slot: LatestSlot[Frame] = LatestSlot()
        self._lock = self._slot.cond  # one lock for the slot and every counter below
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._restore_threads: int | None = None
        self._throttle = Throttle(logger=log)
        self._services: ThreadPoolExecutor | None = None
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
        if self.deployer is not None:
            self.deployer.close(max(0.0, deadline - time.monotonic()))
        if self._services is not None:
            self._services.shutdown(wait=False, cancel_futures=True)
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

    def in_background(self, name: str, fn: Callable[..., Any], *args: Any) -> Future:
        """Run ``fn(*args)`` on the runner's service thread and return at once (the node's
        services: a reset or save waits for the adaptation step in progress, seconds on a CPU,
        which must not block the executor that takes frames). The outcome is logged."""
        with self._lock:
            if self._services is None:
                self._services = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pl3d-service")
            fut = self._services.submit(fn, *args)

        def done(f: Future) -> None:
            exc = f.exception()
            if exc is not None:
                log.error("%s failed: %s: %s", name, type(exc).__name__, exc)
            else:
                log.info("%s done%s", name, f": {f.result()}" if f.result() is not None else "")

        fut.add_done_callback(done)
        return fut

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
                now = int(self.stamp_clock())
                # 0: a ROS clock on sim time before the first /clock message: no latency yet
                latency = (now - frame.stamp_ns) * 1e-6 if now > 0 else None
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
                self.adapter.offer(frame, pred.inputs)
            except Exception as exc:
                self._throttle("offer", "adapter.offer failed", exc)
                with self._lock:
                    self._offer_errors += 1

    # -- diagnostics ------------------------------------------------------------------------------

    def health(self) -> Health:
        """A consistent snapshot, with the adapter's health merged in."""
        adaptation: AdapterHealth | None = None
        adapter_error = None
        if self.adapter is not None:
            try:
                adaptation = self.adapter.health()
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
