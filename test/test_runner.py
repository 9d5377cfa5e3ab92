"""Runner: latest-frame slot, inference thread, adapter hand-off, thread budget, health (no ROS).

Frames are synthetic (test/fakes.py: no dataset needed); most tests use fake segmenters (sleep /
gate / fake clock) so that timing-dependent properties are checked without depending on this
machine's speed, and one test runs a real (small) Segmenter end to end.
"""

from __future__ import annotations

import threading
import time
import weakref

import numpy as np
import pytest
import torch

from fakes import (NS, ClockedSegmenter, FakeAdapter, FakeClock, GatedSegmenter, SleepySegmenter, clone,
                   fake_prediction, header, small_model, wait_for)
from pl3d_ros.config import Config
from pl3d_ros.cpu_budget import ThreadBudget, WeightDeployer, thread_nice
from pl3d_ros.frame import Frame
from pl3d_ros.health import ERROR, OK, WARN
from pl3d_ros.io.frames import output_arrays
from pl3d_ros.runner import LatestSlot, Runner, RunnerSettings


@pytest.fixture(scope="module")
def bag_frames(synthetic_frames) -> list[Frame]:
    """Four synthetic frames: the runner's tests need no dataset."""
    return synthetic_frames


# ------------------------------------------------------------------------------------ the slot


def test_latest_slot_keeps_only_the_newest_item():
    slot: LatestSlot[int] = LatestSlot()
    assert slot.take(timeout=0.01) is None
    assert slot.put(1) is False
    assert slot.put(2) is True and slot.put(3) is True  # each replaced a waiting item
    assert (slot.puts, slot.replaced, slot.pending) == (3, 2, 1)
    assert slot.take(timeout=0) == 3 and slot.pending == 0
    slot.put(4)
    slot.close()
    assert slot.take(timeout=1.0) is None and slot.pending == 1  # closed: stays pending


def test_take_wakes_on_put_from_another_thread():
    slot: LatestSlot[str] = LatestSlot()
    threading.Timer(0.05, slot.put, args=("x",)).start()
    t0 = time.monotonic()
    assert slot.take(timeout=5.0) == "x"
    assert time.monotonic() - t0 < 2.0


# ------------------------------------------------------------------------------------ ordering


def test_newest_waiting_frame_is_processed_next(bag_frames):
    seg = GatedSegmenter()
    outputs: list[int] = []
    runner = Runner(seg, lambda f, p: outputs.append(f.stamp_ns))
    runner.start()
    try:
        runner.submit(clone(bag_frames[0], 1 * NS))
        assert seg.entered.acquire(timeout=5)  # frame 1 is in inference
        for s in (2, 3, 4):
            runner.submit(clone(bag_frames[s % 4], s * NS))
        h = runner.health()
        assert (h.frames_in, h.in_flight, h.pending, h.frames_dropped) == (4, 1, 1, 2)
        assert h.accounted
        seg.release.release()
        assert seg.entered.acquire(timeout=5)  # the next one taken is the newest, 4
        seg.release.release()
        wait_for(lambda: len(outputs) == 2)
    finally:
        assert runner.stop(5.0)
    assert seg.seen == [1 * NS, 4 * NS] and outputs == seg.seen
    h = runner.health()
    assert (h.frames_in, h.frames_out, h.frames_dropped, h.pending, h.in_flight) == (4, 2, 2, 0, 0)


def test_fast_producer_drops_frames_keeps_memory_bounded_and_order(bag_frames):
    """20 Hz producer, 120 ms segmenter: about 2 of 5 frames get through, never more than two
    frames alive (one in inference, one waiting), outputs in stamp order, counts always add up."""
    seg = SleepySegmenter(0.12)
    outputs: list[int] = []
    runner = Runner(seg, lambda f, p: outputs.append(f.stamp_ns))
    alive: weakref.WeakSet[Frame] = weakref.WeakSet()
    max_alive = 0
    runner.start()
    try:
        for i in range(30):
            f = clone(bag_frames[i % 4], (100 + i) * NS // 20, seq=i)
            alive.add(f)
            runner.submit(f)
            del f
            max_alive = max(max_alive, len(alive))
            h = runner.health()
            assert h.accounted, h
            time.sleep(0.05)
    finally:
        assert runner.stop(5.0)
    h = runner.health()
    assert h.accounted and h.frames_in == 30 and h.in_flight == 0
    assert h.frames_dropped > 0 and h.frames_out == len(outputs) >= 5
    assert h.frames_out + h.frames_dropped + h.pending == 30
    assert max_alive <= 2, max_alive
    assert all(a < b for a, b in zip(outputs, outputs[1:])), "outputs out of stamp order"
    assert h.processing_ms_mean is not None and h.processing_ms_mean >= 100.0
    assert h.cyclic_time_ms_last is not None and h.cyclic_time_ms_last >= 100.0


# ------------------------------------------------------------------------------------ failures


def test_adapter_exception_does_not_stop_output(bag_frames):
    adapter = FakeAdapter(fail_offer=True)
    outputs: list[int] = []
    seg = GatedSegmenter()
    runner = Runner(seg, lambda f, p: outputs.append(f.stamp_ns), adapter)
    runner.start()
    try:
        for i in range(5):
            runner.submit(clone(bag_frames[i % 4], (i + 1) * NS))
            assert seg.entered.acquire(timeout=5)
            seg.release.release()
            wait_for(lambda: runner.health().frames_out == i + 1)
        wait_for(lambda: runner.health().adapter_offer_errors == 5)
    finally:
        assert runner.stop(5.0)
    h = runner.health()
    assert outputs == [(i + 1) * NS for i in range(5)]
    assert h.frames_out == 5 and h.adapter_offer_errors == 5
    level, msg = h.adaptation_status()
    assert level == WARN and "5 adaptation error" in msg
    assert adapter.started == 1 and adapter.stopped == 1


def test_output_and_inference_errors_are_counted_not_fatal(bag_frames):
    class Flaky(GatedSegmenter):
        def infer(self, frame):
            if frame.seq == 1:
                raise ValueError("bad frame")
            return super().infer(frame)

    seg = Flaky()

    def output(f, p):
        if f.seq == 2:
            raise OSError("publisher gone")

    runner = Runner(seg, output)
    runner.start()
    try:
        for i in range(4):
            runner.submit(clone(bag_frames[i], (i + 1) * NS, seq=i))
            if i != 1:
                assert seg.entered.acquire(timeout=5)
                seg.release.release()
            wait_for(lambda: runner.health().frames_out + runner.health().frames_failed == i + 1)
        assert runner.running
    finally:
        assert runner.stop(5.0)
    h = runner.health()
    assert (h.frames_in, h.frames_out, h.frames_failed, h.output_errors) == (4, 3, 1, 1)
    assert h.accounted and "publisher gone" in h.last_error


def test_adapter_gets_frames_and_its_health_is_merged(bag_frames):
    adapter = FakeAdapter()
    seg = GatedSegmenter()
    runner = Runner(seg, None, adapter)
    runner.start()
    try:
        runner.submit(clone(bag_frames[0], 5 * NS))
        assert seg.entered.acquire(timeout=5)
        seg.release.release()
        wait_for(lambda: adapter.offered == [5 * NS])
        runner.reset_adaptation()
        assert runner.save_adaptation("/tmp/x.safetensors") == "/tmp/x.safetensors"
    finally:
        assert runner.stop(5.0)
    h = runner.health()
    assert h.adaptation.steps == 7 and h.adaptation.pseudo_label_density == 0.4
    assert h.adaptation_status()[0] == OK and "7 adaptation steps" in h.adaptation_status()[1]
    assert h.adaptation_values()["pseudo_label_density"] == "0.400"
    assert adapter.resets == 1 and adapter.stopped == 1


def test_adapter_that_fails_to_start_leaves_inference_running(bag_frames):
    class Broken(FakeAdapter):
        def start(self):
            raise RuntimeError("no GPU memory")

    seg = GatedSegmenter()
    outputs = []
    runner = Runner(seg, lambda f, p: outputs.append(f.stamp_ns), Broken())
    runner.start()
    try:
        runner.submit(clone(bag_frames[0], NS))
        assert seg.entered.acquire(timeout=5)
        seg.release.release()
        wait_for(lambda: outputs == [NS])
    finally:
        assert runner.stop(5.0)
    level, msg = runner.health().adaptation_status()
    assert level == ERROR and "no GPU memory" in msg


# ------------------------------------------------------------------------------------ stop


def test_stop_returns_within_its_bound(bag_frames):
    seg = SleepySegmenter(0.3)
    runner = Runner(seg, None, FakeAdapter())
    runner.start()
    runner.submit(clone(bag_frames[0], NS))
    wait_for(lambda: runner.health().in_flight == 1)
    t0 = time.monotonic()
    assert runner.stop(2.0) is True
    assert time.monotonic() - t0 < 1.0
    assert not runner.running

    # A hung inference: stop gives up at the bound and says so.
    hang = threading.Event()

    class Hung:
        def infer(self, frame):
            hang.wait(10)
            return fake_prediction(frame)

    runner = Runner(Hung())
    runner.start()
    runner.submit(clone(bag_frames[0], NS))
    wait_for(lambda: runner.health().in_flight == 1)
    t0 = time.monotonic()
    assert runner.stop(0.3) is False
    assert time.monotonic() - t0 < 1.0
    hang.set()


def test_idle_runner_stops_fast():
    runner = Runner(SleepySegmenter(0.0), settings=RunnerSettings(poll_s=5.0))
    runner.start()
    t0 = time.monotonic()
    assert runner.stop(3.0)
    assert time.monotonic() - t0 < 1.0  # close() wakes the waiting thread; no poll wait


# ------------------------------------------------------------------------------------ health


def test_budget_warn_error_latency_and_cyclic_time_on_a_fake_clock(bag_frames):
    clock = FakeClock()
    seg = ClockedSegmenter(clock, [150.0, 150.0, 150.0, 50.0])
    settings = RunnerSettings(budget_ms=100.0, max_consecutive_delay_ms=250.0, stats_window=10)
    stamp_now = {"ns": 0}
    runner = Runner(seg, None, settings=settings, clock=clock, stamp_clock=lambda: stamp_now["ns"])
    assert runner.health().processing_status() == (WARN, "inference thread not running")
    runner.start()
    statuses = []
    try:
        assert runner.health().processing_status() == (OK, "waiting for frames")
        for i in range(4):
            stamp = (10 + i) * NS
            stamp_now["ns"] = stamp + 42_000_000  # the stamp clock is 42 ms ahead of the frame
            runner.submit(clone(bag_frames[i], stamp))
            wait_for(lambda: runner.health().frames_out == i + 1)
            statuses.append(runner.health())
            clock.advance(10.0)  # idle gap between frames
    finally:
        assert runner.stop(5.0)
    h1, h2, h3, h4 = statuses
    assert h1.processing_status()[0] == WARN and h1.consecutive_delay_ms == pytest.approx(150.0)
    # Run of over-budget frames: start of the 1st to end of the 2nd = 150 + 10 + 150 = 310 ms.
    assert h2.consecutive_over_budget == 2 and h2.consecutive_delay_ms == pytest.approx(310.0)
    assert h2.processing_status()[0] == ERROR and "2 frames in a row" in h2.processing_status()[1]
    assert h3.consecutive_delay_ms == pytest.approx(470.0)
    assert h4.processing_status() == (OK, "processing 50.0 ms (budget 100 ms)")
    assert h4.consecutive_over_budget == 0 and h4.consecutive_delay_ms == 0.0
    assert h4.frames_over_budget == 3
    assert h4.processing_ms_mean == pytest.approx(125.0)
    assert h4.processing_ms_p90 == pytest.approx(150.0)
    assert h4.pipeline_latency_ms_last == pytest.approx(42.0)
    assert h4.cyclic_time_ms_last == pytest.approx(60.0)  # 10 ms gap + 50 ms frame
    assert h4.stages_ms_last["total"] == pytest.approx(50.0)
    assert set(h4.stages_ms_last) == {"preprocess", "inference", "postprocess", "output", "total"}
    values = h4.processing_values()
    assert values["frames_out"] == "4" and values["processing_ms_p90"] == "150.000"


def test_hung_inference_shows_as_consecutive_delay(bag_frames):
    clock = FakeClock()
    seg = GatedSegmenter()
    runner = Runner(seg, settings=RunnerSettings(budget_ms=100.0, max_consecutive_delay_ms=1000.0),
                    clock=clock)
    runner.start()
    try:
        runner.submit(clone(bag_frames[0], NS))
        assert seg.entered.acquire(timeout=5)
        clock.advance(1500.0)
        h = runner.health()
        assert h.in_flight == 1 and h.consecutive_delay_ms == pytest.approx(1500.0)
        assert h.processing_status()[0] == ERROR
        seg.release.release()
        wait_for(lambda: runner.health().frames_out == 1)
    finally:
        assert runner.stop(5.0)


# ------------------------------------------------------------------------------------ thread budget


def test_thread_budget_from_config():
    cfg = Config()
    assert ThreadBudget.from_config(cfg, adapting=False, cpus=2) == ThreadBudget(2, 0, 0)
    # Niced adaptation: the kernel protects inference, which keeps every CPU.
    assert ThreadBudget.from_config(cfg, adapting=True, cpus=2) == ThreadBudget(2, 1, 10)
    cfg.runtime.adapt_nice = 0  # no priority: the adaptation threads' CPUs are left out instead
    assert ThreadBudget.from_config(cfg, adapting=True, cpus=2) == ThreadBudget(1, 1, 0)
    assert ThreadBudget.from_config(cfg, adapting=True, cpus=16) == ThreadBudget(15, 1, 0)
    cfg.runtime.threads = 3
    assert ThreadBudget.from_config(cfg, adapting=True, cpus=2) == ThreadBudget(3, 1, 0)


def test_adapter_threads_get_their_budget_and_inference_keeps_its_own(bag_frames):
    """The adapter's thread starts with adapt_threads torch threads and a raised nice value; the
    inference thread keeps inference_threads; the main thread's torch setting comes back."""
    seen: dict[str, object] = {}

    class ThreadedAdapter(FakeAdapter):
        def start(self):
            def work():
                seen["adapt_threads"] = torch.get_num_threads()
                seen["adapt_nice"] = thread_nice()

            self.t = threading.Thread(target=work)
            self.t.start()

        def stop(self, timeout_s):
            self.t.join(timeout_s)
            return not self.t.is_alive()

    class Probe(GatedSegmenter):
        def infer(self, frame):
            seen["inference_threads"] = torch.get_num_threads()
            seen["inference_nice"] = thread_nice()
            return super().infer(frame)

    before = torch.get_num_threads()
    base_nice = thread_nice()
    seg = Probe()
    budget = ThreadBudget(inference_threads=2, adapt_threads=1, adapt_nice=5)
    runner = Runner(seg, None, ThreadedAdapter(), settings=RunnerSettings(threads=budget))
    runner.start()
    try:
        runner.submit(clone(bag_frames[0], NS))
        assert seg.entered.acquire(timeout=5)
        seg.release.release()
        wait_for(lambda: runner.health().frames_out == 1)
    finally:
        assert runner.stop(5.0)
    assert seen["adapt_threads"] == 1 and seen["inference_threads"] == 2
    if base_nice is not None:
        assert seen["adapt_nice"] == min(19, base_nice + 5)
        assert seen["inference_nice"] == base_nice
    assert torch.get_num_threads() == before


def test_weight_swaps_run_on_a_normal_priority_thread(bag_frames):
    """With a niced adapter, the deployer runs backend.swap_weights on its own thread, started
    at normal priority where the pipeline was built (so engine threads a swap creates are not
    niced); the runner closes it on stop, after which a deploy runs on the caller's thread."""
    calls: list[tuple[str, int | None, object]] = []

    def swap_weights(state_dict):
        calls.append((threading.current_thread().name, thread_nice(), state_dict))

    deployer = WeightDeployer(swap_weights)

    class SwappingAdapter(FakeAdapter):
        def start(self):
            def work():
                deployer({"w": 1})  # as the real adapter does, every m steps
                self.done = True

            self.t = threading.Thread(target=work)
            self.t.start()

        def stop(self, timeout_s):
            self.t.join(timeout_s)
            return True

    base_nice = thread_nice()
    adapter = SwappingAdapter()
    runner = Runner(GatedSegmenter(), None, adapter, deployer=deployer,
                    settings=RunnerSettings(threads=ThreadBudget(0, 0, adapt_nice=5)))
    runner.start()
    wait_for(lambda: getattr(adapter, "done", False))
    assert runner.stop(5.0)
    assert calls and calls[0][0] == "pl3d-deploy" and calls[0][2] == {"w": 1}
    if base_nice is not None:
        assert calls[0][1] == base_nice
        assert deployer.last_deploy_nice == base_nice
    deployer({"w": 2})  # closed with the runner: runs on the caller's thread
    assert calls[-1][0] == threading.current_thread().name


# ------------------------------------------------------------------------------------ end to end


def test_real_segmenter_end_to_end_on_bag_frames(bag_frames):
    """A real Segmenter (small random network, torch backend) behind the runner; the output
    callback builds both output clouds the way the node does."""
    from pl3d_ros.pipeline import Segmenter
    from pl3d_ros.runtime.torch_backend import TorchBackend

    h = header()
    seg = Segmenter(TorchBackend(small_model(), h.input_shapes, device="cpu"), h, "product")
    clouds: list[tuple[int, int, int]] = []

    def output(frame, pred):
        s, v = output_arrays(frame, pred, h.class_set)
        clouds.append((frame.stamp_ns, s.shape[0], v.dtype.itemsize))
        assert np.array_equal(s["label"], pred.labels)

    timings = []
    runner = Runner(seg, output, settings=RunnerSettings(budget_ms=10_000.0),
                    on_timing=timings.append, stamp_clock=lambda: bag_frames[-1].stamp_ns)
    runner.start()
    try:
        for f in bag_frames:
            runner.submit(f)
            wait_for(lambda: runner.health().pending == 0, timeout=60)
        wait_for(lambda: runner.health().in_flight == 0, timeout=60)
    finally:
        assert runner.stop(10.0)
    health = runner.health()
    assert health.accounted and health.frames_out == len(clouds) >= 1
    assert health.frames_out + health.frames_dropped == 4
    assert all(n == f.num_points for (stamp, n, _), f in
               zip(clouds, [f for f in bag_frames if f.stamp_ns in {c[0] for c in clouds}]))
    assert {c[2] for c in clouds} == {28}  # visualization point: 24 bytes + packed rgb
    assert [t.stamp_ns for t in timings] == [c[0] for c in clouds]
    assert {"preprocess", "inference", "postprocess", "output", "total"} <= set(timings[0].stages_ms)
    assert health.pipeline_latency_ms_last is not None and health.pipeline_latency_ms_last >= 0.0


def test_no_pipeline_latency_while_the_sim_clock_is_unset(bag_frames):
    """With use_sim_time the ROS clock reads 0 until the first /clock message: no latency then."""
    clock_ns = {"now": 0}
    runner = Runner(SleepySegmenter(0.0), None, stamp_clock=lambda: clock_ns["now"])
    runner.start()
    try:
        runner.submit(clone(bag_frames[0], 5 * NS))
        wait_for(lambda: runner.health().frames_out == 1)
        assert runner.health().pipeline_latency_ms_last is None
        clock_ns["now"] = 6 * NS
        runner.submit(clone(bag_frames[1], 5 * NS + 1))
        wait_for(lambda: runner.health().frames_out == 2)
        assert runner.health().pipeline_latency_ms_last == pytest.approx(1000.0, abs=1e-3)
    finally:
        assert runner.stop(5.0)


def test_background_service_work_returns_at_once():
    gate = threading.Event()

    class Slow(FakeAdapter):
        def reset(self):
            gate.wait(10)
            super().reset()

    adapter = Slow()
    runner = Runner(SleepySegmenter(0.0), None, adapter)
    t0 = time.monotonic()
    fut = runner.in_background("reset_adaptation", runner.reset_adaptation)
    assert time.monotonic() - t0 < 0.2 and not fut.done()
    gate.set()
    fut.result(timeout=5)
    assert adapter.resets == 1
    runner.stop(1.0)
