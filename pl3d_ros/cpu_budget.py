"""How inference and adaptation share a robot computer's CPU, and how adapted weights reach
the inference backend.

On a 2-core robot computer an adaptation step (teacher forward, student forward + backward)
takes every core torch gives it: inference then ran ~1.5x slower (bench/runner_overhead.py,
"naive"). So the runner owns the threads and splits the CPU (:class:`ThreadBudget`):

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
  the session's worker threads, which inference then runs on. So adapted weights are deployed
  by a :class:`WeightDeployer`: a thread of its own, started at normal priority when the pipeline
  is built, that runs ``backend.swap_weights`` while the (niced) caller waits. Every mode uses it
  (node, realtime and lockstep replay), so threads a swap creates never inherit the niceness.

With the nice increment (the default), inference keeps every CPU (``runtime.threads`` 0): the
kernel already gives it precedence, and fewer inference threads would cost latency whenever
adaptation is idle. Without it, the adaptation threads' CPUs are left out of inference's share.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from pl3d_ros.config import Config

log = logging.getLogger(__name__)


def available_cpus() -> int:
    """CPUs this process may run on (the affinity mask honours cgroup cpusets and taskset)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


@contextmanager
def one_torch_thread(device: Any = "cpu") -> Iterator[None]:
    """CPU pre/postprocessing on one intra-op thread of the calling thread (the count is an
    OpenMP per-thread setting; restored after). Its ops are 0.1-1 ms each: a second thread gains
    little on an idle machine, and on a busy one (the adaptation thread, other processes) the
    OpenMP team waits for its descheduled member at every op: the postprocess took 360 ms with
    two threads against 13 ms with one on the loaded development machine."""
    import torch

    if torch.device(device).type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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


class WeightDeployer:
    """Deploys adapted weights: ``deployer(state_dict)`` runs ``swap(state_dict)`` (a backend's
    ``swap_weights``) on the deployer's own thread and returns when it is done, raising what the
    swap raised.

    The thread starts in the constructor, i.e. on the thread that builds the pipeline (normal
    priority), never lazily from the niced adaptation thread, so whatever a swap creates (ONNX
    Runtime's intra-op pool) runs at normal priority. After ``close`` a deploy runs on the
    caller's thread. ``thread_name`` / ``last_deploy_nice`` say where the last swap ran.
    """

    def __init__(self, swap: Callable[[Any], Any], name: str = "pl3d-deploy") -> None:
        self._swap = swap
        self._queue: deque[tuple[Any, Future]] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self.deploys = 0
        self.last_deploy_thread: str | None = None
        self.last_deploy_nice: int | None = None
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    @property
    def thread_name(self) -> str:
        return self._thread.name

    def __call__(self, state_dict: Any) -> Any:
        if threading.current_thread() is self._thread:
            return self._run(state_dict)
        fut: Future = Future()
        with self._cond:
            if self._closed:
                return self._run(state_dict)
            self._queue.append((state_dict, fut))
            self._cond.notify()
        return fut.result()

    def _run(self, state_dict: Any) -> Any:
        self.last_deploy_thread = threading.current_thread().name
        self.last_deploy_nice = thread_nice()
        out = self._swap(state_dict)
        self.deploys += 1
        return out

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._closed)
                if not self._queue:
                    return
                state_dict, fut = self._queue.popleft()
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(self._run(state_dict))
                except BaseException as exc:  # handed to the caller, who decides
                    fut.set_exception(exc)

    def close(self, timeout_s: float = 1.0) -> None:
        """Finish queued deploys, then end the thread (bounded join). Idempotent."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout_s)
