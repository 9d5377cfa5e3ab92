"""Pictures of the segmentation (eval/pictures.py) and the report pages (eval/html_report.py): pixels
against the projection, error colours, the frame choice, and the files a replay, `pl3d eval` and the
demo page write and reference."""

import re
from pathlib import Path

import numpy as np
import pytest

from pl3d_ros.eval import pictures as P
from pl3d_ros.eval.html_report import markdown_to_html
from pl3d_ros.geometry import project_points
from pl3d_ros.labels import load_class_set
from fakes import synthetic_frame

CS = load_class_set("xmuda10")


def _frame_and_prediction(seed: int = 0, n: int = 1500):
    """A synthetic frame, its train-id ground truth (a tenth set to no class) and a prediction
    that is right on about 70 % of the points."""
    f = synthetic_frame(seed, n=n)
    gt = CS.to_train_ids(f.labels).copy()
    g = np.random.default_rng(1000 + seed)  # not the frame's own stream: errors independent of geometry
    gt[g.random(n) < 0.1] = CS.ignore_index
    labels = np.where(g.random(n) < 0.7, gt, g.integers(0, CS.num_classes, n)).astype(np.uint8)
    labels[labels >= CS.num_classes] = 4
    return f, gt, P.PredictedLabels(labels, project_points(f.points, f.camera).in_view)


def _nearest_per_pixel(f, in_view):
    """{(row, col): index of the nearest in-view point projecting there} by a plain loop-free
    reference (lexsort by pixel, then depth)."""
    proj = project_points(f.points, f.camera)
    idx = np.flatnonzero(in_view)
    pix = proj.pixels(f.camera.width, f.camera.height)[idx]
    order = np.lexsort((proj.depth[idx], pix[:, 0], pix[:, 1]))
    pix, idx = pix[order], idx[order]
    first = np.ones(len(idx), bool)
    first[1:] = np.any(pix[1:] != pix[:-1], axis=1)
    return pix[first], idx[first]


def test_camera_overlay_puts_the_nearest_points_colour_at_its_projected_pixel():
    f, gt, pred = _frame_and_prediction()
    geom = P.PictureGeometry.of(f, pred.in_view, radius=0)
    img = P.camera_overlay(f, pred, CS, gt, geometry=geom)
    h, w = f.camera.height, f.camera.width
    # 128 px wide: prediction and ground truth side by side, each under a title bar, over a legend
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[1] == 2 * w + P.GAP_PX
    assert img.shape[0] > P.TITLE_PX + h
    pred_panel = img[P.TITLE_PX:P.TITLE_PX + h, :w]
    gt_panel = img[P.TITLE_PX:P.TITLE_PX + h, w + P.GAP_PX:2 * w + P.GAP_PX]
    pix, idx = _nearest_per_pixel(f, pred.in_view)
    assert len(idx) > 100
    np.testing.assert_array_equal(pred_panel[pix[:, 1], pix[:, 0]], CS.colorize(pred.labels[idx]))
    np.testing.assert_array_equal(gt_panel[pix[:, 1], pix[:, 0]], CS.colorize(gt[idx]))
    empty = np.ones((h, w), bool)
    empty[pix[:, 1], pix[:, 0]] = False
    assert pred_panel[empty].max() <= 0.45 * 255 + 1  # no point: the dimmed image


def test_rasterize_nearest_on_top_squares_clipped_at_the_border():
    rows, cols = np.array([5, 6, 0, 9]), np.array([5, 6, 0, 9])
    ras = P.rasterize(rows, cols, rank=np.array([2.0, 1.0, 5.0, 5.0]), shape=(10, 10), radius=1)
    colors = np.array([[10, 0, 0], [20, 0, 0], [30, 0, 0], [40, 0, 0]], np.uint8)
    out = ras.paint(np.zeros((10, 10, 3), np.uint8), colors)
    assert out[5, 5, 0] == 20 and out[6, 6, 0] == 20  # point 1 is nearer: its square covers point 0's centre
    assert out[4, 4, 0] == 10  # ...but not point 0's far corner
    assert (out[:2, :2, 0] == 30).all() and (out[8:, 8:, 0] == 40).all()  # clipped squares
    assert np.count_nonzero(out[..., 0]) == 9 + 9 - 4 + 4 + 4  # 3x3 + 3x3 overlapping in 4, two 2x2


def test_bev_draws_every_point_at_its_place_with_ego_at_the_centre():
    f, gt, _ = _frame_and_prediction()
    x = f.points[:, 0]
    # car for points ahead, road behind: a square 1.5 px wide cannot cross from one side to the other
    pred = P.PredictedLabels(np.where(x > 0, 0, 4).astype(np.uint8), np.zeros(len(x), bool))
    geom = P.PictureGeometry.of(f, pred.in_view)
    img = P.bev(f, pred, CS, None, geometry=geom)
    size, res = P.BEV_SIZE_PX, 2 * P.BEV_EXTENT_M / P.BEV_SIZE_PX
    assert img.shape[1] == size and img.shape[0] > P.TITLE_PX + size
    assert tuple(img[P.TITLE_PX + size // 2 - 2, size // 2]) == P.FOV_COLOR  # the ego marker
    assert tuple(img[P.TITLE_PX + 3, 3]) == P.BACKGROUND  # beyond the synthetic cloud's 25 m
    panel = geom.bev.paint(geom.bev_base, CS.colorize(pred.labels))  # the points, without the lines and text
    rows = np.floor((P.BEV_EXTENT_M - x) / res).astype(int)
    cols = np.floor((P.BEV_EXTENT_M - f.points[:, 1]) / res).astype(int)
    far = np.abs(x) > 0.5
    np.testing.assert_array_equal(panel[rows[far], cols[far]], CS.colorize(pred.labels[far]))


def test_fov_rays_bound_the_in_view_points():
    f = synthetic_frame(0)
    (lx, ly), (rx, ry) = P.fov_rays(f.camera)
    half = np.degrees(np.arctan(64 / 60.0))  # half the image width over fx: 46.8 deg
    assert np.degrees(np.arctan2(ly, lx)) == pytest.approx(half, abs=0.5)
    assert np.degrees(np.arctan2(ry, rx)) == pytest.approx(-half, abs=0.5)
    proj = project_points(f.points, f.camera)
    az = np.degrees(np.arctan2(f.points[proj.in_view, 1], f.points[proj.in_view, 0]))
    assert az.max() <= half + 0.5 and az.min() >= -half - 0.5


def test_error_colours_and_the_error_view():
    pred = np.array([0, 1, 2, 3])
    gt = np.array([0, 2, CS.ignore_index, 3])
    np.testing.assert_array_equal(P.error_colors(pred, gt, CS.num_classes),
                                  [P.CORRECT_COLOR, P.WRONG_COLOR, P.UNLABELLED_COLOR, P.CORRECT_COLOR])
    f, gt, p = _frame_and_prediction(seed=1)
    geom = P.PictureGeometry.of(f, p.in_view, radius=0)
    img = P.error_view(f, p, CS, gt, geometry=geom)
    h, w = f.camera.height, f.camera.width
    panel = img[P.TITLE_PX:P.TITLE_PX + h, :w]
    pix, idx = _nearest_per_pixel(f, p.in_view)
    got = panel[pix[:, 1], pix[:, 0]]
    wrong, unlabelled = p.labels[idx] != gt[idx], gt[idx] == CS.ignore_index
    assert wrong.sum() > 10 and (~wrong).sum() > 10 and unlabelled.sum() > 3
    assert (got[wrong & ~unlabelled] == P.WRONG_COLOR).all()
    assert (got[~wrong & ~unlabelled] == P.CORRECT_COLOR).all()
    assert (got[unlabelled] == P.UNLABELLED_COLOR).all()
    assert img.shape[1] <= P.MAX_WIDTH


def test_wide_images_are_stacked_and_downscaled_to_the_width_limit():
    f, gt, pred = _frame_and_prediction()
    img = P.camera_overlay(f, pred, CS, gt, max_width=200)  # two 128-px panels do not fit: stacked
    assert img.shape[1] == 128 and img.shape[0] > 2 * (64 + P.TITLE_PX)
    img = P.camera_overlay(f, pred, CS, None, max_width=100)  # downscaled
    assert img.shape[1] == 100


@pytest.mark.parametrize("expected, n, seqs", [
    (7, 7, [0, 3, 6]),  # known length: the true middle
    (None, 7, [0, 2, 6]),  # unknown: candidates 2 and 4 are equally near 3, the earlier wins
    (None, 30, [0, 16, 29]),
    (None, 2, [0, 1]), (None, 1, [0]), (10, 4, [0, 3]),  # fewer frames than expected: no middle came
])
def test_sampler_chooses_first_middle_last_and_keeps_few_frames(tmp_path, expected, n, seqs):
    import dataclasses

    f, gt, pred = _frame_and_prediction(n=200)
    for draw_now in (True, False):
        out = tmp_path / f"now{draw_now}"
        s = P.PictureSampler(out, CS, expected=expected, draw_now=draw_now)
        for i in range(n):
            s.offer(dataclasses.replace(f, seq=i), pred, gt if i % 2 == 0 else None)
            held = [k for k in s._kept + [s._last] if k is not None and k.frame is not None]
            assert len(held) <= 4
        chosen = s.close()
        assert [c["seq"] for c in chosen] == seqs
        assert chosen[0]["role"] == "first" and (n == 1 or chosen[-1]["role"] == "last")
        for c in chosen:  # odd frames were offered without ground truth: no error picture
            assert set(c["files"]) == ({"camera", "bev", "errors"} if c["seq"] % 2 == 0 else {"camera", "bev"})
        written = sorted(p.name for p in (out / "pictures").iterdir())
        assert written == sorted(Path(r).name for c in chosen for r in c["files"].values())


def test_repeated_seqs_of_two_inputs_get_distinct_files(tmp_path):
    import dataclasses

    f, gt, pred = _frame_and_prediction(n=200)
    s = P.PictureSampler(tmp_path, CS, expected=4)
    for seq in (0, 1, 0, 1):  # two inputs of two frames, as `pl3d eval --data A B` reads them
        s.offer(dataclasses.replace(f, seq=seq), pred, gt)
    chosen = s.close()
    assert [c["seq"] for c in chosen] == [0, 1, 1]
    names = [c["files"]["camera"] for c in chosen]
    assert len(set(names)) == 3 and all((tmp_path / n).is_file() for n in names)


def test_markdown_subset_renders_tables_code_images_and_escapes():
    html = markdown_to_html("# T <x>\n\n- a `b<c>` **d**\n\n| k | v |\n|---|---|\n| x | 1 |\n\n"
                            "```\n<raw>\n```\n\n![alt](p/q.png)\n\n| a | b |\n|---|---|\n| ![1](a.png) | ![2](b.png) |\n")
    assert "<h1>T &lt;x&gt;</h1>" in html and "<code>b&lt;c&gt;</code>" in html and "<strong>d</strong>" in html
    assert "<table><tr><th>k</th><th>v</th></tr><tr><td>x</td><td>1</td></tr></table>" in html
    assert "<pre>&lt;raw&gt;</pre>" in html and 'src="p/q.png"' in html
    assert '<table class="figures">' in html  # pictures side by side fill the page


def _assert_page_refs_exist(page: Path) -> list[str]:
    text = page.read_text()
    refs = re.findall(r'(?:src|href)="([^"]+)"', text)
    assert refs and not re.search(r'(?:src|href)="(?:https?:)?//', text)  # nothing external
    for ref in refs:
        assert (page.parent / ref).exists(), ref
    return refs


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from pl3d_ros.models.checkpoint import save_checkpoint
    from fakes import header, small_model

    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "small.safetensors", small_model(), header())


@pytest.mark.slow
def test_replay_writes_pictures_that_its_report_and_page_show(synthetic_bag, ckpt, tmp_path):
    from pl3d_ros.config import Config
    from pl3d_ros.eval.replay import ReplayOptions, replay

    cfg = Config().replace(**{"adapt.method": "source", "runtime.backend": "torch", "runtime.threads": 1})
    m = replay(synthetic_bag, ckpt, tmp_path / "r", ReplayOptions(config=cfg, write_bag=False))
    assert [(p["seq"], p["role"]) for p in m["pictures"]] == [(0, "first"), (1, "middle"), (2, "last")]
    report = (tmp_path / "r" / "report.md").read_text()
    for p in m["pictures"]:
        assert set(p["files"]) == {"camera", "bev", "errors"} and p["draw_ms"] > 0
        for rel in p["files"].values():
            assert (tmp_path / "r" / rel).stat().st_size > 1000 and f"]({rel})" in report
    refs = _assert_page_refs_exist(tmp_path / "r" / "index.html")
    assert "confusion_fused.png" in refs and "pictures/frame_000001_bev.png" in refs
    assert "<table>" in (tmp_path / "r" / "index.html").read_text()  # the report's tables, rendered

    off = replay(synthetic_bag, ckpt, tmp_path / "off", ReplayOptions(config=cfg, write_bag=False, pictures=False))
    assert off["pictures"] == [] and not (tmp_path / "off" / "pictures").exists()
    _assert_page_refs_exist(tmp_path / "off" / "index.html")


@pytest.mark.slow
def test_eval_command_writes_pictures_and_an_index(synthetic_bag, ckpt, tmp_path):
    from pl3d_ros import cli

    out = tmp_path / "eval"
    assert cli.main(["eval", str(ckpt), "--data", str(synthetic_bag), "--out", str(out), "--backend", "torch",
                     "--threads", "1"]) == 0
    refs = _assert_page_refs_exist(out / "index.html")
    assert {"confusion_fused.png", "pictures/frame_000000_camera.png", "pictures/frame_000002_errors.png"} <= set(refs)
    assert "pictures/frame_000001_bev.png" in (out / "report.md").read_text()


def test_demo_page_shows_both_methods_pictures_of_the_same_frames_side_by_side(tmp_path):
    from pl3d_ros.demo import write_demo_index

    pictures = {}
    for m in ("source", "full"):
        pictures[m] = []
        for seq, role in ((0, "first"), (4, "last")):
            files = {k: f"pictures/frame_{seq:06d}_{k}.png" for k in P.PICTURE_KINDS}
            for rel in files.values():
                P.save_png(np.zeros((4, 4, 3), np.uint8), tmp_path / m / rel)
            pictures[m].append({"seq": seq, "role": role, "files": files})
        (tmp_path / m / "index.html").write_text("")
    P.save_png(np.zeros((4, 4, 3), np.uint8), tmp_path / "miou_over_frames.png")
    row = {"miou": {"fused": 20.0, "2d": 21.0, "3d": 10.0}, "miou_all_points": {"fused": 17.0},
           "latency_ms": {"total": {"p50": 160.0}}}
    summary = {"preset": "mixed", "frames": 5, "seed": 7, "checkpoint": "m.safetensors", "wall_s": 1.0,
               "methods": {"source": row, "full": row}}
    page = write_demo_index(tmp_path, summary, pictures)
    refs = _assert_page_refs_exist(page)
    assert "source/index.html" in refs and "miou_over_frames.png" in refs
    text = page.read_text()
    # one row per kind: source's picture, then full's, of the same frame
    (row,) = [r for r in re.findall(r"<tr>.*?</tr>", text) if "source/pictures/frame_000004_bev.png" in r]
    assert row.index("source/pictures/frame_000004_bev.png") < row.index("full/pictures/frame_000004_bev.png")
    assert row.count("<td>") == 2
