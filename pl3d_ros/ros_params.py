"""The node's ROS parameters and QoS presets, without ROS: what ``node.py`` declares and reads.

Every leaf of :class:`~pl3d_ros.config.Config` is one read-only parameter under its dotted name,
typed from the dataclass annotation and described from the setting's declaration (one text for
``config/pl3d.yaml``, the JSON schema and ``ros2 param describe``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pl3d_ros import registry
from pl3d_ros.config import Config, ConfigError, Leaf, leaves

#: rclpy Parameter.Type member names by Python type of a setting.
_ROS_SCALAR_TYPES = {bool: "BOOL", int: "INTEGER", float: "DOUBLE", str: "STRING"}


@dataclass(frozen=True)
class ParameterSpec:
    """One ROS parameter of the node: a leaf of the Config tree.

    type_name is the rclpy ``Parameter.Type`` member (BOOL, INTEGER, DOUBLE, STRING,
    BOOL_ARRAY, INTEGER_ARRAY, DOUBLE_ARRAY, STRING_ARRAY), taken from the dataclass annotation
    so that an empty list default still gets its element type. ``constraints`` is the text for
    ParameterDescriptor.additional_constraints (allowed values).
    """

    name: str
    default: Any
    type_name: str
    description: str = ""
    constraints: str = ""

    @property
    def ros_default(self) -> Any:
        """The default as the declared ROS type wants it (rclpy infers the type from the value:
        an int in a DOUBLE setting would make it INTEGER)."""
        if self.type_name == "DOUBLE":
            return float(self.default)
        if self.type_name == "DOUBLE_ARRAY":
            return [float(v) for v in self.default]
        return list(self.default) if isinstance(self.default, list) else self.default

    @property
    def declare_by_type(self) -> bool:
        """True for an empty-list default: rclpy would infer BYTE_ARRAY from ``[]``, so declare
        the parameter by type (it stays unset unless overridden, and reads back as None)."""
        return isinstance(self.default, list) and not self.default


def ros_type(leaf: Leaf) -> str:
    """The rclpy Parameter.Type member name of a setting."""
    if leaf.type is list:
        if leaf.item_type not in _ROS_SCALAR_TYPES:
            raise TypeError(f"setting {leaf.name}: cannot map list element type {leaf.item_type!r} to ROS")
        return _ROS_SCALAR_TYPES[leaf.item_type] + "_ARRAY"
    if leaf.type not in _ROS_SCALAR_TYPES:
        raise TypeError(f"setting {leaf.name}: no ROS parameter type for {leaf.type!r}")
    return _ROS_SCALAR_TYPES[leaf.type]


def parameter_specs(cfg: Config | None = None) -> list[ParameterSpec]:
    """Every leaf of the Config tree as a ParameterSpec, in ``Config.flat()`` order; ``cfg`` gives
    the defaults (default: ``Config()``)."""
    values = (cfg if cfg is not None else Config()).flat()
    out = []
    for leaf in leaves(Config):
        value = values[leaf.name]
        out.append(ParameterSpec(leaf.name, list(value) if isinstance(value, list) else value,
                                 ros_type(leaf), leaf.description, leaf.limits_text()))
    return out


def flat_from_parameters(values: Mapping[str, Any], specs: Sequence[ParameterSpec]) -> dict[str, Any]:
    """Parameter values as read back from ROS -> a flat dict for ``Config.from_flat``.

    None (an unset parameter: declared by type, or an empty ``[]`` override, which the ROS YAML
    parser cannot type) becomes the default; arrays (``array.array``, tuples) become lists.
    """
    out: dict[str, Any] = {}
    for spec in specs:
        value = values.get(spec.name)
        if value is None:
            value = list(spec.default) if isinstance(spec.default, list) else spec.default
        elif spec.type_name.endswith("_ARRAY") and not isinstance(value, list):
            value = list(value)
        out[spec.name] = value
    return out


def config_from_parameters(values: Mapping[str, Any],
                           specs: Sequence[ParameterSpec] | None = None) -> Config:
    """Validated Config from ROS parameter values (ConfigError names the bad setting)."""
    return Config.from_flat(flat_from_parameters(values, specs or parameter_specs()))


def qos_settings(preset: str, depth: int) -> dict[str, Any]:
    """A QoS preset name (``qos.input`` / ``qos.output``) -> plain settings for rclpy's QoSProfile.

    sensor_data is ROS's rmw_qos_profile_sensor_data (BEST_EFFORT, VOLATILE, KEEP_LAST); a
    RELIABLE subscriber receives nothing from a BEST_EFFORT publisher, so inputs default to it.
    """
    if preset not in registry.QOS_PRESETS:
        raise ConfigError(f"unknown QoS preset {preset!r}; choose from {registry.QOS_PRESETS}")
    if depth <= 0:
        raise ConfigError(f"QoS depth must be positive, got {depth}")
    return {"reliability": "reliable" if preset == "reliable" else "best_effort",
            "durability": "volatile", "history": "keep_last", "depth": int(depth)}
