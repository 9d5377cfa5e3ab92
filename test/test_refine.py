"""Tests of pl3d_ros.refine: mask providers, MLA, GAPP, refine_pseudo_labels, connectivity filter."""

from __future__ import annotations

import datetime
import warnings
from dataclasses import replace
from functools import partial

import numpy as np
import pytest

from pl3d_ros.config import ConnectivityConfig, RangeImageConfig, RefineConfig
from pl3d_ros.frame import CameraModel
from pl3d_ros.geometry import project_points
from pl3d_ros.refine import (
    ComponentFilter,
    MaskProvider,
    MaskProviderError,
    MobileSamProvider,
    SamProvider,
    SuperpixelProvider,
    assign_mask_labels,
    build_mask_provider,
    fit_gmm_1d,
    mask_areas,
    point_mask_ids,
    propagate,
    refine_pseudo_labels,
    resolve_overlaps,
)
from pl3d_ros.refine.masks import load_state_dict

SENSOR = RangeImageConfig()  # HDL-64: vertical resolution 28 deg / 64 = 7.6 mrad


def assert_valid_mask_image(ids: np.ndarray, shape: tuple[int, int]) -> None:
    assert ids.shape == shape and ids.dtype == np.int32
    assert ids.min() >= -1
    present = np.unique(ids[ids >= 0])
    # Dense ids: 0 .. K-1 all present.
    np.testing.assert_array_equal(present, np.arange(present.size))


# -- mask providers ----------------------------------------------------------------------------


def test_superpixels_cover_the_image_and_follow_a_colour_edge():
    rng = np.random.default_rng(0)
    img = np.zeros((60, 80, 3), dtype=np.uint8)
    img[:, :40] = (200, 30, 30)
    img[:, 40:] = (20, 30, 200)
    img = np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)
    provider = SuperpixelProvider(scale=200.0, sigma=0.8, min_size=50)
    ids = provider.masks(img)
    assert isinstance(provider, MaskProvider) and provider.name == "superpixel"
    assert_valid_mask_image(ids, (60, 80))
    assert ids.min() == 0  # superpixels tile the image: no -1
    # No superpixel straddles the colour edge.
    assert not set(np.unique(ids[:, :40])) & set(np.unique(ids[:, 40:]))
    with pytest.raises(ValueError):
        provider.masks(img.astype(np.float32))
    with pytest.raises(ValueError):
        provider.masks(img[..., 0])


def test_build_mask_provider_defaults_to_superpixels():
    provider = build_mask_provider(RefineConfig())
    assert isinstance(provider, SuperpixelProvider)
    assert (provider.scale, provider.sigma, provider.min_size) == (200.0, 0.8, 200)


def test_smallest_mask_wins_overlaps():
    h, w = 20, 30
    big = np.zeros((h, w), bool)
    big[:, :25] = True  # columns 25.. are in no mask
    medium = np.zeros((h, w), bool)
    medium[2:12, 2:20] = True
    small = np.zeros((h, w), bool)
    small[4:8, 4:8] = True
    hidden = np.zeros((h, w), bool)
    hidden[5:7, 5:7] = True  # inside `small` but larger than nothing there: fully covered below
    tiny = np.zeros((h, w), bool)
    tiny[5:7, 5:7] = True  # same pixels as `hidden`: equal area, lower index wins

    ids = resolve_overlaps([big, medium, small, hidden, tiny], (h, w))
    assert_valid_mask_image(ids, (h, w))
    # hidden (index 3) beats tiny (index 4) on the tie; tiny vanishes, ids stay dense (0..3).
    assert ids.max() == 3
    assert (ids[5:7, 5:7] == 3).all()
    small_only = small & ~hidden
    assert (ids[small_only] == 2).all()
    assert (ids[medium & ~small] == 1).all()
    assert (ids[big & ~medium] == 0).all()
    assert (ids[:, 25:] == -1).all()
    # The partition does not depend on the order the masks come in.
    shuffled = resolve_overlaps([small, tiny, big, hidden, medium], (h, w))
    for a in np.unique(ids):
        region = ids == a
        assert np.unique(shuffled[region]).size == 1
    assert resolve_overlaps([], (3, 4)).tolist() == [[-1] * 4] * 3
    np.testing.assert_array_equal(mask_areas(ids), np.bincount(ids[ids >= 0]))


# -- SAM / MobileSAM with randomly initialised weights ---------------------------------------


def _sam_vit_b_small(img_size: int = 128):
    """The real ViT-B SAM (segment_anything classes, ViT-B widths/depth/heads), random weights,
    at a 128-px input instead of 1024 so the encoder runs in about a second on a CPU."""
    import torch
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    torch.manual_seed(0)
    return Sam(
        image_encoder=ImageEncoderViT(
            depth=12, embed_dim=768, img_size=img_size, mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=12, patch_size=16,
            qkv_bias=True, use_rel_pos=True, global_attn_indexes=[2, 5, 8, 11], window_size=14,
            out_chans=256,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=256, image_embedding_size=(img_size // 16, img_size // 16),
            input_image_size=(img_size, img_size), mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
            transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )


@pytest.fixture(scope="module")
def mobile_sam_model():
    """The full MobileSAM vit_t network (TinyViT needs its 1024-px input), random weights."""
    pytest.importorskip("mobile_sam")
    import torch

    with warnings.catch_warnings():  # mobile_sam re-registers timm model names on import
        warnings.simplefilter("ignore")
        from mobile_sam import sam_model_registry
    torch.manual_seed(0)
    return sam_model_registry["vit_t"](checkpoint=None)


def _small_image() -> np.ndarray:
    rng = np.random.default_rng(1)
    img = np.zeros((48, 64, 3), dtype=np.uint8)
    img[:, 32:] = 220
    return np.clip(img + rng.normal(0, 10, img.shape), 0, 255).astype(np.uint8)


@pytest.mark.slow
def test_sam_provider_runs_end_to_end_with_random_weights():
    pytest.importorskip("segment_anything")
    # Filters off: random weights predict low IoU, and the point is to exercise every step.
    provider = SamProvider(model=_sam_vit_b_small(), points_per_side=4,
                           pred_iou_thresh=0.0, stability_score_thresh=0.0)
    assert provider.name == "sam"
    ids = provider.masks(_small_image())
    assert_valid_mask_image(ids, (48, 64))


@pytest.mark.slow
def test_mobile_sam_provider_runs_end_to_end_with_random_weights(mobile_sam_model):
    provider = MobileSamProvider(model=mobile_sam_model, points_per_side=4,
                                 pred_iou_thresh=0.0, stability_score_thresh=0.0)
    assert provider.name == "mobile_sam"
    ids = provider.masks(_small_image())
    assert_valid_mask_image(ids, (48, 64))


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_mobile_sam_checkpoint_loads_weights_only(tmp_path, mobile_sam_model, suffix):
    import torch

    state = {k: v.detach().clone().contiguous() for k, v in mobile_sam_model.state_dict().items()}
    path = tmp_path / f"mobile_sam{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)
    provider = MobileSamProvider(str(path), points_per_side=2)
    name = "mask_decoder.iou_prediction_head.layers.0.weight"
    torch.testing.assert_close(provider.model.state_dict()[name], state[name])

    # The same file through the config: auto picks MobileSAM for vit_t.
    cfg = RefineConfig(sam_checkpoint=str(path), sam_model_type="vit_t", sam_points_per_side=2)
    assert isinstance(build_mask_provider(cfg), MobileSamProvider)


def test_missing_or_corrupt_checkpoint_raises(tmp_path):
    import torch  # the file is read before segment_anything / mobile_sam are imported

    with pytest.raises(MaskProviderError, match="not found"):
        SamProvider(str(tmp_path / "nope.pth"), "vit_b", 4)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(MaskProviderError, match="not a readable"):
        SamProvider(str(garbage), "vit_b", 4)
    bad_st = tmp_path / "garbage.safetensors"
    bad_st.write_bytes(b"\xff" * 64)
    with pytest.raises(MaskProviderError, match="not a readable"):
        SamProvider(str(bad_st), "vit_l", 4)
    # A pickle with non-tensor objects: refused by weights_only, never executed.
    unsafe = tmp_path / "unsafe.pth"
    torch.save({"w": torch.zeros(1), "when": datetime.datetime(2024, 1, 1)}, unsafe)
    with pytest.raises(MaskProviderError):
        SamProvider(str(unsafe), "vit_h", 4)
    no_tensors = tmp_path / "no_tensors.pth"
    torch.save({"epoch": 3}, no_tensors)
    with pytest.raises(MaskProviderError, match="state dict of tensors"):
        SamProvider(str(no_tensors), "vit_b", 4)
    # A training checkpoint with the weights under "model" is unwrapped.
    nested = tmp_path / "nested.pth"
    torch.save({"model": {"w": torch.ones(2)}, "epoch": 3}, nested)
    assert list(load_state_dict(nested)) == ["w"]
    with pytest.raises(MaskProviderError, match="model type"):
        SamProvider(str(garbage), "vit_t", 4)
    with pytest.raises(MaskProviderError, match="checkpoint"):
        SamProvider("", "vit_b", 4)
    # The config path raises the same error instead of silently falling back.
    with pytest.raises(MaskProviderError):
        build_mask_provider(RefineConfig(sam_checkpoint=str(tmp_path / "nope.pth")))
    with pytest.raises(MaskProviderError):
        build_mask_provider(RefineConfig(sam_checkpoint=str(garbage), sam_model_type="vit_t"))


@pytest.mark.slow
def test_checkpoint_not_fitting_the_architecture_raises(tmp_path):
    pytest.importorskip("mobile_sam")
    import torch

    path = tmp_path / "other.pth"
    torch.save({"encoder.weight": torch.zeros(4, 4)}, path)
    with pytest.raises(MaskProviderError, match="does not fit"):
        MobileSamProvider(str(path), 4)


# -- MLA ---------------------------------------------------------------------------------------


def _mask_points(spec: list[tuple[int, list[int]]]) -> tuple[np.ndarray, np.ndarray]:
    """Points per mask: spec[k] = (num_points, labels of the first points); rest unlabeled."""
    mask_id, labels = [], []
    for k, (n, labs) in enumerate(spec):
        mask_id += [k] * n
        labels += list(labs) + [-1] * (n - len(labs))
    return np.array(mask_id, np.int64), np.array(labels, np.int64)


def test_mla_rules_each_reject_what_they_should():
    cfg = RefineConfig()
    spec = [
        (20, [3] * 10),            # 0 kept: 10/10 pure, 10/20 representative
        (9, [3] * 9),              # 1 size: |P_k| 9 < 10
        (30, [3] * 2),             # 2 size: |L_k| 2 < 3
        (20, [1] * 7 + [2] * 3),   # 3 purity 0.7 < 0.8
        (20, [1] * 8 + [2] * 2),   # 4 kept: purity exactly 0.8
        (60, [4] * 11),            # 5 representativity 11/60 < 0.2
        (50, [4] * 10),            # 6 kept: representativity exactly 0.2
        (20, [5] * 10),            # 7 area: 30 % of the image
        (20, [2] * 5 + [6] * 5),   # 8 purity, tie broken to the lower class (2)
    ]
    mask_id, labels = _mask_points(spec)
    # Extra points outside every mask and a mask (9) with no points at all.
    mask_id = np.concatenate([mask_id, [-1, -1]])
    labels = np.concatenate([labels, [0, -1]])
    areas = np.full(10, 100)
    areas[7] = 3000
    res = assign_mask_labels(mask_id, labels, areas, image_area=10000, cfg=cfg)

    np.testing.assert_array_equal(res.mask_class, [3, -1, -1, -1, 1, -1, 4, -1, -1, -1])
    assert list(res.rejected_by) == ["", "size", "size", "purity", "", "representativity", "",
                                     "area", "purity", "size"]
    assert res.rejected == {"size": 3, "purity": 2, "representativity": 1, "area": 1}
    assert res.num_kept == 3 and res.num_masks == 10
    assert res.majority[8] == 2 and res.votes[8] == 5
    np.testing.assert_array_equal(res.num_points[:3], [20, 9, 30])
    np.testing.assert_array_equal(res.num_labeled[:3], [10, 9, 2])
    # Thresholds come from the config.
    loose = assign_mask_labels(mask_id, labels, areas, 10000, replace(cfg, mla_purity=0.5, mla_max_area=0.5))
    assert loose.mask_class[3] == 1 and loose.mask_class[7] == 5 and loose.mask_class[8] == 2


# -- GAPP on a constructed scene ---------------------------------------------------------------

CAR, BUILDING = 0, 1


def _camera() -> CameraModel:
    # LiDAR x forward, y left, z up -> optical x right, y down, z forward.
    T = np.eye(4)
    T[:3, :3] = [[0.0, -1.0, 0.0], [0.0, 0.0, -1.0], [1.0, 0.0, 0.0]]
    K = np.array([[100.0, 0.0, 79.5], [0.0, 100.0, 59.5], [0.0, 0.0, 1.0]])
    return CameraModel(K, 160, 120, T)


def car_and_wall_scene():
    """A car-like cluster at ~10 m in front of a wall at 20 m, one mask over the car that
    bleeds 3 px over its silhouette onto the wall, and one mask over the rest of the image.

    Returns a dict with points, depth, pixels, in_view, mask_image, labels, is_car, in_car_mask.
    """
    camera = _camera()
    # Car: a curved front (bumper bending back 0.3 m at its sides), 0.1 m grid.
    ys, zs = np.meshgrid(np.arange(-1.0, 1.0001, 0.1), np.arange(-1.0, 0.5001, 0.1))
    car = np.stack([10.0 + 0.3 * ys.ravel() ** 2, ys.ravel(), zs.ravel()], axis=1)
    # Wall: 0.4 m grid.
    ys, zs = np.meshgrid(np.arange(-6.0, 6.0001, 0.4), np.arange(-3.0, 3.0001, 0.4))
    wall = np.stack([np.full(ys.size, 20.0), ys.ravel(), zs.ravel()], axis=1)

    def pix(xyz):
        proj = project_points(xyz, camera)
        assert proj.in_view.all()
        return np.floor(proj.uv + 0.5).astype(np.int64), proj.depth

    car_px, _ = pix(car)
    u0, v0 = car_px.min(axis=0)
    u1, v1 = car_px.max(axis=0)
    wall_px, _ = pix(wall)
    occluded = (wall_px[:, 0] >= u0) & (wall_px[:, 0] <= u1) & (wall_px[:, 1] >= v0) & (wall_px[:, 1] <= v1)
    wall = wall[~occluded]

    points = np.concatenate([car, wall]).astype(np.float32)
    is_car = np.arange(points.shape[0]) < car.shape[0]
    proj = project_points(points, camera)
    pixels = np.floor(proj.uv + 0.5).astype(np.int64)
    mask_image = np.ones((camera.height, camera.width), np.int32)  # mask 1: the rest (too big)
    margin = 3
    mask_image[v0 - margin : v1 + margin + 1, u0 - margin : u1 + margin + 1] = 0
    in_car_mask = mask_image[pixels[:, 1], pixels[:, 0]] == 0

    labels = np.full(points.shape[0], -1, np.int64)
    car_idx = np.flatnonzero(is_car)
    labels[car_idx[::3]] = CAR  # a third of the car carries a confident base label
    labels[~in_car_mask & ~is_car] = BUILDING  # the visible wall outside the car mask
    return dict(points=points, depth=proj.depth.astype(np.float32), pixels=pixels,
                in_view=proj.in_view, mask_image=mask_image, labels=labels, is_car=is_car,
                in_car_mask=in_car_mask)


def _refine(scene, cfg=None, **kw):
    return refine_pseudo_labels(scene["points"], scene["depth"], scene["pixels"], scene["in_view"],
                                scene["mask_image"], scene["labels"], SENSOR, cfg or RefineConfig(), **kw)


def test_gapp_labels_the_object_and_not_the_background_through_the_mask():
    s = car_and_wall_scene()
    wall_in_mask = s["in_car_mask"] & ~s["is_car"]
    assert wall_in_mask.sum() > 20 and s["in_car_mask"][s["is_car"]].all()

    res = _refine(s)
    st = res.stats
    assert st["masks_total"] == 2 and st["masks_kept"] == 1 and st["rejected_area"] == 1
    assert (res.labels[s["is_car"]] == CAR).all()  # the whole car
    assert (res.labels[wall_in_mask] == -1).all()  # the wall seen through the mask's edge
    assert (res.labels[~s["in_car_mask"]] == BUILDING).all()  # base labels untouched
    assert (res.component[s["is_car"]] == 0).all()  # seeds and propagated points
    assert (res.component[~s["is_car"]] == -1).all()
    n_car = int(s["is_car"].sum())
    assert st["points_added"] == n_car - int((s["labels"][s["is_car"]] == CAR).sum())
    assert 1 <= st["gapp_rounds"] <= RefineConfig().gapp_max_rounds
    assert st["labeled_after"] == st["labeled_before"] + st["points_added"]
    assert st["density_after"] > st["density_before"]

    # Without GAPP (naive MLA) the mask's wall points get the car label too.
    naive = _refine(s, gapp=False)
    assert (naive.labels[s["in_car_mask"]] == CAR).all()
    assert (naive.component[s["in_car_mask"]] == 0).all()
    assert naive.stats["points_added"] == st["points_added"] + int(wall_in_mask.sum())
    assert naive.stats["gapp_rounds"] == 0


def test_gapp_depth_gate_blocks_what_the_radius_would_allow():
    s = car_and_wall_scene()
    wall_in_mask = s["in_car_mask"] & ~s["is_car"]
    # A radius that spans car-to-wall: only the depth gate (max(0.5, 0.05 * 20) = 1 m) holds.
    wide = RefineConfig(gapp_radius_m=15.0)
    res = _refine(s, wide)
    assert (res.labels[s["is_car"]] == CAR).all()
    assert (res.labels[wall_in_mask] == -1).all()
    opened = _refine(s, replace(wide, gapp_depth_abs_m=20.0))
    assert (opened.labels[wall_in_mask] == CAR).all()


def test_gapp_protects_confident_labels():
    s = car_and_wall_scene()
    car_idx = np.flatnonzero(s["is_car"])
    wrong = car_idx[1:60:3][:5]  # 5 unlabeled car points get a confident wrong label
    s["labels"][wrong] = BUILDING  # purity stays above 0.8
    for gapp in (True, False):
        res = _refine(s, gapp=gapp)
        assert (res.labels[wrong] == BUILDING).all()
        assert (res.component[wrong] == -1).all()
        assert res.stats["points_relabeled"] == 0
        off = _refine(s, RefineConfig(protect_confident=False), gapp=gapp)
        assert (off.labels[wrong] == CAR).all()
        assert (off.component[wrong] == 0).all()
        assert off.stats["points_relabeled"] == 5


def _line(n: int, spacing: float, x: float = 10.0) -> np.ndarray:
    return np.stack([np.full(n, x), np.arange(n) * spacing, np.zeros(n)], axis=1).astype(np.float32)


def test_gapp_rounds_are_bounded_and_stop_when_nothing_is_added():
    pts = _line(30, 0.25)  # 0.25 m apart, r = 0.3 m at 10 m: one neighbour per round
    depth = pts[:, 0].copy()
    mask_id = np.zeros(30, np.int64)
    labels = np.full(30, -1, np.int64)
    labels[0] = 2
    mask_class = np.array([2])
    res = propagate(pts, depth, mask_id, labels, mask_class, SENSOR, RefineConfig(gapp_max_rounds=10))
    assert res.rounds == 10 and res.added == 10
    np.testing.assert_array_equal(res.labels[:11], 2)
    np.testing.assert_array_equal(res.labels[11:], -1)
    np.testing.assert_array_equal(res.component, np.where(np.arange(30) <= 10, 0, -1))

    res = propagate(pts, depth, mask_id, labels, mask_class, SENSOR, RefineConfig(gapp_max_rounds=100))
    assert res.rounds == 29 and (res.labels == 2).all()

    # A gap of 1 m stops propagation: the round after the gap adds nothing.
    gap = pts.copy()
    gap[15:, 1] += 1.0
    res = propagate(gap, depth, mask_id, labels, mask_class, SENSOR, RefineConfig(gapp_max_rounds=100))
    assert res.rounds == 14 and (res.labels[:15] == 2).all() and (res.labels[15:] == -1).all()


def test_gapp_radius_grows_with_range_and_never_crosses_masks():
    # 0.5 m spacing: out of reach at 10 m (r = 0.3 m), in reach at 30 m (r = 3 * 30 * 7.6 mrad = 0.69 m).
    for x, reached in ((10.0, False), (30.0, True)):
        pts = _line(5, 0.5, x)
        labels = np.array([1, -1, -1, -1, -1])
        res = propagate(pts, pts[:, 0], np.zeros(5, np.int64), labels, np.array([1]), SENSOR, RefineConfig())
        assert (res.labels == 1).all() == reached

    # Two touching masks: mask 0 seeded at its start, mask 1 (kept, class 2) seeded only beyond
    # a gap. Mask 0's seeds must not reach mask 1's points next to them.
    pts = _line(20, 0.2)
    pts[19, 1] += 2.0
    mask_id = np.repeat([0, 1], 10)
    labels = np.full(20, -1, np.int64)
    labels[0] = 0
    labels[19] = 2
    res = propagate(pts, pts[:, 0], mask_id, labels, np.array([0, 2]), SENSOR, RefineConfig(gapp_max_rounds=50))
    np.testing.assert_array_equal(res.labels[:10], 0)
    np.testing.assert_array_equal(res.labels[10:19], -1)
    assert res.labels[19] == 2 and res.component[19] == 1


def test_point_mask_ids_and_input_checks():
    mask_image = np.array([[0, 1], [-1, 2]], np.int32)
    pixels = np.array([[0, 0], [1, 0], [0, 1], [1, 1], [99, 99]])
    in_view = np.array([True, True, True, True, False])
    np.testing.assert_array_equal(point_mask_ids(pixels, in_view, mask_image), [0, 1, -1, 2, -1])
    in_view[4] = True
    with pytest.raises(ValueError, match="outside"):
        point_mask_ids(pixels, in_view, mask_image)


# -- connectivity filter -----------------------------------------------------------------------


def _components(losses: np.ndarray, classes: np.ndarray, per: int = 5, seed: int = 0):
    """Points of components with the given mean losses (per points each) plus 7 free points."""
    rng = np.random.default_rng(seed)
    comp = np.repeat(np.arange(losses.size), per)
    labels = np.repeat(classes, per)
    noise = rng.normal(0.0, 0.01, comp.size)
    noise -= np.bincount(comp, noise)[comp] / per  # exact component means
    loss = losses[comp] + noise
    # Points in no component: kept whatever their loss.
    comp = np.concatenate([comp, np.full(7, -1)])
    labels = np.concatenate([labels, np.full(7, 3)])
    loss = np.concatenate([loss, np.full(7, 50.0)])
    return comp, labels, loss.astype(np.float32)


def test_gmm_separates_bimodal_component_losses():
    rng = np.random.default_rng(0)
    clean = np.abs(rng.normal(0.2, 0.05, 30))
    noisy = rng.normal(2.0, 0.2, 10)
    losses = np.concatenate([clean, noisy])
    classes = rng.integers(0, 3, losses.size)
    gmm = fit_gmm_1d(losses)
    assert gmm is not None
    np.testing.assert_allclose(gmm.means, [clean.mean(), noisy.mean()], atol=0.05)
    np.testing.assert_allclose(gmm.weights, [0.75, 0.25], atol=0.02)

    filt = ComponentFilter(ConnectivityConfig(buffer_frames=5, min_components=20))
    comp, labels, loss = _components(losses, classes)
    keep = filt.filter(comp, labels, loss)
    assert filt.last_stats["mode"] == "gmm"
    assert filt.last_stats["components"] == 40 and filt.last_stats["dropped"] == 10
    np.testing.assert_array_equal(keep[comp >= 0], np.repeat(np.arange(40) < 30, 5))
    assert keep[comp < 0].all()
    assert fit_gmm_1d(np.full(10, 0.3)) is None


def test_median_rule_with_few_components():
    losses = np.array([0.1, 0.2, 0.3, 5.0, 1.0, 1.1, 1.2])
    classes = np.array([0, 0, 0, 0, 1, 1, 1])
    # Class medians 0.25 and 1.1, their mean 0.675: drop 5.0 (class 0) and 1.2 (class 1); 0.3
    # exceeds its class median but not the mean, 1.1 is not above its own median.
    filt = ComponentFilter(ConnectivityConfig(min_components=20))
    comp, labels, loss = _components(losses, classes)
    keep = filt.filter(comp, labels, loss)
    assert filt.last_stats["mode"] == "median"
    expected = np.array([True, True, True, False, True, True, False])
    np.testing.assert_array_equal(keep[comp >= 0], np.repeat(expected, 5))
    assert keep[comp < 0].all()
    assert filt.last_stats["dropped"] == 2 and filt.last_stats["points_dropped"] == 10


def test_component_buffer_slides_over_frames_and_resets():
    filt = ComponentFilter(ConnectivityConfig(buffer_frames=2, min_components=20))
    rng = np.random.default_rng(3)
    modes, buffered = [], []
    for frame in range(3):
        comp, labels, loss = _components(rng.uniform(0.1, 1.0, 10), np.zeros(10, np.int64), seed=frame)
        filt.filter(comp, labels, loss)
        modes.append(filt.last_stats["mode"])
        buffered.append(filt.last_stats["buffered"])
    assert modes == ["median", "gmm", "gmm"] and buffered == [10, 20, 20]
    filt.reset()
    assert filt.buffered == 0 and filt.last_stats["components"] == 0
    # No components at all: everything kept.
    keep = filt.filter(np.full(4, -1), np.zeros(4, np.int64), np.ones(4, np.float32))
    assert keep.all() and filt.last_stats["mode"] == "none"


def test_refine_components_feed_the_filter():
    s = car_and_wall_scene()
    res = _refine(s)
    loss = np.where(res.component == 0, 3.0, 0.1).astype(np.float32)
    keep = ComponentFilter(ConnectivityConfig()).filter(res.component, res.labels, loss)
    # One component only: its class median is its own loss, so the median rule keeps it.
    assert keep.all()
