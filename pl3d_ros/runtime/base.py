"""The Backend interface every runtime implements.

Inputs and outputs are numpy arrays keyed by name (static shapes from the checkpoint header):
    image        (1, 3, H, W) float32 RGB in [0, 1]
    range_image  (1, 5, rows, cols) float32 range, x, y, z (m), intensity
    logits_2d    (1, C, H, W) float32
    logits_3d    (1, C, rows, cols) float32

Weight swaps are atomic: ``run`` reads the current engine reference once, ``swap_weights`` builds
a complete new engine off the hot path and replaces the reference in one assignment, so a run
sees either all old or all new weights, never a mix, and never waits for a swap to finish.
"""

from __future__ import annotations

import copy
import threading
import time
from abc import ABC, abstractmethod
from typing import Any

import numpy as np
import torch

INPUT_NAMES = ("image", "range_image")
OUTPUT_NAMES = ("logits_2d", "logits_3d")


class BackendError(RuntimeError):
    """A backend cannot be created or cannot run its inputs."""


class Backend(ABC):
    """run(inputs) -> outputs; run_device(tensors) -> tensors; swap_weights(state_dict); describe().

    ``device``: where ``run_device`` takes its inputs and leaves its outputs, and so where the
    segmenter pre- and postprocesses (a GPU backend's; CPU for the rest).
    """

    name = "abstract"
    device = torch.device("cpu")

    def __init__(self, input_shapes: dict[str, list[int]]) -> None:
        self.input_shapes = {k: tuple(v) for k, v in input_shapes.items()}
        self._swap_lock = threading.Lock()  # serialises swaps; runs never take it
        self.swaps = 0
        self.last_swap_ms: float | None = None

    def check_inputs(self, inputs: dict[str, np.ndarray] | dict[str, torch.Tensor]) -> None:
        for name, shape in self.input_shapes.items():
            if name not in inputs:
                raise BackendError(f"missing input {name!r}; expected {list(self.input_shapes)}")
            arr = inputs[name]  # numpy array or torch tensor (run_device)
            float32 = torch.float32 if isinstance(arr, torch.Tensor) else np.float32
            if tuple(arr.shape) != shape or arr.dtype != float32:
                raise BackendError(f"input {name} must be float32 {shape}, got {arr.dtype} {tuple(arr.shape)}")

    @abstractmethod
    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one frame. Thread-safe with respect to swap_weights."""

    def run_device(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``run`` on torch tensors on ``device``, outputs float32 tensors there. This default
        goes through ``run`` on the host; GPU backends override it to stay on the device."""
        outs = self.run({k: v.detach().cpu().numpy() for k, v in inputs.items()})
        return {k: torch.from_numpy(v).to(self.device) for k, v in outs.items()}

    @abstractmethod
    def _build_engine(self, state_dict: dict[str, torch.Tensor]) -> Any:
        """A complete new engine carrying ``state_dict`` (runs off the hot path)."""

    def _template_with(self, state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
        """A fresh copy of the subclass's CPU ``_template`` module carrying ``state_dict`` (strict)."""
        model = copy.deepcopy(self._template)
        model.load_state_dict(state_dict, strict=True)
        return model.eval()

    def swap_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Replace the weights atomically (see module docstring)."""
        with self._swap_lock:
            t0 = time.perf_counter()
            engine = self._build_engine(state_dict)
            self._engine = engine  # one reference assignment: atomic under the GIL
            self.last_swap_ms = (time.perf_counter() - t0) * 1e3
            self.swaps += 1

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "inputs": {k: list(v) for k, v in self.input_shapes.items()},
                "swaps": self.swaps, "last_swap_ms": self.last_swap_ms}
