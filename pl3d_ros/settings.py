"""How a setting is declared, checked and flattened: the machinery behind ``pl3d_ros.config``.

A leaf is declared with :func:`setting` (default, one-line description, unit, limits, choices);
:func:`leaves` lists a tree's leaves as :class:`Leaf` records, which validation, the ROS parameter
specs, the params file and its JSON schema all read. :class:`Root` is a tree that loads from YAML
or dotted names and validates every leaf against its declaration.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A setting is unknown, has the wrong type, or is out of range."""


# --------------------------------------------------------------------------------------------------
# Declaring a setting
# --------------------------------------------------------------------------------------------------

Choices = Sequence[str] | Callable[[], Sequence[str]]


def setting(default: Any, doc: str, *, unit: str = "", min: float | None = None,
            max: float | None = None, gt: float | None = None, choices: Choices | None = None,
            items: Choices | None = None, lengths: tuple[int, ...] | None = None,
            open_choices: bool = False) -> Any:
    """A leaf of the settings tree: dataclasses.field with the setting's description and limits.

    doc: one line, shown in the params file, the JSON schema and ``ros2 param describe``.
    unit: e.g. "m", "s", "ms", "deg", "px" (shown after the description).
    min / max: inclusive bounds; gt: exclusive lower bound (e.g. a learning rate > 0).
    choices: allowed strings (a sequence, or a callable reading a registry lazily).
    items: allowed strings of each element of a list setting.
    lengths: allowed lengths of a list setting.
    open_choices: choices are suggestions (e.g. a class-set name or a path), not a closed set.
    """
    meta = {"doc": doc, "unit": unit, "min": min, "max": max, "gt": gt, "choices": choices,
            "items": items, "lengths": lengths, "open_choices": open_choices}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def section() -> Any:
    """A nested section of the tree (its description is the dataclass's docstring)."""
    return dataclasses.field(default_factory=lambda: None, metadata={"section": True})


def _choices(value: Choices | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    return tuple(value() if callable(value) else value)


@dataclass(frozen=True)
class Leaf:
    """One setting as the tools see it: dotted name, Python type, default and its metadata."""

    name: str
    type: type
    item_type: type | None
    default: Any
    doc: str
    unit: str = ""
    min: float | None = None
    max: float | None = None
    gt: float | None = None
    choices: tuple[str, ...] | None = None
    items: tuple[str, ...] | None = None
    lengths: tuple[int, ...] | None = None
    open_choices: bool = False

    @property
    def description(self) -> str:
        """The one-line description with unit and limits, as ROS and the params file show it."""
        parts = [self.doc.rstrip(".")]
        if self.unit:
            parts[0] += f", {self.unit}"
        limits = self.limits_text()
        if limits:
            parts.append(limits)
        return "; ".join(parts)

    def limits_text(self) -> str:
        out = []
        if self.choices and not self.open_choices:
            out.append("one of " + " | ".join(self.choices))
        if self.items:
            out.append("items from " + " ".join(self.items))
        lo = f"> {self.gt:g}" if self.gt is not None else (f">= {self.min:g}" if self.min is not None else "")
        hi = f"<= {self.max:g}" if self.max is not None else ""
        if lo and hi and self.min is not None:
            out.append(f"in [{self.min:g}, {self.max:g}]")
        elif lo or hi:
            out.append(" and ".join(x for x in (lo, hi) if x))
        if self.lengths:
            out.append("length " + " or ".join(str(n) for n in self.lengths))
        return ", ".join(out)


def section_doc(cls: type) -> str:
    """The first paragraph of a section's docstring, on one line."""
    return " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())


def leaves(root: type | Any) -> list[Leaf]:
    """Every leaf of a settings tree (a root dataclass or an instance), in declaration order."""
    return list(_leaves(root if isinstance(root, type) else type(root)))


@functools.lru_cache(maxsize=None)
def _leaves(cls: type) -> tuple[Leaf, ...]:
    out: list[Leaf] = []

    def walk(prefix: str, c: type) -> None:
        hints = typing.get_type_hints(c)
        for f in dataclasses.fields(c):
            hint = hints[f.name]
            if f.metadata.get("section"):
                walk(f"{prefix}{f.name}.", hint)
                continue
            m = f.metadata
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            base = typing.get_origin(hint) or hint
            args = typing.get_args(hint)
            out.append(Leaf(prefix + f.name, base, args[0] if base is list and args else None, default,
                            m["doc"], m["unit"], m["min"], m["max"], m["gt"], _choices(m["choices"]),
                            _choices(m["items"]), m["lengths"], m["open_choices"]))

    walk("", cls)
    return tuple(out)


def sections(root: type) -> list[tuple[str, type]]:
    """(dotted name, dataclass) of every nested section, in declaration order."""
    out: list[tuple[str, type]] = []

    def walk(prefix: str, c: type) -> None:
        hints = typing.get_type_hints(c)
        for f in dataclasses.fields(c):
            if f.metadata.get("section"):
                out.append((prefix + f.name, hints[f.name]))
                walk(f"{prefix}{f.name}.", hints[f.name])

    walk("", root)
    return out


def _init_sections(obj: Any) -> None:
    """Replace the None placeholders of ``section()`` fields by default instances."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        if f.metadata.get("section") and getattr(obj, f.name) is None:
            object.__setattr__(obj, f.name, hints[f.name]())


class Section:
    """Base of every section: default sub-sections, generic leaf validation from the metadata.

    ``key`` is the section's name in the tree, for error messages of a standalone ``validate``.
    """

    key: typing.ClassVar[str] = ""

    def __post_init__(self) -> None:
        _init_sections(self)

    def check(self) -> None:
        """Cross-setting rules a section adds to the per-leaf ones (override)."""

    def validate(self):
        """Coerce and check this section's own leaves, then ``check`` -> self (ConfigError)."""
        prefix = f"{self.key}." if self.key else ""
        for leaf in leaves(type(self)):
            if "." in leaf.name:
                continue  # a nested section validates itself (roots do it for the whole tree)
            named = dataclasses.replace(leaf, name=prefix + leaf.name)
            value = _coerce(getattr(self, leaf.name), named)
            _check_leaf(value, named)
            setattr(self, leaf.name, value)
        self.check()
        return self


def _coerce(value: Any, leaf: Leaf) -> Any:
    """``value`` as the leaf's type, or ConfigError. Numeric strings become numbers (YAML 1.1
    reads ``1e-3`` as a string); floats must be finite."""
    key, kind = leaf.name, leaf.type
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if kind in (int, float):
        return _number(value, kind, key)
    if kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    if kind is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        item = leaf.item_type
        if item in (int, float):
            return [_number(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        if item is str:
            bad = [v for v in value if not isinstance(v, str)]
            if bad:
                raise ConfigError(f"{key} must be a list of strings, got {value!r}")
        return list(value)
    return value


def _number(value: Any, kind: type, key: str) -> int | float:
    if isinstance(value, bool):
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if isinstance(value, str):
        text = value.strip()
        try:
            value = int(text) if kind is int else float(text)
        except ValueError:
            raise ConfigError(f"{key} must be {'an integer' if kind is int else 'a number'}, "
                              f"got {value!r}") from None
    if kind is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if not isinstance(value, (int, float)):
        raise ConfigError(f"{key} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value!r}")
    return value


def _check_leaf(value: Any, leaf: Leaf) -> None:
    key = leaf.name
    scalars = value if isinstance(value, list) else [value]
    if leaf.type in (int, float) or leaf.item_type in (int, float):
        for v in scalars:
            if leaf.gt is not None and not v > leaf.gt:
                raise ConfigError(f"{key} must be > {leaf.gt:g}, got {v}")
            if leaf.min is not None and v < leaf.min:
                raise ConfigError(f"{key} must be >= {leaf.min:g}, got {v}")
            if leaf.max is not None and v > leaf.max:
                raise ConfigError(f"{key} must be <= {leaf.max:g}, got {v}")
    if leaf.choices and not leaf.open_choices and value not in leaf.choices:
        raise ConfigError(f"{key} must be one of {', '.join(leaf.choices)}; got {value!r}")
    if leaf.items:
        unknown = sorted(set(value) - set(leaf.items))
        if unknown:
            raise ConfigError(f"{key} has unknown item(s) {unknown}; known: {', '.join(leaf.items)}")
    if leaf.lengths is not None and len(value) not in leaf.lengths:
        raise ConfigError(f"{key} must have {' or '.join(map(str, leaf.lengths))} items, "
                          f"got {len(value)}")


def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _set(obj: Any, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        obj = getattr(obj, part)
    setattr(obj, leaf, value)


class Root(Section):
    """Loading, validation and flattening shared by the roots."""

    def validate(self):
        """Coerce every leaf to its type and check it against its declaration, then the
        sections' cross-setting rules -> self (ConfigError names the first bad setting)."""
        for leaf in leaves(type(self)):
            value = _coerce(_get(self, leaf.name), leaf)
            _check_leaf(value, leaf)
            _set(self, leaf.name, value)
        for name, _ in sections(type(self)):
            _get(self, name).check()
        self.check()
        return self

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        """Build from a nested dict; unknown keys and wrong types raise ConfigError."""
        obj = cls()
        _fill(obj, data, "")
        return obj.validate()

    @classmethod
    def from_yaml(cls, path: str | Path):
        """A YAML file: nested settings, or a ROS 2 params file (``/**:`` / ``node:`` then
        ``ros__parameters:``)."""
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read config {path}: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"config {path} must hold a mapping, got {type(data).__name__}")
        if len(data) == 1:
            (inner,) = data.values()
            if isinstance(inner, dict) and "ros__parameters" in inner:
                data = inner["ros__parameters"] or {}
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Dotted name -> value: for Config, exactly the node's ROS parameters."""
        return {leaf.name: _get(self, leaf.name) for leaf in leaves(type(self))}

    @classmethod
    def from_flat(cls, flat: dict[str, Any]):
        """Inverse of ``flat``: dotted names (e.g. from ROS parameters) -> a validated root."""
        nested: dict[str, Any] = {}
        for key, value in flat.items():
            node = nested
            *parents, leaf = key.split(".")
            for p in parents:
                node = node.setdefault(p, {})
                if not isinstance(node, dict):
                    raise ConfigError(f"{key}: {'.'.join(parents)} is a setting, not a section")
            node[leaf] = value
        return cls.from_dict(nested)

    def replace(self, **dotted: Any):
        """A validated copy with some leaves changed: ``cfg.replace(**{"adapt.method": "tent"})``."""
        flat = self.flat()
        unknown = sorted(set(dotted) - set(flat))
        if unknown:
            raise ConfigError(f"unknown setting(s) {unknown}")
        flat.update(dotted)
        return type(self).from_flat(flat)


def _fill(obj: Any, data: Any, prefix: str) -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(obj)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown setting(s) {[prefix + u for u in unknown]}; "
                          f"known: {[prefix + n for n in fields]}")
    for name, value in data.items():
        if fields[name].metadata.get("section"):
            _fill(getattr(obj, name), value, f"{prefix}{name}.")
        else:
            setattr(obj, name, value)
