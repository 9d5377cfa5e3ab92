import numpy as np
import pytest
import yaml

from pl3d_ros.config import Config, ConfigError
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
    assert flat["sensor.rows"] == 64 and flat["sync.slop_s"] == 0.05
    flat["sensor.cols"] = 1024
    assert Config.from_flat(flat).sensor.cols == 1024
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump({"pl3d": {"ros__parameters": {"sensor": {"rows": 32}}}}))
    assert Config.from_yaml(p).sensor.rows == 32


@pytest.mark.parametrize("data, msg", [
    ({"sensor": {"rowz": 3}}, "unknown setting"),
    ({"sensor": {"rows": "64"}}, "integer"),
    ({"sensor": {"fov_up_deg": -30.0}}, "must exceed"),
    ({"sync": {"slop_s": 0}}, "positive"),
    ({"class_set": "nope"}, "unknown"),
])
def test_config_errors(data, msg):
    with pytest.raises(ConfigError, match=msg):
        Config.from_dict(data)
