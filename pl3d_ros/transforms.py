"""Rigid transforms: quaternion <-> matrix, and a small static transform tree.

Conventions follow tf2: a transform with parent frame P and child frame C maps coordinates in C
into P (T_P_C). Quaternions are (x, y, z, w), unit norm. Translations in metres.
"""

from __future__ import annotations

from collections import deque

import numpy as np


class TransformError(LookupError):
    """A transform between two frames is unknown."""


def quaternion_to_matrix(q: np.ndarray) -> np.ndarray:
    """(4,) quaternion (x, y, z, w) -> (3, 3) rotation matrix. The quaternion is normalised first."""
    x, y, z, w = np.asarray(q, dtype=np.float64) / np.linalg.norm(q)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


def matrix_to_quaternion(R: np.ndarray) -> np.ndarray:
    """(3, 3) rotation -> (4,) unit quaternion (x, y, z, w) with w >= 0.

    Uses the eigenvector of Bar-Itzhack's symmetric K matrix: it returns the nearest rotation's
    quaternion even for a slightly non-orthonormal input (calibration files carry ~1e-7 errors).
    """
    R = np.asarray(R, dtype=np.float64)
    (m00, m01, m02), (m10, m11, m12), (m20, m21, m22) = R
    K = np.array([
        [m00 - m11 - m22, m01 + m10, m02 + m20, m21 - m12],
        [m01 + m10, m11 - m00 - m22, m12 + m21, m02 - m20],
        [m02 + m20, m12 + m21, m22 - m00 - m11, m10 - m01],
        [m21 - m12, m02 - m20, m10 - m01, m00 + m11 + m22],
    ]) / 3.0
    _, vecs = np.linalg.eigh(K)
    q = vecs[:, -1]
    return q if q[3] >= 0 else -q


def make_transform(translation: np.ndarray, quaternion: np.ndarray) -> np.ndarray:
    """(3,) metres + (4,) quaternion (x, y, z, w) -> (4, 4) homogeneous transform."""
    T = np.eye(4)
    T[:3, :3] = quaternion_to_matrix(quaternion)
    T[:3, 3] = translation
    return T


def invert(T: np.ndarray) -> np.ndarray:
    """Inverse of a (4, 4) rigid transform (exact for rigid matrices, no general inverse)."""
    R, t = T[:3, :3], T[:3, 3]
    out = np.eye(4)
    out[:3, :3] = R.T
    out[:3, 3] = -R.T @ t
    return out


class TransformTree:
    """Static transforms between named frames, looked up along any path of the tree."""

    def __init__(self) -> None:
        self._edges: dict[str, dict[str, np.ndarray]] = {}

    def add(self, parent: str, child: str, T_parent_child: np.ndarray) -> None:
        """Record T_parent_child (maps child coordinates into parent coordinates)."""
        T = np.asarray(T_parent_child, dtype=np.float64)
        self._edges.setdefault(parent, {})[child] = T
        self._edges.setdefault(child, {})[parent] = invert(T)

    @property
    def frames(self) -> list[str]:
        return sorted(self._edges)

    def __len__(self) -> int:
        return sum(len(v) for v in self._edges.values()) // 2

    def lookup(self, target: str, source: str) -> np.ndarray:
        """T_target_source: maps coordinates in ``source`` into ``target`` (breadth-first path)."""
        if target == source:
            return np.eye(4)
        if target not in self._edges or source not in self._edges:
            missing = [f for f in (target, source) if f not in self._edges]
            raise TransformError(
                f"no transform {source} -> {target}: unknown frame(s) {missing}; known: {self.frames}"
            )
        # BFS from target, accumulating T_target_frame.
        seen = {target: np.eye(4)}
        queue = deque([target])
        while queue:
            frame = queue.popleft()
            for nxt, T_frame_nxt in self._edges[frame].items():
                if nxt not in seen:
                    seen[nxt] = seen[frame] @ T_frame_nxt
                    if nxt == source:
                        return seen[nxt]
                    queue.append(nxt)
        raise TransformError(f"frames {source} and {target} are not connected; known: {self.frames}")
