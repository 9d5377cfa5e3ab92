"""ONNX export of the two-stream network (opset 17, static shapes) and its JSON sidecar.

The graph's names and structure depend only on the architecture, never on the weight values.
The TorchScript exporter does not guarantee that: it merges initializers whose values are equal
(e.g. the zero biases of a freshly initialised net) into one and routes the other users through
``Identity`` nodes, and numbers its ``onnx::Conv_NNN`` names in the order it meets them, so a
fresh net and the same net after BatchNorm biases moved export different initializer lists and
node lists, and a TensorRT refit (which matches weights by name) refuses the swap.
:func:`canonicalize` undoes that after export: every ``Identity`` of an initializer is folded
back into a copy of the initializer for its consumer, and every initializer is named after the
one node input that uses it (``<node name>:<input index>``), in node order.
"""

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


def canonicalize(model_proto: Any) -> Any:
    """Make an ONNX graph's initializers independent of their values (see the module docstring).

    In place on ``model_proto`` (an ``onnx.ModelProto``), which is returned. Top-level graph
    only (this network has no subgraphs). After it:

    - no ``Identity`` node reads an initializer (unless its output is a graph output);
    - every initializer feeds exactly one node input and is named ``<node name>:<index>``
      (``<op type>_<node position>:<index>`` for an unnamed node); names are unique because
      node names are;
    - initializers are listed in the order of the node inputs that use them; unused ones are gone.

    The computation is unchanged (an Identity of a constant is the constant).
    """
    import onnx

    graph = model_proto.graph
    inits = {t.name: t for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    alias: dict[str, str] = {}  # Identity output -> the initializer it passes through
    nodes = []
    for node in graph.node:
        if (node.op_type == "Identity" and len(node.input) == 1 and node.output[0] not in outputs
                and alias.get(node.input[0], node.input[0]) in inits):
            alias[node.output[0]] = alias.get(node.input[0], node.input[0])
        else:
            nodes.append(node)
    new_inits = []
    for pos, node in enumerate(nodes):
        base = node.name or f"{node.op_type}_{pos}"
        for i, name in enumerate(node.input):
            src = alias.get(name, name)
            if src not in inits:
                continue
            t = onnx.TensorProto()
            t.CopyFrom(inits[src])
            t.name = f"{base}:{i}"
            node.input[i] = t.name
            new_inits.append(t)
    graph.ClearField("node")
    graph.node.extend(nodes)
    graph.ClearField("initializer")
    graph.initializer.extend(new_inits)
    # Old-IR graphs list initializers among the inputs; shape annotations of removed values go.
    names = {t.name for t in new_inits}
    kept_inputs = [v for v in graph.input if v.name not in inits or v.name in names]
    graph.ClearField("input")
    graph.input.extend(kept_inputs)
    gone = set(alias) | (set(inits) - names)
    kept_info = [v for v in graph.value_info if v.name not in gone]
    graph.ClearField("value_info")
    graph.value_info.extend(kept_info)
    return model_proto


def export_onnx(model: torch.nn.Module, header: CheckpointHeader) -> bytes:
    """Serialised ONNX of ``model`` with the header's static input shapes, canonicalised so that
    its names and structure depend on the architecture only (:func:`canonicalize`)."""
    import onnx

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
    proto = canonicalize(onnx.load_model_from_string(buf.getvalue()))
    return proto.SerializeToString(deterministic=True)


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
