import numpy as np
import pytest
import yaml

from pl3d_ros.config import Config, ConfigError, TrainingConfig
from pl3d_ros.labels import ClassSetError, available_class_sets, load_class_set
from conftest import kitti_sequence_dir


def test_shipped_class_sets():
    assert {"xmuda10", "semantickitti19"} <= set(available_class_sets())
    cs = load_class_set("xmuda10")
    assert cs.names == ("car", "truck", "bike", "person", "road", "parking", "sidewalk",
                        "building", "nature", "other-objects")
    raw = np.array([10, 252, 40, 60, 70, 71, 72, 0, 1, 13, 49, (7 << 16) | 30], np.uint32)
    np.testing.assert_array_equal(cs.to_train_ids(raw), [0, 0, 4, 4, 8, 8, 8, 255, 255, 255, 255, 3])
    assert cs.colorize(np.array([0, 255])).tolist() == [[100, 150, 245], [128, 128, 128]]


def test_semantickitti19_matches_the_dataset_learning_map():
    path = kitti_sequence_dir("00").parents[1] / "semantic-kitti.yaml"
    spec = yaml.safe_load(path.read_text())
    cs = load_class_set("semantickitti19")
    raw = np.array(sorted(spec["learning_map"]), np.uint32)
    expected = np.array([spec["learning_map"][int(r)] - 1 for r in raw])
    expected[expected < 0] = 255  # benchmark id 0 (unlabeled) is ignored
    np.testing.assert_array_equal(cs.to_train_ids(raw), expected)
    assert [spec["labels"][spec["learning_map_inv"][i + 1]] for i in range(19)] == list(cs.names)


def test_class_set_round_trip_and_errors(tmp_path):
    cs = load_class_set("xmuda10")
    again = type(cs).from_dict(cs.to_dict())
    np.testing.assert_array_equal(again.raw_to_train, cs.raw_to_train)
    bad = cs.to_dict()
    bad["classes"][1]["raw_ids"].append(10)  # car's raw id listed twice
    with pytest.raises(ClassSetError, match="both car and truck"):
        type(cs).from_dict(bad)
    with pytest.raises(ClassSetError, match="unknown class set"):
        load_class_set("nope")
    p = tmp_path / "mine.yaml"
    p.write_text(yaml.safe_dump({"name": "mine", "classes": [{"name": "a", "raw_ids": [1]}]}))
    assert load_class_set(str(p)).num_classes == 1


def test_config_flat_round_trip_and_ros_params_file(tmp_path):
    cfg = Config()
    flat = cfg.flat()
    assert flat["adapt.lr"] == 1e-3 and flat["sync.slop_s"] == 0.05
    assert not any(k.startswith(("sensor.", "model.")) for k in flat)  # the checkpoint decides those
    flat["sync.queue_size"] = 7
    assert Config.from_flat(flat).sync.queue_size == 7
    for key in ("pl3d", "/**"):  # a named node, or every node (the shipped file's key)
        p = tmp_path / "params.yaml"
        p.write_text(yaml.safe_dump({key: {"ros__parameters": {"sync": {"queue_size": 3}}}}))
        assert Config.from_yaml(p).sync.queue_size == 3
    # training settings: the sensor and network shape
    t = TrainingConfig.from_flat({"sensor.rows": 32, "model.preset": "gpu"})
    assert t.sensor.rows == 32 and t.model.preset == "gpu"


@pytest.mark.parametrize("data, msg", [
    ({"sync": {"slopp_s": 3}}, "unknown setting"),
    ({"sync": {"queue_size": "ten"}}, "integer"),
    ({"sync": {"queue_size": 2.5}}, "integer"),
    ({"sync": {"slop_s": 0}}, "> 0"),
    ({"sync": {"slop_s": float("nan")}}, "finite"),
    ({"adapt": {"lr": float("inf")}}, "finite"),
    ({"adapt": {"lr": -1e-3}}, "> 0"),
    ({"adapt": {"weight_erda": float("nan")}}, "finite"),
    ({"adapt": {"method": "cotta"}}, "one of source, tent, pl, full"),
    ({"adapt": {"disable": ["mla", "sam"]}}, "unknown item"),
    ({"runtime": {"backend": "openvino"}}, "one of onnxruntime"),
    ({"runtime": {"device": "gpu0"}}, "cpu, cuda or cuda:N"),
    ({"node": {"stop_timeout_s": float("inf")}}, "finite"),
    ({"frames": {"static_extrinsics": [1.0, "a"] + [0.0] * 14}}, r"static_extrinsics\[1\] must be a number"),
    ({"frames": {"static_extrinsics": [1.0] * 3}}, "16 items"),
    ({"refine": {"mask_provider": "sam"}}, "needs refine.sam_checkpoint"),
    ({"refine": {"sam_checkpoint": "/no/such/sam.pth"}}, "does not exist"),
    ({"class_set": "nope"}, "unknown"),
])
def test_config_errors(data, msg):
    with pytest.raises(ConfigError, match=msg):
        Config.from_dict(data)


@pytest.mark.parametrize("data, msg", [
    ({"sensor": {"rowz": 3}}, "unknown setting"),
    ({"sensor": {"rows": "sixty-four"}}, "integer"),
    ({"sensor": {"fov_up_deg": -30.0}}, "must exceed"),
    ({"model": {"image_width": 0}}, "image_width must be >= 1"),
    ({"model": {"image_width": 650}}, "divisible"),
])
def test_training_config_errors(data, msg):
    with pytest.raises(ConfigError, match=msg):
        TrainingConfig.from_dict(data)


def test_numeric_strings_are_numbers():
    """YAML 1.1 (PyYAML, and so many params files) reads 1e-3 as a string."""
    p = yaml.safe_load("adapt:\n  lr: 1e-3\n  steps_per_frame: '2'\n")
    assert isinstance(p["adapt"]["lr"], str)
    cfg = Config.from_dict(p)
    assert cfg.adapt.lr == 1e-3 and cfg.adapt.steps_per_frame == 2
