"""ONNX export of the two-stream network (opset 17, static shapes) and its JSON sidecar."""

from __future__ import annotations

import hashlib
import io
import json
import warnings
from pathlib import Path
from typing import Any

import torch

from pl3d_ros.models.checkpoint import CheckpointHeader
from pl3d_ros.runtime.base import INPUT_NAMES, OUTPUT_NAMES

OPSET = 17


def export_onnx(model: torch.nn.Module, header: CheckpointHeader) -> bytes:
    """Serialised ONNX of ``model`` with the header's static input shapes."""
    shapes = header.input_shapes
    dummy = tuple(torch.zeros(shapes[name]) for name in INPUT_NAMES)
    buf = io.BytesIO()
    model = model.cpu().eval()
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of dynamo, but it is the one whose
        # output TensorRT 10 parses without surprises for plain CNNs.
        warnings.simplefilter("ignore")
        torch.onnx.export(model, dummy, buf, opset_version=OPSET, input_names=list(INPUT_NAMES),
                          output_names=list(OUTPUT_NAMES), do_constant_folding=True, dynamo=False)
    return buf.getvalue()


def sidecar(header: CheckpointHeader, onnx_bytes: bytes) -> dict[str, Any]:
    """What a runtime needs besides the graph: I/O specs, classes, preprocessing, the hash."""
    c = header.class_set.num_classes
    m, s = header.model, header.sensor
    return {
        "onnx_sha256": hashlib.sha256(onnx_bytes).hexdigest(),
        "opset": OPSET,
        "inputs": {name: {"shape": shape, "dtype": "float32"} for name, shape in header.input_shapes.items()},
        "outputs": {"logits_2d": {"shape": [1, c, m.image_height, m.image_width], "dtype": "float32"},
                    "logits_3d": {"shape": [1, c, s.rows, s.cols], "dtype": "float32"}},
        "classes": list(header.class_set.names),
        "header": header.to_dict(),
    }


def write_export(model: torch.nn.Module, header: CheckpointHeader, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``model.onnx`` and ``model.json`` into out_dir; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = export_onnx(model, header)
    onnx_path, json_path = out_dir / "model.onnx", out_dir / "model.json"
    onnx_path.write_bytes(data)
    json_path.write_text(json.dumps(sidecar(header, data), indent=2))
    return onnx_path, json_path
