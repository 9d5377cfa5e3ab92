"""Eager PyTorch backend (CPU or CUDA)."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch

from pl3d_ros.runtime.base import OUTPUT_NAMES, Backend


class TorchBackend(Backend):
    """Runs a TwoStreamNet in eval mode. A swap loads the weights into a fresh copy of the module."""

    name = "torch"

    def __init__(self, model: torch.nn.Module, input_shapes: dict[str, list[int]],
                 device: str | torch.device | None = None) -> None:
        super().__init__(input_shapes)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self._template = copy.deepcopy(model).cpu().eval()
        self._engine = copy.deepcopy(self._template).to(self.device)

    def _build_engine(self, state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
        return self._template_with(state_dict).to(self.device)

    @torch.inference_mode()
    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.check_inputs(inputs)
        model = self._engine
        image = torch.from_numpy(inputs["image"]).to(self.device)
        rng = torch.from_numpy(inputs["range_image"]).to(self.device)
        outs = model(image, rng)
        return {name: out.float().cpu().numpy() for name, out in zip(OUTPUT_NAMES, outs)}

    @torch.inference_mode()
    def run_device(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The network on device tensors; outputs stay on ``device``."""
        self.check_inputs(inputs)
        model = self._engine
        outs = model(inputs["image"].to(self.device), inputs["range_image"].to(self.device))
        return {name: out.float() for name, out in zip(OUTPUT_NAMES, outs)}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "device": str(self.device)}
