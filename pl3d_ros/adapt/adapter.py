"""The adapter: frames in, adapted weights out, on a background thread or in lockstep.

    adapter = Adapter(model, header, cfg, on_weights=deployer)   # app.build makes both
    # realtime (the node): never blocks the inference thread
    adapter.start(); ...; adapter.offer(frame, pred.inputs); ...; adapter.stop(5.0)
    # lockstep (offline replay): score frame t with the deployed weights, then adapt on it
    pred = segmenter.infer(frame); adapter.step(frame, pred.inputs)

Each frame is prepared once (``method.prepare``: the frame's work) and then stepped on
(``method.step``), on the network inputs inference already made when they are handed over.

Every ``swap_every_steps`` adaptation steps the teacher's weights go to ``on_weights`` (a CPU
copy, so the receiver may keep it). After a restore to the source (collapse guard, ``reset``)
they go at once. A failed step (any exception, a non-finite loss) is logged with its traceback,
counted, and undone: the networks roll back to their state before the frame, and the thread goes
on with the next frame.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import traceback
from collections import deque
from pathlib import Path
from typing import Any, Callable

import torch

from pl3d_ros.adapt.memory import FrameMemory
from pl3d_ros.adapt.methods import Method, NonFiniteOutputs, build_method
from pl3d_ros.adapt.quality import QualityTotals
from pl3d_ros.adapt.state import frame_state
from pl3d_ros.config import Config
from pl3d_ros.frame import Frame
from pl3d_ros.health import AdapterHealth
from pl3d_ros.inputs import NetworkInputs
from pl3d_ros.pipeline import FUSION_KEY
from pl3d_ros.models.checkpoint import CheckpointError, CheckpointHeader, load_checkpoint, save_checkpoint
from pl3d_ros.models.two_stream import TwoStreamNet

log = logging.getLogger(__name__)

WeightsCallback = Callable[[dict[str, torch.Tensor]], None]


class Adapter:
    """Online source-free adaptation of a TwoStreamNet.

    model: the source network (CPU or CUDA; adaptation runs on its device; it is copied, never
    modified). header: its checkpoint header. cfg: the whole config (adapt, pseudo_labels,
    refine, connectivity, sensor). on_weights: receives the teacher's state dict (the backend's
    ``swap_weights``). mask_provider: a refine mask provider to use instead of building one from
    cfg.refine. seed: seeds the adapter's private torch generator (the stochastic restore's draws;
    no global RNG is touched). Everything else in a step is deterministic (argmax, medians,
    superpixels, the connectivity filter's EM), so with torch's deterministic CPU kernels a
    lockstep run is reproducible.
    """

    def __init__(self, model: TwoStreamNet, header: CheckpointHeader, cfg: Config,
                 on_weights: WeightsCallback | None = None, mask_provider: Any = None, seed: int = 0) -> None:
        self.cfg = cfg
        self.header = header
        self.on_weights = on_weights
        self.device = next(model.parameters()).device
        self.seed = int(seed)
        self.generator = torch.Generator(device="cpu").manual_seed(self.seed)
        self.resumed_from: str | None = None
        initial = self._resume_state()
        self.method: Method = build_method(cfg, model, header, initial_state=initial,
                                           generator=self.generator, mask_provider=mask_provider)
        self.quality = QualityTotals(header.class_set.num_classes)

        self._lock = threading.RLock()  # one step / reset / save at a time
        # Counters and pseudo-label totals are read by health()/reports from other threads while
        # a step (which holds _lock for seconds) updates them: a small lock of their own.
        self._stats_lock = threading.Lock()
        self._cond = threading.Condition()  # guards the frame buffer
        self._buffer: deque[tuple[Frame, NetworkInputs | None]] = deque()
        self._thread: threading.Thread | None = None
        self._stop_event = threading.Event()

        a = cfg.adapt
        self.memory = FrameMemory(a.memory_frames, int(a.memory_mb * 2**20), seed=self.seed)
        self._memory_steps = 0  # steps on memory frames alone (realtime idle time)
        self._domain_resets = 0
        self._memory_steps_since_frame = 0
        self._refreshes = 0
        self._frame_work_ms: float | None = None
        self._step_ms: float | None = None
        self._frames = 0  # frames stepped (index of the next frame)
        self._seen = 0  # frames handed to step() (every_n_frames counts these)
        self._steps = 0
        self._frames_offered = 0
        self._frames_dropped = 0
        self._errors = 0
        self._last_error: str | None = None
        self._weight_swaps = 0
        self._last_swap_time: float | None = None
        self._restores = 0
        self._collapse_restores = 0
        self._last_stats: dict[str, Any] = {}
        self._last_step_ms: float | None = None
        if initial is not None:
            self._emit_weights()  # the backend still runs the source: hand it the resumed weights

    # -- construction helpers -------------------------------------------------------------------

    def _resume_state(self) -> dict[str, torch.Tensor] | None:
        a = self.cfg.adapt
        if a.resume != "adapted" or not a.checkpoint_path or a.method == "source":
            return None  # the source baseline is always the source model
        path = Path(a.checkpoint_path)
        if not path.is_file():
            log.info("adapt.resume=adapted but %s does not exist yet: starting from the source", path)
            return None
        net, h = load_checkpoint(path, class_set=self.header.class_set.name, sensor=self.header.sensor)
        if dataclasses.asdict(h.model) != dataclasses.asdict(self.header.model) or \
                h.class_set.names != self.header.class_set.names:
            raise CheckpointError(f"{path}: adapted checkpoint does not match the source model "
                                  f"(model {dataclasses.asdict(h.model)} vs {dataclasses.asdict(self.header.model)}, "
                                  f"classes {h.class_set.names} vs {self.header.class_set.names})")
        prev = h.training.get("adaptation", {}).get("method")
        if prev and prev != a.method:
            raise CheckpointError(f"{path} was adapted with method {prev!r}, not {a.method!r}; "
                                  "use another adapt.checkpoint_path or adapt.resume: source")
        self.resumed_from = str(path)
        log.info("resuming adaptation from %s", path)
        return {k: v.to(self.device) for k, v in net.state_dict().items()}

    # -- lockstep ---------------------------------------------------------------------------------

    @property
    def teacher(self) -> torch.nn.Module:
        """The network being deployed (do not modify; read under no concurrent step)."""
        return self.method.teacher

    def step(self, frame: Frame, inputs: NetworkInputs | None = None) -> dict[str, Any]:
        """Lockstep: adapt on one frame (every ``adapt.every_n_frames``-th frame handed over; the
        others are left out, as a node that cannot keep up drops them): prepare it, then
        ``adapt.steps_per_frame`` steps, then swaps and checkpoints when due. ``inputs``: the
        network inputs inference made for this frame (prepared here when None). Never raises: a
        failure is counted and undone, and the returned stats hold ``error``."""
        every = self.cfg.adapt.every_n_frames
        seen, self._seen = self._seen, self._seen + 1
        if every > 1 and seen % every:
            return {}
        return self._adapt(frame, inputs)

    def _adapt(self, frame: Frame, inputs: NetworkInputs | None = None) -> dict[str, Any]:
        if not self.method.adapts:  # source: nothing to learn, no per-frame work
            self._frames += 1
            return {}
        with self._lock:
            t0 = time.perf_counter()
            index = self._frames
            self._frames += 1
            snap = state = None
            stats: dict[str, Any] = {}
            try:
                snap = self.method.snapshot()
                t_prep = time.perf_counter()
                state = frame_state(frame, self.header, self.device, index, inputs)
                self.method.prepare(state)
                state.labelled_at = self._steps
                self._frame_work_ms = (time.perf_counter() - t_prep) * 1e3
                stats.update(state.stats)
                if state.domain_reset:  # a new domain: the memory holds the last one's frames
                    self.memory.clear()
                    self._restores += 1
                    self._domain_resets += 1
                    log.info("domain change detected at frame %d: adaptation restarted from the source", index)
                    self._emit_weights()
                elif state.redeploy:
                    self._emit_weights()
                    state.redeploy = False  # handed off
                if state.collapsed:
                    self.memory.clear()  # its pseudo-labels came from the collapsed teacher
                    self._after_step(collapsed=True, stats=stats)
                else:
                    for _ in range(self.cfg.adapt.steps_per_frame):
                        batch = [state] + self._memory_batch(self.cfg.adapt.batch_frames - 1, exclude=state)
                        stats.update(self._timed_step(batch).as_dict())  # the last step's losses
                        self._after_step()
                    self.memory.add(state)
                    self._memory_steps_since_frame = 0
                if state.labels is not None:
                    with self._stats_lock:
                        stats.update(self.quality.add(state.labels.stages(), state.gt, state.in_view))
            except Exception as exc:  # noqa: BLE001 - the adaptation thread must never die
                self._count_error()
                self._last_error = f"{type(exc).__name__}: {exc}"
                log.error("adaptation step on frame %d failed (rolled back):\n%s", index, traceback.format_exc())
                if snap is not None:
                    try:
                        self.method.rollback(snap)
                    except Exception:  # noqa: BLE001
                        log.error("rollback failed:\n%s", traceback.format_exc())
                if isinstance(exc, NonFiniteOutputs):
                    # The weights deployed before this frame are broken: rolling back keeps them.
                    log.error("the deployed network computes non-finite outputs: restoring the source")
                    self.method.reset()
                    self.memory.clear()
                    self._restores += 1
                    self._emit_weights()
                elif state is not None and state.redeploy:
                    # Selection changed the served network before the failure: the rollback
                    # keeps that choice, so the backend must get it now, not at the next swap.
                    self._emit_weights()
                stats = {"error": self._last_error}
            self._last_step_ms = (time.perf_counter() - t0) * 1e3
            stats["ms"] = self._last_step_ms
            self._last_stats = stats
            return stats

    def _memory_batch(self, k: int, exclude: Any = None) -> list[Any]:
        """``k`` memory frames for a step, each re-labelled first when its labels are older than
        ``memory_refresh_steps`` steps (lazily: only frames a step uses pay the teacher forward)."""
        batch = self.memory.sample(k, exclude=exclude)
        every = self.cfg.adapt.memory_refresh_steps
        for st in batch:
            if every and self._steps - getattr(st, "labelled_at", self._steps) >= every:
                self.method.refresh(st)
                st.labelled_at = self._steps
                self._refreshes += 1
        return batch

    def _timed_step(self, batch: list[Any]) -> Any:
        t = time.perf_counter()
        result = self.method.step(batch)
        self._step_ms = (time.perf_counter() - t) * 1e3
        return result

    def memory_step(self) -> dict[str, Any] | None:
        """One step on memory frames alone (no new frame's work: the cheap step the realtime
        thread takes while no new frame waits); None when the memory is empty. Never raises."""
        if not self.method.adapts or not len(self.memory):
            return None
        with self._lock:
            snap = None
            try:
                snap = self.method.snapshot()
                batch = self._memory_batch(self.cfg.adapt.batch_frames)
                stats = self._timed_step(batch).as_dict()
                self._after_step()
                self._memory_steps += 1
                return stats
            except Exception as exc:  # noqa: BLE001 - the adaptation thread must never die
                self._count_error()
                self._last_error = f"memory step: {type(exc).__name__}: {exc}"
                log.error("memory step failed (rolled back):\n%s", traceback.format_exc())
                if snap is not None:
                    self.method.rollback(snap)
                return {"error": self._last_error}

    def _after_step(self, collapsed: bool = False, stats: dict[str, Any] | None = None) -> None:
        """Counters, weight hand-off and periodic checkpoint after one step; a collapse restore
        counts as the frame's step and deploys the source at once."""
        self._steps += 1
        if collapsed:
            self._collapse_restores += 1
            self._restores += 1
            st = stats or {}
            log.warning("collapse guard fired (class share %.3f, disagreement with source %.3f): "
                        "teacher and student restored to the source", st.get("class_share", float("nan")),
                        st.get("disagreement", float("nan")))
            self._emit_weights()
        elif self._steps % self.cfg.adapt.swap_every_steps == 0:
            self._emit_weights()
        a = self.cfg.adapt
        if a.checkpoint_path and self._steps % a.checkpoint_every_steps == 0:
            self.save()

    def _emit_weights(self) -> None:
        if self.on_weights is None:
            return
        state = self.method.models.teacher_state()
        if self.method.fusion_bias is not None:  # the fusion deploys with the weights (Segmenter.deploy)
            state[FUSION_KEY] = self.method.fusion_bias.detach().to("cpu", copy=True)
        bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:  # never deploy NaN / inf (the step checks already; this guards every path)
            self._count_error()
            self._last_error = f"non-finite weights not deployed: {', '.join(bad[:3])}"
            log.error("%s", self._last_error)
            return
        try:
            self.on_weights(state)
        except Exception as exc:  # noqa: BLE001 - a failed swap leaves the old weights deployed
            self._count_error()
            self._last_error = f"on_weights: {type(exc).__name__}: {exc}"
            log.error("weight hand-off failed (old weights stay deployed):\n%s", traceback.format_exc())
            return
        self._weight_swaps += 1
        self._last_swap_time = time.time()

    def reset(self) -> None:
        """Back to the source weights (all online state cleared) and tell on_weights."""
        with self._lock:
            self.method.reset()
            self.memory.clear()
            self._restores += 1
            self._emit_weights()

    # -- realtime ---------------------------------------------------------------------------------

    def offer(self, frame: Frame, inputs: NetworkInputs | None = None) -> None:
        """Non-blocking hand-over from the inference thread (with the network inputs inference
        made, if any); the oldest frame is dropped when the buffer (cfg.adapt.buffer_frames) is
        full."""
        with self._cond:
            self._frames_offered += 1
            if len(self._buffer) >= self.cfg.adapt.buffer_frames:
                self._buffer.popleft()
                self._frames_dropped += 1
            self._buffer.append((frame, inputs))
            self._cond.notify()

    def start(self) -> None:
        """Start the background thread (idempotent)."""
        t = self._thread
        if t is not None and t.is_alive():
            if not self._stop_event.is_set():
                return
            t.join()  # an earlier stop() timed out: let that thread finish before a new one
        self._stop_event.clear()
        self._thread = threading.Thread(target=self._run, name="pl3d-adapt", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        cap = self.cfg.adapt.memory_steps_per_frame
        while not self._stop_event.is_set():
            with self._cond:
                idle = not self._buffer
            if idle and cap and self._memory_steps_since_frame < cap and len(self.memory):
                # No new frame waits: keep training on the memory (the thread is niced, so this
                # only uses time inference leaves), at most ``cap`` steps per new frame.
                self.memory_step()
                self._memory_steps_since_frame += 1
                continue
            with self._cond:
                while not self._buffer and not self._stop_event.is_set():
                    self._cond.wait(timeout=0.1)
                if self._stop_event.is_set():
                    return
                # The newest frame: adapt to where the robot is now. The older ones are stale
                # by the time this step ends; they are dropped rather than trained on backwards.
                frame, inputs = self._buffer.pop()
                self._frames_dropped += len(self._buffer)
                self._buffer.clear()
            try:
                self._adapt(frame, inputs)  # realtime: the frames it takes are what it can do
            except BaseException:  # noqa: BLE001 - _adapt() never raises; belt and braces
                self._count_error()
                self._last_error = traceback.format_exc(limit=1)
                log.error("adaptation thread: unexpected error:\n%s", traceback.format_exc())

    def stop(self, timeout_s: float = 5.0) -> bool:
        """Stop the thread (the step in progress finishes) and write the final checkpoint when
        adapt.checkpoint_path is set -> True when the thread ended within ``timeout_s``."""
        self._stop_event.set()
        with self._cond:
            self._cond.notify_all()
        stopped = True
        if self._thread is not None:
            self._thread.join(timeout_s)
            stopped = not self._thread.is_alive()
            if stopped:
                self._thread = None
        if stopped and self.cfg.adapt.checkpoint_path and self.method.adapts:
            try:
                self.save()
            except Exception:  # noqa: BLE001
                self._count_error()
                self._last_error = traceback.format_exc(limit=1)
                log.error("final checkpoint failed:\n%s", traceback.format_exc())
        return stopped

    def _count_error(self) -> None:
        with self._stats_lock:  # incremented from the adaptation thread and from stop()
            self._errors += 1

    @property
    def running(self) -> bool:
        t = self._thread  # read once: stop() may clear it concurrently
        return t is not None and t.is_alive()

    # -- reporting and persistence --------------------------------------------------------------

    def health(self) -> AdapterHealth:
        """Counters and the last frame's pseudo-label density (and precision where the frame had
        ground truth)."""
        with self._cond:
            buffered = len(self._buffer)
        last = self._last_stats
        models, selector = getattr(self.method, "models", None), getattr(self.method, "selector", None)
        stages = {f"{stage}_{k}": last[f"{stage}_{k}"] for stage in ("base", "refined", "filtered")
                  for k in ("density", "precision") if f"{stage}_{k}" in last}
        return AdapterHealth(
            method=self.cfg.adapt.method, running=self.running, frames=self._frames, steps=self._steps,
            frames_offered=self._frames_offered, frames_dropped=self._frames_dropped, buffered=buffered,
            errors=self._errors, last_error=self._last_error, weight_swaps=self._weight_swaps,
            last_swap_time=self._last_swap_time, restores=self._restores,
            collapse_restores=self._collapse_restores, last_step_ms=self._last_step_ms,
            resumed_from=self.resumed_from,
            pseudo_label_density=last.get("filtered_density", last.get("base_density")),
            memory_frames=len(self.memory), memory_mb=self.memory.bytes / 2**20, memory_steps=self._memory_steps,
            memory_refreshes=self._refreshes, frame_work_ms=self._frame_work_ms, step_ms=self._step_ms,
            domain_resets=self._domain_resets, serving_source=bool(getattr(models, "serve_source", False)),
            source_switches=selector.switches if selector is not None else 0, **stages)

    def pseudo_label_totals(self) -> dict[str, Any]:
        """Pseudo-label counts summed over every frame stepped (see adapt.quality.QualityTotals)."""
        with self._stats_lock:
            return self.quality.report()

    def save(self, path: str | Path | None = None) -> Path:
        """Atomic checkpoint of the teacher (default adapt.checkpoint_path); the header's training
        dict keeps the source's entries and gets an ``adaptation`` entry."""
        target = path or self.cfg.adapt.checkpoint_path
        if not target:
            raise ValueError("no checkpoint path: pass one or set adapt.checkpoint_path")
        path = Path(target)
        with self._lock:
            a = self.cfg.adapt
            training = dict(self.header.training)
            training["adaptation"] = {
                "method": a.method, "components": a.components(), "trainable": a.trainable,
                "frames": self._frames, "steps": self._steps, "restores": self._restores,
                "collapse_restores": self._collapse_restores, "domain_resets": self._domain_resets,
                "saved_unix_s": time.time(),
                "resumed_from": self.resumed_from,
                "fusion_bias": (None if self.method.fusion_bias is None
                                else [float(v) for v in self.method.fusion_bias]),
            }
            header = dataclasses.replace(self.header, training=training)  # branches kept
            # the adapted network, also while the source is served (select): a resume continues it
            return save_checkpoint(path, self.method.models.adapted, header)
