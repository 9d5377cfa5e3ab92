"""The streams of a ``pl3d bench`` grid, and the simulated drives behind its sim streams.

A stream is what one cell plays, start to end, as one online stream (``replay`` of its inputs in
a row: the adapter is never reset inside a stream):

* ``real``: recorded inputs (SemanticKITTI sequence folders or ROS 2 bags) played one after the
  other, under a corruption spec (``pl3d corruptions``, e.g. ``fog:3``).
* ``sim``: a continual drive (the CoTTA protocol): simulated domains (``pl3d sim --list``
  presets) of ``frames_per_domain`` frames each, played in a row as ONE stream, so the adapter
  carries what it learnt in one domain into the next. ``replay`` shifts each bag's stamps to follow
  the previous one (0.1 s later), so stamps increase across the domains.

Seeds. Seed k of the grid is the replay seed (the adapter's and the corruptions' draws) and, for a
sim stream, the world seed of every domain's bag: the domain bags of seed k are
``write_bag(preset, frames, seed=k)``. Presets that share a world layout (source, sensor, night,
fog) then drive the same streets, so consecutive domains differ in the shift only; ``layout`` and
``mixed`` have their own layout. Seeds 0, 1, 2 are three different drives.

Simulated bags are cached (``cache_root()``: $PL3D_CACHE/bench, else ~/.cache/pl3d_ros/bench, or
``pl3d bench --cache DIR``, on shared storage for a cluster) under a key of the preset, frame count,
seed and a hash of the simulator's source, so a changed simulator never serves a stale drive.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from pl3d_ros.config import ConfigError

KINDS = ("real", "sim")
STREAM_KEYS = {"name", "kind", "inputs", "corrupt", "model", "domains", "frames_per_domain", "description"}
#: Names become folder names (OUT/cells/<stream>/<method>/): no separators, no spaces.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


class GridError(ConfigError):
    """A grid spec that cannot run (names the file and the entry). A ConfigError, so the ``pl3d``
    command reports it as a one-line error."""


def check_name(name: Any, what: str) -> str:
    """``name`` if it is usable as a folder name, else GridError."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise GridError(f"{what} {name!r} must be a non-empty name of letters, digits and _.+- "
                        "(it becomes a folder name)")
    return name


@dataclass(frozen=True)
class SimBag:
    """One simulated domain drive: ``frames`` frames of ``preset`` with world seed ``seed``."""

    preset: str
    frames: int
    seed: int

    @property
    def key(self) -> str:
        return f"{self.preset}-n{self.frames}-s{self.seed}"

    def path(self, cache: Path) -> Path:
        """Where the bag lives in the cache (versioned by the simulator's source)."""
        return Path(cache) / f"sim-{sim_version()}" / self.key


@lru_cache(maxsize=1)
def sim_version() -> str:
    """8 hex digits of a hash over the simulator's source files (pl3d_ros/sim/*.py)."""
    h = hashlib.sha256()
    for path in sorted((Path(__file__).resolve().parents[1] / "sim").glob("*.py")):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:8]


@lru_cache(maxsize=64)
def file_digest(path: str) -> str:
    """16 hex digits of the sha256 of a checkpoint ("" = the bundled model): a cell's identity
    names the weights, not only their path, so a file replaced in place is not resumed."""
    if not path:
        from pl3d_ros.weights import default_model_path

        path = str(default_model_path())
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def cache_root(cache: str | Path | None = None) -> Path:
    """The bench cache: ``cache`` if given, else $PL3D_CACHE/bench, else ~/.cache/pl3d_ros/bench."""
    if cache:
        return Path(cache).expanduser()
    from pl3d_ros.demo import cache_dir

    return cache_dir() / "bench"


def simulate_bag(bag: SimBag, path: str) -> str:
    """Write ``bag`` to ``path`` unless it is there (a Ray task body); returns the path.

    ``write_bag`` writes into a hidden folder and renames it into place, so a bag that exists is
    complete; when another process finished the same bag first, its copy is used."""
    from pl3d_ros.io.bag import BagError
    from pl3d_ros.sim.sequence import write_bag

    out = Path(path)
    if out.exists():
        return str(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        write_bag(bag.preset, bag.frames, out, seed=bag.seed)
    except BagError:
        if not out.exists():
            raise
    return str(out)


@dataclass(frozen=True)
class StreamSpec:
    """One stream of a grid.

    name: the stream's name (a folder name); kind: real | sim; corrupt: corruption spec applied
    over the whole stream ("" = none); model: the source checkpoint ("" = the bundled model);
    inputs (real): absolute paths of the recordings, played in this order; domains (sim): presets
    in playing order; frames_per_domain (sim): frames of each domain, one per domain.
    """

    name: str
    kind: str
    corrupt: str = ""
    model: str = ""
    inputs: tuple[str, ...] = ()
    domains: tuple[str, ...] = ()
    frames_per_domain: tuple[int, ...] = ()
    description: str = ""

    @property
    def frames(self) -> int | None:
        """Frames of a sim stream (None for a real one: known once read)."""
        return sum(self.frames_per_domain) if self.kind == "sim" else None

    def played(self, max_frames: int | None) -> list[tuple[str, int, int]]:
        """(preset, first frame, frames) of each sim domain that a stream capped at ``max_frames``
        plays: domains past the cap are not simulated, the last one reached only up to it."""
        out, start = [], 0
        for preset, n in zip(self.domains, self.frames_per_domain):
            if max_frames is not None:
                n = min(n, max_frames - start)
            if n <= 0:
                break
            out.append((preset, start, n))
            start += n
        return out

    def bags(self, seed: int, max_frames: int | None) -> list[SimBag]:
        """The simulated drives seed ``seed`` of this sim stream plays (world seed = ``seed``)."""
        return [SimBag(preset, n, seed) for preset, _, n in self.played(max_frames)]

    def identity(self, seed: int, max_frames: int | None) -> dict[str, Any]:
        """What a cell of this stream plays (compared on resume)."""
        base = {"stream": self.name, "kind": self.kind, "corrupt": self.corrupt}
        if self.kind == "real":
            return base | {"inputs": list(self.inputs)}
        return base | {"domains": [b.key for b in self.bags(seed, max_frames)], "sim_version": sim_version()}


def resolve_path(path: Any, root: Path, what: str) -> Path:
    """``path`` made absolute against the grid's ``root`` (~ expanded); GridError when empty."""
    if not isinstance(path, str) or not path.strip():
        raise GridError(f"{what} must be a non-empty path, got {path!r}")
    p = Path(path).expanduser()
    return (p if p.is_absolute() else root / p).resolve()


def resolve_model(model: Any, root: Path, what: str, check: bool = True) -> str:
    """A checkpoint path of the grid: "" stays "" (the bundled model); else absolute, and it must
    exist when ``check``."""
    if model is None or model == "":
        return ""
    p = resolve_path(model, root, what)
    if check and not p.is_file():
        raise GridError(f"{what} {p} does not exist (\"\" = the bundled model)")
    return str(p)


def _names(value: Any, error: str) -> list[Any]:
    """A non-empty list (one string is a list of one), else GridError(error)."""
    value = [value] if isinstance(value, str) else value
    if not isinstance(value, list) or not value:
        raise GridError(error)
    return value


def parse_stream(entry: Any, where: str, root: Path, default_model: str, check_inputs: bool = True) -> StreamSpec:
    """One entry of a grid's ``streams`` list -> StreamSpec, or GridError naming ``where``.

    root: the folder relative paths resolve against; default_model: the grid's ``model``;
    check_inputs: the inputs and the checkpoint must exist (off for structure-only checks)."""
    from pl3d_ros.eval.corruptions import CorruptionError, parse_spec
    from pl3d_ros.sim.presets import PRESETS

    if not isinstance(entry, dict):
        raise GridError(f"{where} must be a mapping with name, kind, ..., got {entry!r}")
    unknown = sorted(set(entry) - STREAM_KEYS)
    if unknown:
        raise GridError(f"{where}: unknown key(s) {unknown}; known: {sorted(STREAM_KEYS)}")
    name = check_name(entry.get("name"), f"{where} name")
    where = f"stream {name!r}"
    kind = entry.get("kind")
    if kind not in KINDS:
        raise GridError(f"{where}: kind must be one of {list(KINDS)}, got {kind!r}")
    corrupt = entry.get("corrupt") or ""
    if not isinstance(corrupt, str):
        raise GridError(f"{where}: corrupt must be a spec string such as 'fog:3', got {corrupt!r}")
    try:
        corrupt = ",".join(str(c) for c in parse_spec(corrupt))  # canonical: fog:3,night:2
    except CorruptionError as exc:
        raise GridError(f"{where}: {exc}") from exc
    model = resolve_model(entry.get("model", default_model), root, f"{where}: model", check_inputs)
    description = str(entry.get("description") or "")
    if kind == "real":
        for key in ("domains", "frames_per_domain"):
            if key in entry:
                raise GridError(f"{where}: {key} is for sim streams; a real stream has inputs")
        inputs = _names(entry.get("inputs"), f"{where}: inputs must be a list of KITTI sequence folders or bags")
        paths = [resolve_path(p, root, f"{where}: input") for p in inputs]
        if check_inputs:
            from pl3d_ros.io.sources import open_source

            for p in paths:
                try:
                    open_source(p)
                except Exception as exc:  # FileNotFoundError, BagError: one clear line
                    raise GridError(f"{where}: input {p}: {exc}") from exc
        return StreamSpec(name, kind, corrupt, model, inputs=tuple(str(p) for p in paths), description=description)
    if "inputs" in entry:
        raise GridError(f"{where}: a sim stream has domains and frames_per_domain, not inputs")
    domains = _names(entry.get("domains"), f"{where}: domains must be a list of sim presets, from {sorted(PRESETS)}")
    bad = [d for d in domains if d not in PRESETS]
    if bad:
        raise GridError(f"{where}: unknown sim preset(s) {bad}; choose from {sorted(PRESETS)}")
    fpd = entry.get("frames_per_domain")
    fpd = [fpd] * len(domains) if isinstance(fpd, int) and not isinstance(fpd, bool) else fpd
    if (not isinstance(fpd, list) or len(fpd) != len(domains)
            or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in fpd)):
        raise GridError(f"{where}: frames_per_domain must be a positive integer, or one per domain "
                        f"({len(domains)}), got {entry.get('frames_per_domain')!r}")
    return StreamSpec(name, kind, corrupt, model, domains=tuple(domains), frames_per_domain=tuple(fpd),
                      description=description)
