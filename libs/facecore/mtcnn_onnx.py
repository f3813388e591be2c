"""MTCNN's three nets as ONNX graphs, built from the Keras weights of the ``mtcnn`` package.

The package ships its weights as joblib/lz4 lists of numpy arrays for a TensorFlow
model; building the graphs here lets the service run them on ONNX Runtime without
TensorFlow (or torch). Facts taken from ``mtcnn`` 1.0.0 (mtcnn/network/*.py):

* inputs are RGB, ``(pixel - 127.5) / 128``, NOT transposed (unlike the Caffe
  original): the 1.0 weights already have their kernels laid out for upright images;
* Keras ``MaxPooling2D(padding="same")`` pads only at the end (TF's SAME_UPPER) and
  never lets the padding win the max; ``"valid"`` pads nothing;
* R-Net/O-Net flatten after ``Permute((2, 1, 3))``, i.e. in (W, H, C) order.

Every graph has an NCHW float32 input named ``input`` with a dynamic batch axis
(P-Net also dynamic height and width); outputs are named below.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17

# Keras layer sequences of mtcnn 1.0.0: (op, kernel or pool size, stride, padding)
PNET_LAYERS = [("conv", 3), ("prelu",), ("pool", 2, 2, "same"),
               ("conv", 3), ("prelu",), ("conv", 3), ("prelu",)]
RNET_LAYERS = [("conv", 3), ("prelu",), ("pool", 3, 2, "same"),
               ("conv", 3), ("prelu",), ("pool", 3, 2, "valid"),
               ("conv", 2), ("prelu",), ("flatten",), ("dense",), ("prelu",)]
ONET_LAYERS = [("conv", 3), ("prelu",), ("pool", 3, 2, "same"),
               ("conv", 3), ("prelu",), ("pool", 3, 2, "valid"),
               ("conv", 3), ("prelu",), ("pool", 2, 2, "same"),
               ("conv", 2), ("prelu",), ("flatten",), ("dense",), ("prelu",)]

PNET_OUTPUTS = ("reg", "prob")  # (N,4,H',W') box offsets, (N,2,H',W') softmax [not face, face]
RNET_OUTPUTS = ("reg", "prob")  # (N,4), (N,2)
ONET_OUTPUTS = ("reg", "landmarks", "prob")  # (N,4), (N,10) as x1..x5, y1..y5, (N,2)


class _Graph:
    """Accumulates nodes and initializers with unique names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def const(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(value, dtype=np.float32), name))
        return name

    def op(self, op_type: str, inputs: list[str], output: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=output, **attrs))
        return output


def _trunk(g: _Graph, x: str, layers: Sequence[tuple], weights: list[np.ndarray]) -> tuple[str, int]:
    """Emit the shared layers; returns the last tensor and how many weight arrays were used."""
    k = 0
    for i, layer in enumerate(layers):
        kind, name = layer[0], f"l{i}_{layer[0]}"
        if kind == "conv":
            w, b = weights[k], weights[k + 1]  # HWIO kernel, bias
            k += 2
            x = g.op("Conv", [x, g.const(f"{name}.w", w.transpose(3, 2, 0, 1)), g.const(f"{name}.b", b)],
                     name, kernel_shape=list(w.shape[:2]))
        elif kind == "prelu":
            alpha = weights[k]  # (1,1,C) after a conv, (C,) after a dense layer
            k += 1
            alpha = alpha.reshape(-1, 1, 1) if alpha.ndim == 3 else alpha
            x = g.op("PRelu", [x, g.const(f"{name}.alpha", alpha)], name)
        elif kind == "pool":
            _, size, stride, padding = layer
            # SAME_UPPER is TF's 'same': output ceil(in/stride), any odd padding at the end.
            x = g.op("MaxPool", [x], name, kernel_shape=[size, size], strides=[stride, stride],
                     auto_pad="SAME_UPPER" if padding == "same" else "VALID")
        elif kind == "flatten":
            x = g.op("Flatten", [g.op("Transpose", [x], f"{name}.perm", perm=[0, 3, 2, 1])], name, axis=1)
        elif kind == "dense":
            w, b = weights[k], weights[k + 1]  # (in, out), (out,)
            k += 2
            x = g.op("Gemm", [x, g.const(f"{name}.w", w), g.const(f"{name}.b", b)], name)
        else:
            raise ValueError(f"unknown layer {kind}")
    return x, k


def _model(g: _Graph, input_shape: list, outputs: list[tuple[str, list]], doc: str) -> onnx.ModelProto:
    graph = helper.make_graph(
        g.nodes, doc, [helper.make_tensor_value_info("input", TensorProto.FLOAT, input_shape)],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in outputs], g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="facecore")
    model.ir_version = 8  # readable by every ONNX Runtime >= 1.14
    onnx.checker.check_model(model)
    return model


def _check_count(net: str, weights: list[np.ndarray], expected: int) -> None:
    if len(weights) != expected:
        raise ValueError(f"{net}: expected {expected} weight arrays, got {len(weights)}")


def build_pnet(weights: list[np.ndarray]) -> onnx.ModelProto:
    """Fully convolutional: one output cell per 12x12 input window at stride 2."""
    _check_count("pnet", weights, 13)
    g = _Graph()
    x, k = _trunk(g, "input", PNET_LAYERS, weights)
    g.op("Conv", [x, g.const("reg.w", weights[k].transpose(3, 2, 0, 1)), g.const("reg.b", weights[k + 1])],
         "reg", kernel_shape=[1, 1])
    logits = g.op("Conv", [x, g.const("cls.w", weights[k + 2].transpose(3, 2, 0, 1)),
                           g.const("cls.b", weights[k + 3])], "cls", kernel_shape=[1, 1])
    g.op("Softmax", [logits], "prob", axis=1)
    return _model(g, ["N", 3, "H", "W"], [("reg", ["N", 4, "h", "w"]), ("prob", ["N", 2, "h", "w"])], "mtcnn_pnet")


def _heads(g: _Graph, x: str, weights: list[np.ndarray], names: Sequence[str]) -> None:
    for j, name in enumerate(names):
        w, b = weights[2 * j], weights[2 * j + 1]
        out = "cls" if name == "prob" else name
        g.op("Gemm", [x, g.const(f"{name}.w", w), g.const(f"{name}.b", b)], out)
        if name == "prob":
            g.op("Softmax", ["cls"], "prob", axis=1)


def build_rnet(weights: list[np.ndarray]) -> onnx.ModelProto:
    """24x24 crops -> refined box offsets and face probability."""
    _check_count("rnet", weights, 16)
    g = _Graph()
    x, k = _trunk(g, "input", RNET_LAYERS, weights)
    _heads(g, x, weights[k:], RNET_OUTPUTS)
    return _model(g, ["N", 3, 24, 24], [("reg", ["N", 4]), ("prob", ["N", 2])], "mtcnn_rnet")


def build_onet(weights: list[np.ndarray]) -> onnx.ModelProto:
    """48x48 crops -> box offsets, 5 landmarks relative to the crop, face probability."""
    _check_count("onet", weights, 21)
    g = _Graph()
    x, k = _trunk(g, "input", ONET_LAYERS, weights)
    _heads(g, x, weights[k:], ONET_OUTPUTS)
    return _model(g, ["N", 3, 48, 48], [("reg", ["N", 4]), ("landmarks", ["N", 10]), ("prob", ["N", 2])],
                  "mtcnn_onet")


BUILDERS = {"pnet": build_pnet, "rnet": build_rnet, "onet": build_onet}
