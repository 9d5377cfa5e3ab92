"""ONNX export: names and structure depend on the architecture, never on the weight values
(a TensorRT refit matches weights by name and refuses a graph that differs)."""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import torch

from pl3d_ros.models.two_stream import build_model
from pl3d_ros.runtime.base import INPUT_NAMES, OUTPUT_NAMES
from pl3d_ros.runtime.export import canonicalize, export_onnx
from fakes import SMALL, header, net_inputs as inputs, small_model


def zero_bias_model() -> torch.nn.Module:
    """Every bias and every BatchNorm shift zero: many equal-valued tensors, which the raw
    exporter merges (the fresh-model case that broke swaps)."""
    torch.manual_seed(3)
    model = build_model(SMALL, 10)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.zero_()
                m.running_var.fill_(1.0)
    return model.eval()


def perturbed(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    out = build_model(SMALL, 10)
    out.load_state_dict(model.state_dict())
    with torch.no_grad():
        for p in out.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        for m in out.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.add_(0.1 * torch.randn(m.running_mean.shape, generator=g))
    return out.eval()


def structure(onnx_bytes: bytes):
    g = onnx.load_model_from_string(onnx_bytes).graph
    inits = [(t.name, tuple(t.dims), t.data_type) for t in g.initializer]
    nodes = [(n.op_type, n.name, tuple(n.input), tuple(n.output)) for n in g.node]
    return inits, nodes


def raw_export(model: torch.nn.Module) -> onnx.ModelProto:
    """What torch.onnx.export gives before canonicalize (for the tests' before/after)."""
    shapes = header().input_shapes
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, tuple(torch.zeros(shapes[n]) for n in INPUT_NAMES), buf,
                          opset_version=17, input_names=list(INPUT_NAMES),
                          output_names=list(OUTPUT_NAMES), do_constant_folding=True, dynamo=False)
    return onnx.load_model_from_string(buf.getvalue())


def test_zero_bias_and_perturbed_models_export_the_same_graph():
    a, b = zero_bias_model(), None
    b = perturbed(a)
    # the defect exists in the raw exporter: value-dependent initializers and Identity nodes
    ra, rb = raw_export(a).graph, raw_export(b).graph
    assert any(n.op_type == "Identity" for n in ra.node)
    assert [t.name for t in ra.initializer] != [t.name for t in rb.initializer]
    # after canonicalize: same names, shapes, dtypes and node list
    ia, na = structure(export_onnx(a, header()))
    ib, nb = structure(export_onnx(b, header()))
    assert ia == ib and na == nb
    assert not any(op == "Identity" for op, *_ in na)
    assert len({name for name, *_ in ia}) == len(ia)  # unique names
    # and the small test model (random biases, no merging) too
    assert structure(export_onnx(small_model(), header())) == (ia, na)


def test_canonical_graph_computes_the_same_as_the_raw_one():
    import onnxruntime as ort

    model = zero_bias_model()
    raw = raw_export(model)
    canon = onnx.load_model_from_string(export_onnx(model, header()))
    onnx.checker.check_model(canon)
    x = inputs()
    outs = []
    for proto in (raw, canon):
        sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        outs.append(sess.run(list(OUTPUT_NAMES), x))
    for r, c in zip(*outs):
        np.testing.assert_array_equal(r, c)
    with torch.no_grad():
        ref = model(torch.from_numpy(x["image"]), torch.from_numpy(x["range_image"]))
    for r, c in zip(ref, outs[1]):
        np.testing.assert_allclose(c, r.numpy(), atol=1e-4)


def test_export_is_deterministic_and_canonicalize_idempotent():
    model = small_model()
    once = export_onnx(model, header())
    assert export_onnx(model, header()) == once
    again = canonicalize(onnx.load_model_from_string(once)).SerializeToString(deterministic=True)
    assert structure(again) == structure(once)
