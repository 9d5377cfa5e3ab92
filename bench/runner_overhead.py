"""Inference latency behind the Runner, with and without a concurrent adaptation thread.

    v/bin/python bench/runner_overhead.py [--seconds 20] [--rate 10] [--adapter auto|real|standin]

A producer submits KITTI frames at --rate Hz (the node's message_filters callback); the runner's
inference thread runs the Segmenter (ONNX Runtime, cpu preset, random weights: latency does not
depend on the weights) and builds the output cloud as the node does. Each configuration runs for
--seconds; configurations are interleaved --repeats times so that a change in the machine's load
hits them alike. Printed: per-frame processing time (infer + output) p50 / p90, the ratio to the
no-adapter baseline (target: at most 1.25), frames out / dropped, and adaptation steps per second.

Configurations (T = CPUs available; ThreadBudget in pl3d_ros/cpu_budget.py):
    no adapter              inference T threads                          (the baseline)
    no adapter, T-1 thr     inference T-1 threads                        (what fewer threads cost)
    naive                   adapter with T torch threads, same priority  (no budget)
    split threads           inference T-1, adapter 1 thread, same priority
    split + nice            inference T-1, adapter 1 thread, nice +10
    default (1 thr, nice)   ThreadBudget.from_config: inference T, adapter 1 thread, nice +10

The adapter is the real ``pl3d_ros.adapt.adapter.Adapter`` (method full) when it imports and
steps; else a stand-in that does what a training step does: forward the same network on the
newest offered frame, backward, an Adam step on the normalisation layers, and a weight swap into
the backend every 5 steps.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pl3d_ros.config import Config, ModelConfig, RangeImageConfig
from pl3d_ros.frame import Frame
from pl3d_ros.io.kitti import KittiSequence
from pl3d_ros.labels import load_class_set
from pl3d_ros.models.checkpoint import CheckpointHeader
from pl3d_ros.models.two_stream import build_model
from pl3d_ros.app import build_segmenter
from pl3d_ros.cpu_budget import ThreadBudget, WeightDeployer, available_cpus
from pl3d_ros.health import AdapterHealth
from pl3d_ros.io.frames import output_arrays
from pl3d_ros.pipeline import Segmenter
from pl3d_ros.runner import Runner, RunnerSettings

REPO = Path(__file__).resolve().parents[1]


class StandInAdapter:
    """A training step's CPU load behind the adapter interface (see module docstring)."""

    def __init__(self, model: torch.nn.Module, segmenter: Segmenter, deploy, swap_every: int = 5) -> None:
        self.segmenter = segmenter
        self.deploy = deploy
        self.student = copy.deepcopy(model).train()
        params = [p for m in self.student.modules()
                  if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.GroupNorm, torch.nn.LayerNorm))
                  for p in m.parameters()]
        for p in self.student.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        self.opt = torch.optim.Adam(params, lr=1e-4)
        self.swap_every = swap_every
        self.buffer: deque[Frame] = deque(maxlen=4)
        self.cond = threading.Condition()
        self.stop_event = threading.Event()
        self.thread: threading.Thread | None = None
        self.steps = self.swaps = self.errors = 0
        self.last_error: str | None = None

    def offer(self, frame: Frame, inputs=None) -> None:
        with self.cond:
            self.buffer.append((frame, inputs))
            self.cond.notify()

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="standin-adapt", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop_event.is_set():
            with self.cond:
                self.cond.wait_for(lambda: self.buffer or self.stop_event.is_set(), 0.1)
                if not self.buffer:
                    continue
                frame, inputs = self.buffer.pop()
            try:
                inputs = inputs or self.segmenter.preprocess(frame)
                out = self.student(inputs.image, inputs.range_image)
                loss = sum(o.float().logsumexp(1).mean() for o in out[:2])
                self.opt.zero_grad()
                loss.backward()
                self.opt.step()
                self.steps += 1
                if self.steps % self.swap_every == 0:
                    self.deploy(self.student.state_dict())
                    self.swaps += 1
            except Exception as exc:  # a bench must report, not die
                self.errors += 1
                self.last_error = f"{type(exc).__name__}: {exc}"

    def stop(self, timeout_s: float) -> bool:
        self.stop_event.set()
        with self.cond:
            self.cond.notify_all()
        if self.thread is not None:
            self.thread.join(timeout_s)
            return not self.thread.is_alive()
        return True

    def health(self) -> AdapterHealth:
        return AdapterHealth(method="stand-in", running=self.thread is not None, steps=self.steps,
                             weight_swaps=self.swaps, errors=self.errors, last_error=self.last_error)

    def reset(self) -> None:
        pass

    def save(self, path=None) -> None:
        pass


def make_adapter(kind: str, model, header, segmenter, cfg: Config, deployer: WeightDeployer):
    """(adapter, name): the real Adapter when asked for / available and working, else stand-in."""
    if kind in ("auto", "real"):
        try:
            from pl3d_ros.adapt.adapter import Adapter

            adapter = Adapter(model, header, cfg, on_weights=deployer)
            return adapter, f"real Adapter ({cfg.adapt.method})"
        except Exception as exc:
            if kind == "real":
                raise
            print(f"real Adapter unavailable ({type(exc).__name__}: {exc}); using the stand-in")
    return StandInAdapter(model, segmenter, deployer), "stand-in (forward + backward + Adam, swap every 5)"


@dataclass
class Result:
    name: str
    budget: ThreadBudget
    times_ms: list[float]
    frames_out: int
    frames_dropped: int
    steps_per_s: float | None
    adapter_errors: int


def run_config(name: str, budget: ThreadBudget, segmenter: Segmenter, frames: list[Frame],
               adapter_factory, seconds: float, rate: float, warmup: int = 3) -> Result:
    deployer = WeightDeployer(segmenter.deploy) if adapter_factory else None
    adapter = adapter_factory(deployer) if adapter_factory else None
    times: list[float] = []
    palette = segmenter.header.class_set

    def output(frame, pred):  # the node's per-frame work besides inference
        output_arrays(frame, pred, palette, segmentation=True, visualization=False)

    runner = Runner(segmenter, output, adapter, deployer=deployer,
                    settings=RunnerSettings(budget_ms=1e6, threads=budget),
                    on_timing=lambda t: times.append(t.stages_ms["total"]))
    runner.start()
    steps0 = adapter.health().steps if adapter else 0
    t0 = time.monotonic()
    i = 0
    while time.monotonic() - t0 < seconds:
        f = frames[i % len(frames)]
        runner.submit(Frame(f.stamp_ns + i, f.points, f.image, f.camera, seq=i,
                            lidar_frame_id=f.lidar_frame_id))
        i += 1
        time.sleep(max(0.0, t0 + i / rate - time.monotonic()))
    elapsed = time.monotonic() - t0
    health = runner.health()
    runner.stop(30.0)
    steps = None
    errors = 0
    if adapter is not None:
        ah = adapter.health()
        steps = (ah.steps - steps0) / elapsed
        errors = ah.errors
    return Result(name, budget, times[warmup:], health.frames_out, health.frames_dropped, steps,
                  errors)


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=20.0, help="per configuration and repeat")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved rounds")
    ap.add_argument("--rate", type=float, default=10.0, help="producer rate, Hz (a 10 Hz LiDAR)")
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--adapter", choices=("auto", "real", "standin"), default="auto")
    ap.add_argument("--data", default=str(REPO.parent / "shared/data/semantickitti-mini/sequences/00"))
    ap.add_argument("--only", nargs="*", help="run only these configuration names")
    args = ap.parse_args()

    cpus = available_cpus()
    mcfg = ModelConfig.from_preset(args.preset)
    header = CheckpointHeader(mcfg, load_class_set("xmuda10"), RangeImageConfig())
    torch.manual_seed(0)
    model = build_model(mcfg, header.class_set.num_classes).eval()
    frames = list(KittiSequence(args.data).frames())
    cfg = Config()
    default = ThreadBudget.from_config(cfg, adapting=True, cpus=cpus)
    fewer = max(1, cpus - 1)
    configs = [
        ("no adapter", ThreadBudget(cpus, 0, 0), False),
        (f"no adapter, {fewer} thr", ThreadBudget(fewer, 0, 0), False),
        ("naive", ThreadBudget(cpus, cpus, 0), True),
        ("split threads", ThreadBudget(fewer, 1, 0), True),
        ("split + nice", ThreadBudget(fewer, 1, 10), True),
        ("default (1 thr, nice)", default, True),
    ]
    if args.only:
        configs = [c for c in configs if c[0] in args.only]
    segmenters: dict[int, Segmenter] = {}
    for _, budget, _ in configs:
        n = budget.inference_threads
        if n not in segmenters:
            seg = build_segmenter(cfg.replace(**{"runtime.backend": "onnxruntime"}), model, header, threads=n)
            seg.infer(frames[0])  # warm-up
            segmenters[n] = seg
    adapter_name = None

    def factory_for(seg: Segmenter):
        def make(deployer: WeightDeployer):
            nonlocal adapter_name
            adapter, adapter_name = make_adapter(args.adapter, model, header, seg, cfg, deployer)
            return adapter
        return make

    print(f"{cpus} CPUs, {len(frames)} KITTI frames at {args.rate:g} Hz, preset {args.preset}, "
          f"ONNX Runtime, {args.seconds:g} s x {args.repeats} per configuration")
    results: dict[str, list[Result]] = {}
    for r in range(args.repeats):
        for name, budget, with_adapter in configs:
            seg = segmenters[budget.inference_threads]
            res = run_config(name, budget, seg, frames, factory_for(seg) if with_adapter else None,
                             args.seconds, args.rate)
            results.setdefault(name, []).append(res)
            print(f"  round {r + 1} {name:<22} p50 {pct(res.times_ms, 50):7.1f} ms  "
                  f"p90 {pct(res.times_ms, 90):7.1f} ms  steps/s "
                  f"{res.steps_per_s if res.steps_per_s is not None else float('nan'):.2f}", flush=True)
    if adapter_name:
        print(f"adapter: {adapter_name}")

    base = [t for res in results[configs[0][0]] for t in res.times_ms]
    b50, b90 = pct(base, 50), pct(base, 90)
    print()
    print(f"{'configuration':<22}{'inf thr':>8}{'adapt thr':>10}{'nice':>6}{'p50 ms':>9}{'p90 ms':>9}"
          f"{'x p50':>7}{'x p90':>7}{'out':>6}{'drop':>6}{'steps/s':>9}")
    for name, budget, with_adapter in configs:
        rs = results[name]
        times = [t for res in rs for t in res.times_ms]
        p50, p90 = pct(times, 50), pct(times, 90)
        steps = [res.steps_per_s for res in rs if res.steps_per_s is not None]
        print(f"{name:<22}{budget.inference_threads:>8}"
              f"{(budget.adapt_threads if with_adapter else '-'):>10}"
              f"{(budget.adapt_nice if with_adapter else '-'):>6}{p50:>9.1f}{p90:>9.1f}"
              f"{p50 / b50:>7.2f}{p90 / b90:>7.2f}{sum(r.frames_out for r in rs):>6}"
              f"{sum(r.frames_dropped for r in rs):>6}"
              f"{(statistics.mean(steps) if steps else float('nan')):>9.2f}")
    errors = {name: sum(r.adapter_errors for r in rs) for name, rs in results.items()}
    if any(errors.values()):
        print(f"adapter errors: {errors}")


if __name__ == "__main__":
    main()
