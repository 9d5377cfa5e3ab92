"""On-disk cache of serialised TensorRT engines (plans), keyed so a stale plan is never loaded.

A TensorRT plan only runs on the TensorRT release (and that release's CUDA build) and the GPU
model it was built with, and only means something for the exact ONNX graph and precision it was
built from. So each entry is named by an :class:`EngineKey` over all six, and carries a JSON
sidecar that repeats the key and the plan's sha256 and size:

    <cache>/<onnx12>-<precision>-trt<version>-cu<cuda>-sm<cc>-<digest16>.engine   the plan
    <cache>/<same name>.engine.json                                           its sidecar

``load`` returns None (and logs why) when anything disagrees: no sidecar, unreadable sidecar,
other key fields, or plan bytes whose size or sha256 differ from the sidecar's (a truncated or
corrupt file). The caller then rebuilds, and ``store`` overwrites the entry. Writes are atomic
(``pl3d_ros.atomic_write``: temp file in the same directory + fsync + ``os.replace``; the plan
first, its sidecar after; temps of killed writes are removed when a cache is opened), so
a crash or a power cut mid-write leaves either the old entry, or a new plan whose old sidecar no
longer matches it (which ``load`` rejects), never a half file that looks valid.

This module needs neither TensorRT nor a GPU; the tests exercise it on any machine.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pl3d_ros.atomic_write import atomic_write, clean_stale_temps

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16")
SIDECAR_FORMAT = "pl3d_ros.engine"
SIDECAR_VERSION = 1
ENGINE_SUFFIX = ".engine"
SIDECAR_SUFFIX = ".json"  # appended to the engine's file name: x.engine -> x.engine.json

_ABSENT = "no cached engine"  # the reason of a plain miss (as opposed to a rejected entry)
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class EngineCacheError(RuntimeError):
    """The cache directory cannot be used (not a directory, cannot be created or written)."""


def _safe(text: str) -> str:
    """``text`` reduced to characters that are safe in a file name on every OS we care about."""
    return _UNSAFE.sub("-", text).strip("-.") or "x"


@dataclass(frozen=True)
class EngineKey:
    """Everything a TensorRT plan depends on.

    onnx_sha256:        sha256 (hex) of the exact ONNX bytes the plan was built from
    precision:          "fp32" or "fp16"
    tensorrt_version:   ``tensorrt.__version__`` of the builder, e.g. "10.3.0"
    compute_capability: the GPU's "major.minor", e.g. "8.9"
    gpu_name:           the GPU's product name, e.g. "NVIDIA GeForce RTX 4090". Two GPUs of one
                        compute capability still differ in SM count and memory, and TensorRT's
                        tactics are timed per model, so the name is part of the key.
    cuda_major:         the CUDA major TensorRT is built for, e.g. "12": the same TensorRT
                        version ships CUDA 12 and CUDA 13 builds (tensorrt-cu12 / -cu13), and a
                        plan of one is not a plan of the other. "unknown" where it cannot be told.
    """

    onnx_sha256: str
    precision: str
    tensorrt_version: str
    compute_capability: str
    gpu_name: str
    cuda_major: str

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if not re.fullmatch(r"[0-9a-f]{64}", self.onnx_sha256):
            raise ValueError(f"onnx_sha256 must be 64 lower-case hex digits, got {self.onnx_sha256!r}")
        for name in ("tensorrt_version", "compute_capability", "gpu_name", "cuda_major"):
            if not getattr(self, name):
                raise ValueError(f"EngineKey.{name} must not be empty")

    @classmethod
    def for_onnx(cls, onnx_bytes: bytes, precision: str, tensorrt_version: str,
                 compute_capability: str, gpu_name: str, *, cuda_major: str) -> EngineKey:
        """The key of the engine built from ``onnx_bytes`` (hashes them)."""
        return cls(hashlib.sha256(onnx_bytes).hexdigest(), precision, tensorrt_version,
                   compute_capability, gpu_name, cuda_major)

    def fields(self) -> dict[str, str]:
        """The key as a plain dict (what the sidecar stores and compares)."""
        return dataclasses.asdict(self)

    @property
    def digest(self) -> str:
        """16 hex digits of sha256 over all fields: distinct keys get distinct names."""
        canon = json.dumps(self.fields(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canon.encode()).hexdigest()[:16]

    @property
    def filename(self) -> str:
        """A readable, filename-safe name; the digest makes it unique (the GPU name is in it)."""
        cc = self.compute_capability.replace(".", "")
        return _safe(f"{self.onnx_sha256[:12]}-{self.precision}-trt{self.tensorrt_version}-"
                     f"cu{self.cuda_major}-sm{cc}-{self.digest}") + ENGINE_SUFFIX


def default_cache_dir() -> Path:
    """$PL3D_ENGINE_CACHE, else $XDG_CACHE_HOME/pl3d_ros/engines, else ~/.cache/pl3d_ros/engines.

    Under the user's cache rather than /tmp: a Jetson build can take many minutes, and /tmp is
    wiped at boot.
    """
    explicit = os.environ.get("PL3D_ENGINE_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    # The XDG spec says a relative value is invalid and must be ignored.
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "pl3d_ros" / "engines"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class EngineCache:
    """A directory of plans + sidecars. Thread-safe; safe across processes by atomic renames."""

    _locks: dict[str, threading.Lock] = {}
    _locks_guard = threading.Lock()

    def __init__(self, directory: str | os.PathLike[str] | None = None) -> None:
        self.dir = Path(directory).expanduser() if directory is not None else default_cache_dir()
        if self.dir.exists() and not self.dir.is_dir():
            raise EngineCacheError(f"engine cache {self.dir} exists but is not a directory")
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise EngineCacheError(f"cannot create engine cache directory {self.dir}: {exc} "
                                   f"(set PL3D_ENGINE_CACHE to a writable directory)") from exc
        # Temps of builds killed mid-write (a plan is hundreds of MB on a small Jetson disk).
        clean_stale_temps(self.dir)

    def path(self, key: EngineKey) -> Path:
        """Where the plan for ``key`` lives (whether or not it exists yet)."""
        return self.dir / key.filename

    def sidecar_path(self, key: EngineKey) -> Path:
        """Where the sidecar of ``key``'s plan lives."""
        p = self.path(key)
        return p.with_name(p.name + SIDECAR_SUFFIX)

    def _check(self, key: EngineKey) -> tuple[bytes | None, str]:
        """(plan bytes, "hit") or (None, why the cached entry cannot be used)."""
        path, side = self.path(key), self.sidecar_path(key)
        if not path.is_file():
            return None, f"{_ABSENT} {path.name}"
        if not side.is_file():
            return None, f"{path.name} has no sidecar {side.name}"
        try:
            meta = json.loads(side.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            return None, f"sidecar {side.name} is unreadable: {exc}"
        if not isinstance(meta, dict) or meta.get("format") != SIDECAR_FORMAT:
            return None, f"sidecar {side.name} is not a pl3d_ros engine sidecar"
        if meta.get("version") != SIDECAR_VERSION:
            return None, f"sidecar {side.name} has version {meta.get('version')!r}, expected {SIDECAR_VERSION}"
        cached_key = meta.get("key")
        if not isinstance(cached_key, dict):
            return None, f"sidecar {side.name} has no key"
        wanted = key.fields()
        diffs = [f"{name}: cached {cached_key.get(name)!r}, needed {value!r}"
                 for name, value in wanted.items() if cached_key.get(name) != value]
        if diffs:
            return None, f"{path.name} was built for something else ({'; '.join(diffs)})"
        try:
            data = path.read_bytes()
        except OSError as exc:
            return None, f"cannot read {path.name}: {exc}"
        if len(data) != meta.get("engine_size"):
            return None, (f"{path.name} holds {len(data)} bytes, its sidecar says {meta.get('engine_size')} "
                          f"(truncated or partly written)")
        if _sha256(data) != meta.get("engine_sha256"):
            return None, f"{path.name} does not match its sidecar's sha256 (corrupt)"
        return data, "hit"

    def load(self, key: EngineKey) -> bytes | None:
        """The cached plan for ``key``, or None (the reason logged) if it must be (re)built."""
        data, reason = self._check(key)
        if data is None:
            # A plain miss is routine; a rejected entry is worth a warning, it costs a rebuild.
            (log.debug if reason.startswith(_ABSENT) else log.warning)(
                "engine cache miss: %s", reason)
        return data

    def store(self, key: EngineKey, engine_bytes: bytes, extra: dict[str, Any] | None = None) -> Path:
        """Write ``engine_bytes`` and its sidecar atomically; returns the plan's path.

        ``extra`` (JSON-serialisable, e.g. build seconds) is kept in the sidecar for people.
        Raises EngineCacheError when the directory cannot be written.
        """
        data = bytes(engine_bytes)
        if not data:
            raise EngineCacheError("refusing to cache an empty engine")
        path, side = self.path(key), self.sidecar_path(key)
        meta = {
            "format": SIDECAR_FORMAT,
            "version": SIDECAR_VERSION,
            "key": key.fields(),
            "engine_sha256": _sha256(data),
            "engine_size": len(data),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "extra": dict(extra or {}),
        }
        try:
            # Plan first, sidecar second: a crash in between leaves a plan whose (old or absent)
            # sidecar does not match it, which load() rejects.
            atomic_write(path, data, make_dirs=False)
            atomic_write(side, (json.dumps(meta, indent=2) + "\n").encode("utf-8"), make_dirs=False)
        except OSError as exc:
            raise EngineCacheError(f"cannot write engine {path}: {exc}") from exc
        log.info("cached engine %s (%.1f MB)", path, len(data) / 1e6)
        return path

    def _lock_for(self, key: EngineKey) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(str(self.path(key)), threading.Lock())

    def get_or_build(self, key: EngineKey, build_fn: Callable[[], bytes],
                     progress: Callable[[str], None] | None = None,
                     force: bool = False) -> tuple[bytes, bool]:
        """(plan bytes, built): the cached plan, or ``build_fn()``'s, stored for next time.

        ``progress`` receives one-line status messages (hit, miss and why, build time);
        ``force`` rebuilds even when a valid entry exists. Two threads asking for one key build
        it once. If ``build_fn`` raises, the error propagates and nothing is cached. A plan that
        was built but cannot be stored (read-only directory) is still returned, with a warning.
        """
        say = progress or (lambda _msg: None)
        with self._lock_for(key):
            if force:
                reason = "rebuild forced"
            else:
                data, reason = self._check(key)
                if data is not None:
                    say(f"engine cache hit: {self.path(key)}")
                    return data, False
                if not reason.startswith(_ABSENT):
                    log.warning("engine cache: %s; rebuilding", reason)
            say(f"building TensorRT engine {key.filename} ({reason}); this can take minutes")
            t0 = time.monotonic()
            data = bytes(build_fn())
            seconds = time.monotonic() - t0
            if not data:
                raise EngineCacheError("the engine build returned no bytes")
            try:
                self.store(key, data, extra={"build_seconds": round(seconds, 2)})
                say(f"built and cached {self.path(key)} in {seconds:.1f} s")
            except EngineCacheError as exc:
                log.warning("engine built in %.1f s but not cached: %s", seconds, exc)
                say(f"built engine in {seconds:.1f} s (not cached: {exc})")
            return data, True
