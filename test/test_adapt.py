"""The adapter and the methods end to end on small synthetic frames with a tiny network."""

import time

import numpy as np
import pytest
import torch

from fakes import bn_weights, confident_model, header, small_model, synthetic_frame
from pl3d_ros import registry
from pl3d_ros.adapt import Adapter, build_method
from pl3d_ros.adapt import terms as T
from pl3d_ros.adapt.state import frame_state
from pl3d_ros.config import AdaptConfig, Config, ConfigError, RefineConfig
from pl3d_ros.inputs import prepare
from pl3d_ros.models.checkpoint import read_header

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_cfg(refine: bool = False, **adapt) -> Config:
    """The tiny test network's config with every component of full on (the off-by-default ones
    too, so each is exercised, but the shift gate). refine=False keeps mask refinement off (no mla, gapp, connectivity)."""
    # gate left out: on the test frames it would stop learning (test_shift_gate.py exercises it)
    off = set(adapt.get("disable", [])) | (set() if refine else {"mla", "gapp", "connectivity"}) | {"gate"}
    if adapt.get("method", "full") == "full":  # the other methods have no components
        adapt.setdefault("enable", [c for c in registry.OFF_BY_DEFAULT if c not in off])
    return Config(class_set="xmuda10", adapt=AdaptConfig(**adapt),
                  refine=RefineConfig(mask_provider="superpixel", superpixel_scale=10.0,
                                      superpixel_min_size=20)).validate()


def test_full_every_component_on_with_superpixels():
    pytest.importorskip("skimage")
    cfg = make_cfg(refine=True, negative_rounds=2, steps_per_frame=2)
    assert all(cfg.adapt.enabled(c) for c in ("mla", "gapp", "connectivity", "negative", "erda", "xm",
                                               "restore", "guard"))
    ad = Adapter(confident_model(), header(), cfg, seed=0)
    source_bn = bn_weights(ad.method.models.source)
    stats = {}
    for i in range(2):
        stats = ad.step(synthetic_frame(i, seq=i))
        assert "error" not in stats, stats
    h = ad.health()
    assert h.errors == 0 and h.steps == 4 and h.frames == 2
    # masks were used, propagated, and the connectivity filter judged components
    assert stats["refine_masks_kept"] > 0 and stats["refine_points_added"] > 0
    assert stats["connectivity_components"] > 0
    assert h.refined_density > h.base_density > 0
    assert 0.0 <= h.base_precision <= 1.0 and h.refined_precision is not None
    for key in ("loss_ce", "loss_negative", "loss_erda", "loss_xm"):
        assert np.isfinite(stats[key])
    assert not torch.equal(bn_weights(ad.teacher), source_bn)
    totals = ad.pseudo_label_totals()
    assert totals["frames"] == 2 and totals["refined"]["labeled"] >= totals["base"]["labeled"]
    assert totals["filtered"]["labeled"] <= totals["refined"]["labeled"]
    assert len(totals["base"]["per_class"]["correct"]) == 10


def test_teacher_changes_and_on_weights_every_m_steps():
    calls = []
    cfg = make_cfg(swap_every_steps=2)
    ad = Adapter(confident_model(), header(), cfg, on_weights=calls.append, seed=0)
    src = ad.method.models.source
    for i in range(4):
        ad.step(synthetic_frame(i, seq=i))
    assert len(calls) == 2 and ad.health().weight_swaps == 2
    state = dict(calls[-1])
    from pl3d_ros.pipeline import FUSION_KEY

    assert state.pop(FUSION_KEY).shape == (2,)  # the shift-aware fusion deploys with the weights
    assert set(state) == set(src.state_dict()) and all(v.device.type == "cpu" for v in state.values())
    teacher = ad.teacher.state_dict()
    assert all(torch.equal(state[k], teacher[k]) for k in state)
    assert not torch.equal(bn_weights(ad.teacher), bn_weights(src))
    # what is deployed was learned: BN running statistics moved to the target frames' statistics
    key = next(k for k in state if k.endswith("running_mean"))
    assert not torch.equal(state[key], src.state_dict()[key])
    assert ad.health().errors == 0


def test_adapter_survives_an_exception_in_a_step_and_rolls_back():
    ad = Adapter(confident_model(), header(), make_cfg(), seed=0)
    real_step = ad.method.step
    calls = {"n": 0}

    def flaky(batch):
        calls["n"] += 1
        out = real_step(batch)  # the update happens, then the failure: it must be undone
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return out

    ad.method.step = flaky
    before = {k: v.clone() for k, v in ad.teacher.state_dict().items()}
    stats = ad.step(synthetic_frame(0))
    assert stats["error"] == "RuntimeError: boom"
    assert all(torch.equal(before[k], v) for k, v in ad.teacher.state_dict().items())
    assert "error" not in ad.step(synthetic_frame(1, seq=1))
    h = ad.health()
    assert h.errors == 1 and h.last_error == "RuntimeError: boom" and h.steps == 1 and h.frames == 2


def test_background_thread_keeps_going_after_errors():
    ad = Adapter(confident_model(), header(), make_cfg(method="tent"), seed=0)
    real_step = ad.method.step
    calls = {"n": 0}

    def flaky(batch):
        calls["n"] += 1
        if calls["n"] == 1:
            raise ValueError("bad frame")
        return real_step(batch)

    ad.method.step = flaky
    ad.start()
    assert ad.running
    deadline = time.monotonic() + 15.0
    i = 0
    while ad.health().steps < 1 and time.monotonic() < deadline:
        ad.offer(synthetic_frame(i, seq=i))
        i += 1
        time.sleep(0.05)
    assert ad.stop(10.0)
    h = ad.health()
    assert h.errors == 1 and h.steps >= 1 and not h.running


def test_offer_drops_the_oldest_when_full():
    ad = Adapter(small_model(), header(), make_cfg(buffer_frames=2, method="source"))
    frames = [synthetic_frame(i, n=200, seq=i) for i in range(3)]
    for f in frames:
        ad.offer(f)
    h = ad.health()
    assert h.frames_offered == 3 and h.frames_dropped == 1 and h.buffered == 2
    assert [f.seq for f, _ in ad._buffer] == [1, 2]


def test_collapse_guard_restores_the_source():
    calls = []
    cfg = make_cfg(collapse_window=2, swap_every_steps=100)
    ad = Adapter(small_model(), header(), cfg, on_weights=calls.append, seed=0)
    # a collapsed network: every point is class 0, whatever the input
    for net in (ad.method.models.teacher, ad.method.models.student):
        with torch.no_grad():
            net.image.head.bias[0] += 100.0
            net.range.head.bias[0] += 100.0
    s0 = ad.step(synthetic_frame(0))
    assert not s0["collapse"]  # the window is not full yet
    s1 = ad.step(synthetic_frame(1, seq=1))
    assert s1["collapse"] and s1["class_share"] == 1.0
    h = ad.health()
    assert h.collapse_restores == 1 and h.restores == 1 and h.errors == 0
    src = ad.method.models.source.state_dict()
    assert all(torch.equal(v, src[k]) for k, v in ad.teacher.state_dict().items())
    from pl3d_ros.pipeline import FUSION_KEY

    deployed = dict(calls[0])
    assert torch.equal(deployed.pop(FUSION_KEY), torch.zeros(2))  # the fusion is back to plain too
    assert len(calls) == 1 and all(torch.equal(v, src[k]) for k, v in deployed.items())
    assert not ad.step(synthetic_frame(2, seq=2))["collapse"]


def test_lockstep_is_deterministic_with_a_seed():
    pytest.importorskip("skimage")
    cfg = make_cfg(refine=True, restore_prob=0.3)  # restore draws random numbers every step

    def run(seed):
        ad = Adapter(confident_model(), header(), cfg, seed=seed)
        for i in range(2):
            assert "error" not in ad.step(synthetic_frame(i, seq=i))
        return ad.teacher.state_dict()

    a, b, c = run(7), run(7), run(8)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_checkpoint_save_and_resume(tmp_path):
    path = tmp_path / "adapted.safetensors"
    cfg = make_cfg(checkpoint_path=str(path), checkpoint_every_steps=2)
    ad = Adapter(confident_model(), header(), cfg, seed=0)
    ad.step(synthetic_frame(0))
    assert not path.exists()
    ad.step(synthetic_frame(1, seq=1))
    assert path.exists()
    info = read_header(path).training
    assert info["note"] == "test" and info["adaptation"]["steps"] == 2 and info["adaptation"]["method"] == "full"
    assert ad.stop(1.0)  # never started: still writes the final checkpoint
    saved = {k: v.clone() for k, v in ad.teacher.state_dict().items()}

    calls = []
    cfg2 = make_cfg(checkpoint_path=str(path), resume="adapted")
    ad2 = Adapter(confident_model(), header(), cfg2, on_weights=calls.append)
    assert ad2.health().resumed_from == str(path)
    assert all(torch.equal(saved[k], v) for k, v in ad2.teacher.state_dict().items())
    assert len(calls) == 1  # the backend gets the resumed weights at once
    ad2.reset()  # back to the true source, not the checkpoint
    src = confident_model().state_dict()
    assert all(torch.equal(src[k], v) for k, v in ad2.teacher.state_dict().items())
    assert len(calls) == 2 and ad2.health().restores == 1
    # missing checkpoint: start from the source
    cfg3 = make_cfg(checkpoint_path=str(tmp_path / "none.safetensors"), resume="adapted")
    assert Adapter(confident_model(), header(), cfg3).health().resumed_from is None


@pytest.mark.parametrize("method", ["source", "tent", "pl"])
def test_baselines_step(method):
    calls = []
    ad = Adapter(confident_model(), header(), make_cfg(method=method, swap_every_steps=1, steps_per_frame=3),
                 on_weights=calls.append)
    src_bn = bn_weights(ad.method.models.source)
    stats = ad.step(synthetic_frame(0))
    assert "error" not in stats
    h = ad.health()
    if method == "source":
        assert h.steps == 0 and not calls and torch.equal(bn_weights(ad.teacher), src_bn)
        return
    assert h.steps == 3  # every method gets the same step budget (tent too)
    assert len(calls) == h.steps
    assert not torch.equal(bn_weights(ad.teacher), src_bn)
    if method == "pl":
        assert 0 < h.base_density < 1 and h.base_precision is not None
        # no mean teacher: the deployed network is the adapted student
        assert torch.equal(bn_weights(ad.teacher), bn_weights(ad.method.models.student))


def test_full_takes_the_entropy_term_adapt_entropy_of_names():
    from pl3d_ros.adapt import terms as T

    for of, want in (("fused", T.FusedEntropy), ("branches", T.BranchEntropy)):
        method = build_method(make_cfg(entropy_of=of), confident_model(), header())
        kinds = [type(t) for t in method.terms if t.name == "entropy"]
        assert kinds == [want]


def test_negative_learning_uses_a_new_class_each_round():
    cfg = make_cfg(steps_per_frame=3, negative_rounds=2, negative_max_prob=1.0)
    method = build_method(cfg, confident_model(), header())
    state = frame_state(synthetic_frame(0), header(), "cpu")
    method.prepare(state)
    picked, shares = [], []
    for r in range(3):
        stats = method.step(state).as_dict()
        picked.append(state.negatives_used.sum(1).clone())
        shares.append(stats.get("negative"))
        assert ("loss_negative" in stats) == (r < 2)  # at most negative_rounds steps per frame
    unreliable_any = picked[0] > 0
    assert unreliable_any.any()
    # every point picked in round 1 got a class it did not have: the classes used grew by as
    # many as round 1 picked (a repeated class would leave its point's count as it was)
    grown = int((picked[1] - picked[0]).sum())
    assert grown == round(shares[1] * state.num_points) > 0
    assert int(picked[1].max()) == 2 and torch.equal(picked[2], picked[1])
    # the unreliable set moves a little between steps (the student's variance), not much
    assert (picked[1][unreliable_any] == 2).float().mean() > 0.9


def test_frame_state_uses_the_inference_inputs_and_gt():
    from pl3d_ros.pipeline import Segmenter
    from pl3d_ros.runtime.torch_backend import TorchBackend

    f = synthetic_frame(0)
    h = header()
    pred = Segmenter(TorchBackend(small_model(), h.input_shapes, device="cpu"), h, "product").infer(f)
    state = frame_state(f, h, "cpu", inputs=pred.inputs)
    assert state.inputs is pred.inputs  # handed over, not prepared a second time
    fresh = frame_state(f, h, "cpu")
    own = prepare(f, (h.model.image_width, h.model.image_height), h.sensor)
    assert torch.equal(fresh.inputs.range_image, own.range_image)
    assert torch.equal(fresh.inputs.range_image, pred.inputs.range_image)
    assert state.inputs.uv.shape == (int(own.in_view.sum()), 2) and state.num_points == f.num_points
    assert set(state.gt.unique().tolist()) == {0, 4, 7}  # car, road, building
    cam = state.camera_pixels()
    assert cam.pixels.shape == (f.num_points, 2) and cam.in_view.sum() > 0 and np.all(cam.depth[cam.in_view] > 0)


def test_threads_do_not_block_offer():
    ad = Adapter(confident_model(), header(), make_cfg(method="tent", buffer_frames=1))
    ad.start()
    t0 = time.perf_counter()
    for i in range(20):
        ad.offer(synthetic_frame(0, n=200, seq=i))
    assert time.perf_counter() - t0 < 1.0  # offer never waits for a step
    assert ad.stop(10.0)
    h = ad.health()
    # every frame offered was dropped, stepped, or is still waiting
    assert h.frames_offered == 20 and h.frames_dropped + h.frames + h.buffered == 20


def test_non_finite_weights_never_go_live():
    """A finite loss with NaN gradients would deploy a NaN teacher (every point labelled 0 with
    NaN confidence): the step is rolled back and counted, nothing non-finite reaches on_weights."""
    calls = []
    cfg = make_cfg(method="pl", swap_every_steps=1)
    ad = Adapter(confident_model(), header(), cfg, on_weights=calls.append, seed=0)
    student = ad.method.models.student
    bn = next(m for m in student.modules() if isinstance(m, torch.nn.BatchNorm2d))
    handle = bn.weight.register_hook(lambda g: torch.full_like(g, float("nan")))
    before = {k: v.clone() for k, v in ad.teacher.state_dict().items()}
    stats = ad.step(synthetic_frame(0))
    assert "non-finite weights" in stats["error"]
    assert all(torch.equal(before[k], v) for k, v in ad.teacher.state_dict().items())  # rolled back
    assert not calls and ad.health().errors == 1
    handle.remove()
    assert "error" not in ad.step(synthetic_frame(1, seq=1))  # and adaptation goes on
    assert len(calls) == 1 and all(torch.isfinite(v).all() for v in calls[0].values() if v.is_floating_point())


def test_a_deployed_network_with_non_finite_outputs_is_replaced_by_the_source():
    calls = []
    ad = Adapter(confident_model(), header(), make_cfg(method="pl", swap_every_steps=100),
                 on_weights=calls.append, seed=0)
    with torch.no_grad():  # finite weights, NaN outputs: a negative BN running variance
        bn = next(m for m in ad.method.models.teacher.range.modules() if isinstance(m, torch.nn.BatchNorm2d))
        bn.running_var.fill_(-1.0)
    stats = ad.step(synthetic_frame(0))
    assert "not finite" in stats["error"]
    src = ad.method.models.source.state_dict()
    assert all(torch.equal(v, src[k]) for k, v in ad.teacher.state_dict().items())
    assert len(calls) == 1 and ad.health().restores == 1
    assert "error" not in ad.step(synthetic_frame(1, seq=1))


def test_memory_batches_refresh_and_memory_steps():
    """With batch_frames 2 each step trains on the newest frame and one memory frame (one batched
    forward); memory frames are re-labelled by the teacher once their labels are old; a memory
    step needs no new frame."""
    pytest.importorskip("skimage")
    cfg = make_cfg(refine=True, batch_frames=2, memory_frames=2, memory_refresh_steps=2, steps_per_frame=2)
    ad = Adapter(confident_model(), header(), cfg, seed=0)
    seen = []
    real_step = ad.method.step

    def spy(batch):
        seen.append([st.index for st in batch])
        return real_step(batch)

    ad.method.step = spy
    for i in range(4):
        assert "error" not in ad.step(synthetic_frame(i, seq=i))
    assert seen[0] == [0] and seen[1] == [0]  # nothing in memory yet
    assert all(len(b) == 2 and b[0] == i // 2 for i, b in enumerate(seen[2:], start=2))
    assert all(b[1] < b[0] for b in seen[2:])  # the second frame comes from the memory
    h = ad.health()
    assert h.memory_frames == 2 and h.memory_mb > 0 and h.memory_refreshes >= 1 and h.errors == 0
    assert ad.memory.evicted == 2  # 4 frames into a memory of 2
    before = h.steps
    assert "error" not in ad.memory_step()
    assert ad.health().steps == before + 1 and ad.health().memory_steps == 1
    totals = ad.pseudo_label_totals()
    assert totals["trained"]["labeled"] > 0  # the split's targets are measured as a stage


def test_memory_is_bounded_in_bytes_and_cleared_on_reset():
    from pl3d_ros.adapt.memory import FrameMemory, state_bytes

    states = [frame_state(synthetic_frame(i, seq=i), header(), "cpu", i) for i in range(3)]
    size = state_bytes(states[0])
    mem = FrameMemory(max_frames=10, max_bytes=int(2.5 * size))
    for st in states:
        mem.add(st)
    assert len(mem) == 2 and mem.bytes <= 2.5 * size and mem.states() == states[1:]
    assert mem.sample(5, exclude=states[2]) == [states[1]]
    ad = Adapter(confident_model(), header(), make_cfg(method="pl", batch_frames=2), seed=0)
    ad.step(synthetic_frame(0))
    assert len(ad.memory) == 1
    ad.reset()
    assert len(ad.memory) == 0


@pytest.mark.parametrize("trainable", ["norm_heads", "all"])
def test_trainable_sets_and_their_learning_rates(trainable):
    ad = Adapter(confident_model(), header(), make_cfg(method="pl", trainable=trainable, other_lr_scale=0.5))
    groups = ad.method.models.optimizer.param_groups
    # per branch: its norm affines, then the rest
    assert [(g["branch"], g["lr"]) for g in groups] == [("image", 1e-3), ("image", 5e-4), ("range", 1e-3), ("range", 5e-4)]
    names = set(ad.method.models.params)
    heads = {n for n in names if ".head." in n}
    assert heads == {"image.head.weight", "image.head.bias", "range.head.weight", "range.head.bias"}
    from pl3d_ros.adapt.teacher import norm_parameter_names

    others = names - heads - norm_parameter_names(ad.method.models.student)
    assert bool(others) == (trainable == "all")  # convolutions only with "all"
    assert "error" not in ad.step(synthetic_frame(0))
    # TENT stays the baseline it is: normalisation layers only
    tent = Adapter(confident_model(), header(), make_cfg(method="tent", trainable=trainable))
    assert [g["lr"] for g in tent.method.models.optimizer.param_groups] == [1e-3, 1e-3]  # one per branch


def test_full_can_deploy_the_student():
    calls = []
    ad = Adapter(confident_model(), header(), make_cfg(deploy="student", swap_every_steps=1),
                 on_weights=calls.append, seed=0)
    ad.step(synthetic_frame(0))
    student = ad.method.models.student.state_dict()
    assert all(torch.equal(calls[-1][k], v) for k, v in student.items())
    assert not torch.equal(bn_weights(ad.method.models.teacher), bn_weights(ad.method.models.student))


def test_bf16_adaptation_steps():
    ad = Adapter(confident_model(), header(), make_cfg(precision="bf16"), seed=0)
    stats = ad.step(synthetic_frame(0))
    assert "error" not in stats and np.isfinite(stats["loss"])
    assert all(v.dtype == torch.float32 for v in ad.teacher.state_dict().values() if v.is_floating_point())


def test_every_n_frames_leaves_frames_out_in_lockstep():
    ad = Adapter(confident_model(), header(), make_cfg(method="tent", every_n_frames=3), seed=0)
    for i in range(7):
        ad.step(synthetic_frame(i, n=300, seq=i))
    assert ad.health().frames == 3 and ad.health().steps == 3  # frames 0, 3, 6


def test_full_mean_teacher_is_a_component_on_by_default():
    # mt on (the default): the teacher is the EMA of the student; adapt.disable mt: momentum 0,
    # the deployed teacher is the student after every step
    plain = Config(class_set="xmuda10", adapt=AdaptConfig(disable=["mla"])).validate()
    assert "mt" in plain.adapt.components() and "ce" not in plain.adapt.components()
    m = build_method(plain, confident_model(), header())
    assert m.models.momentum == plain.adapt.teacher_momentum == 0.999
    assert not any(isinstance(t, T.ReliableCE) for t in m.terms)
    no_mt = plain.replace(**{"adapt.disable": ["mt"], "adapt.enable": ["ce"]})
    m = build_method(no_mt, confident_model(), header())
    assert m.models.momentum == 0.0
    assert any(isinstance(t, T.ReliableCE) for t in m.terms)
    # the baselines are untouched by full's components
    tent = plain.replace(**{"adapt.method": "tent", "adapt.disable": []})
    assert build_method(tent, confident_model(), header()).models.momentum == 0.0


def test_full_without_entropy_learns_by_negative_learning_alone_and_skips_steps_with_nothing_to_learn():
    cfg = make_cfg(disable=["entropy"], enable=[], negative_rounds=1, steps_per_frame=2)
    assert cfg.adapt.components() == ["negative", "mt", "guard", "fusion", "shift_reset", "select"]
    ad = Adapter(confident_model(), header(), cfg, seed=0)
    stats = ad.step(synthetic_frame(0))
    assert "error" not in stats and ad.health().steps == 2  # step 2: no negative round left, no update
    with pytest.raises(ConfigError, match="no loss term"):
        make_cfg(disable=["entropy", "negative"], enable=[])
