"""The target-frame memory (METHODS.md section 6): the last M prepared frames, so that each step
can train on the newest frame together with earlier ones, and self-training reuses pseudo-labels
as the methods it comes from do (many steps over many target samples).

A frame enters the memory after its first step, with everything a step needs (network inputs on
the adaptation device, teacher outputs, pseudo-labels by stage, mask ids, reliability state), so a
memory step costs one student forward and backward and none of the frame's own work (teacher and
source forwards, masks, MLA, GAPP). Bounded by frames and by bytes; the oldest frames go first.
"""

from __future__ import annotations

from collections import deque
from dataclasses import fields, is_dataclass

import numpy as np
import torch

from pl3d_ros.adapt.state import FrameState


def _nbytes(obj: object, seen: set[int]) -> int:
    """Bytes of the tensors and arrays reachable from ``obj`` (each counted once)."""
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return obj.element_size() * obj.nelement()
    if isinstance(obj, np.ndarray):
        return int(obj.nbytes)
    if isinstance(obj, dict):
        return sum(_nbytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v, seen) for v in obj)
    if is_dataclass(obj) and not isinstance(obj, type):
        return sum(_nbytes(getattr(obj, f.name), seen) for f in fields(obj))
    return 0


def state_bytes(state: FrameState) -> int:
    """Memory a stored frame holds: its frame (points, image), inputs, labels, teacher outputs."""
    return _nbytes(state, set())


class FrameMemory:
    """The last ``max_frames`` frames within ``max_bytes``; uniform sampling with a private RNG."""

    def __init__(self, max_frames: int, max_bytes: int, seed: int = 0) -> None:
        self.max_frames = int(max_frames)
        self.max_bytes = int(max_bytes)
        self._frames: deque[tuple[FrameState, int]] = deque()
        self.bytes = 0
        self.evicted = 0
        self._rng = np.random.default_rng([int(seed), 0x6d656d])  # its own stream: restores keep theirs

    def __len__(self) -> int:
        return len(self._frames)

    def states(self) -> list[FrameState]:
        return [s for s, _ in self._frames]

    def add(self, state: FrameState) -> None:
        """Store ``state`` (after its first step), evicting the oldest beyond the bounds. A frame
        larger than the whole byte budget is not stored."""
        if self.max_frames <= 0:
            return
        size = state_bytes(state)
        if size > self.max_bytes:
            return
        self._frames.append((state, size))
        self.bytes += size
        while len(self._frames) > self.max_frames or self.bytes > self.max_bytes:
            _, old = self._frames.popleft()
            self.bytes -= old
            self.evicted += 1

    def sample(self, k: int, exclude: FrameState | None = None) -> list[FrameState]:
        """Up to ``k`` distinct stored frames (never ``exclude``), uniformly at random."""
        pool = [s for s, _ in self._frames if s is not exclude]
        if k <= 0 or not pool:
            return []
        idx = self._rng.choice(len(pool), size=min(k, len(pool)), replace=False)
        return [pool[i] for i in sorted(idx)]

    def clear(self) -> None:
        self._frames.clear()
        self.bytes = 0
