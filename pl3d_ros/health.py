"""Health of the running pipeline: per-frame timings, the runner's snapshot (what the node's
diagnostics report, Autoware-style OK / WARN / ERROR) and the adapter's own health.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

#: Diagnostic levels, numerically equal to diagnostic_msgs/DiagnosticStatus OK / WARN / ERROR.
OK, WARN, ERROR = 0, 1, 2


@dataclass(frozen=True)
class AdapterHealth:
    """A snapshot of the adaptation thread (``Adapter.health()``).

    frames: frames adapted on; steps: student steps; frames_offered / frames_dropped / buffered:
    the hand-off from inference (dropped: replaced in the full buffer, or stale when a step
    ended); errors / last_error: failed (rolled-back) steps and hand-offs; weight_swaps /
    last_swap_time (wall-clock s): deployments to the backend; restores / collapse_restores:
    returns to the source (every kind / by the collapse guard); domain_resets: restarts from the
    source at a detected change of domain; serving_source / source_switches: whether the frozen
    source is served now instead of the adapted network, and how often that choice changed
    (full's component select); last_step_ms: wall time of the
    last frame's adaptation; resumed_from: the adapted checkpoint it started from; the target-
    frame memory (frames, MB, steps on memory frames alone, lazy re-labellings); frame_work_ms /
    step_ms: the last new frame's own work (teacher and source forwards, masks, refinement) and the
    last step (one batched student forward + backward). Pseudo-label
    density (share of points labelled) and precision (against ground truth, None without) of the
    last frame, by stage.
    """

    method: str
    running: bool
    frames: int = 0
    steps: int = 0
    frames_offered: int = 0
    frames_dropped: int = 0
    buffered: int = 0
    errors: int = 0
    last_error: str | None = None
    weight_swaps: int = 0
    last_swap_time: float | None = None
    restores: int = 0
    collapse_restores: int = 0
    last_step_ms: float | None = None
    resumed_from: str | None = None
    memory_frames: int = 0
    memory_mb: float = 0.0
    memory_steps: int = 0
    memory_refreshes: int = 0
    frame_work_ms: float | None = None
    step_ms: float | None = None
    domain_resets: int = 0
    serving_source: bool = False
    source_switches: int = 0
    pseudo_label_density: float | None = None
    base_density: float | None = None
    base_precision: float | None = None
    refined_density: float | None = None
    refined_precision: float | None = None
    filtered_density: float | None = None
    filtered_precision: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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
    ``adaptation`` is the adapter's own health (None: no adapter).
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
    adaptation: AdapterHealth | None

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
        if not a.running and self.running:
            return ERROR, "adaptation thread is not running"
        errors = a.errors + self.adapter_offer_errors
        if errors:
            return WARN, f"{errors} adaptation error(s); last: {a.last_error or 'see the log'}"
        return OK, f"{a.steps} adaptation steps, {a.weight_swaps} weight swaps"

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
        out = {k: _fmt(v) for k, v in (self.adaptation.to_dict() if self.adaptation else {}).items()}
        swap_time = self.adaptation.last_swap_time if self.adaptation else None
        if swap_time is not None:  # wall-clock seconds: show its age too
            out["last_swap_age_s"] = _fmt(max(0.0, time.time() - float(swap_time)))
        out["offer_errors"] = str(self.adapter_offer_errors)
        if self.adapter_error:
            out["adapter_error"] = self.adapter_error
        return out

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "accounted": self.accounted}
