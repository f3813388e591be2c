"""The ONNX graphs the GPU path hands TensorRT (MTCNN's three nets, SFace) use only what
TensorRT's ONNX parser takes, checked offline: no GPU or TensorRT is needed.

``TENSORRT_OPS`` is the operator support matrix of onnx-tensorrt's docs/operators.md for
TensorRT 10.15 (the newest published; the extra "gpu" pins tensorrt-cu12 10.16): the
operators marked "Y". That document also states the opset range, 9 to 24, and the
restrictions checked below. Every operator our graphs use (Conv, PRelu, MaxPool, Softmax,
Transpose, Flatten, Gemm; SFace adds Sub, Mul, BatchNormalization, Dropout) is also in
TensorRT 8.4's matrix.
"""

import collections

import joblib
import onnx
import pytest
from onnx import numpy_helper, shape_inference

from facecore import models
from facecore.mtcnn_onnx import BUILDERS

TENSORRT_VERSION = "10.15"
TENSORRT_OPSETS = range(9, 25)
TENSORRT_OPS = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh Attention AveragePool BatchNormalization
BlackmanWindow Cast CastLike Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh
CumSum DeformConv DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike
Flatten Floor Gather GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool
Greater GreaterOrEqual GridSample GroupNormalization GRU HammingWindow HannWindow HardSigmoid HardSwish
Hardmax Identity If ImageScaler InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less
LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul Max MaxPool Mean
MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad
ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform
RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean
ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence RMSNormalization RNN
RoiAlign RotaryEmbedding Round STFT ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Shrink
Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan
Tanh TensorScatter ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
""".split())


def graphs():
    for name in ("pnet", "rnet", "onet"):
        yield name, BUILDERS[name](joblib.load(models.resolve(f"mtcnn-{name}")[0]))
    yield "sface", models.make_batch_dynamic(onnx.load(str(models.resolve("sface")[0])))


GRAPHS = dict(graphs())


def attrs(node):
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


@pytest.mark.parametrize("name", list(GRAPHS))
def test_graph_is_valid_and_every_op_is_parsed_by_tensorrt(name):
    m = GRAPHS[name]
    onnx.checker.check_model(m, full_check=True)
    shape_inference.infer_shapes(m, strict_mode=True)
    opset = next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))
    assert opset in TENSORRT_OPSETS
    ops = collections.Counter(n.op_type for n in m.graph.node)
    assert set(ops) <= TENSORRT_OPS, f"not in TensorRT {TENSORRT_VERSION}'s ONNX parser: {set(ops) - TENSORRT_OPS}"
    assert all(n.domain in ("", "ai.onnx") for n in m.graph.node)  # no custom ops, so no plugins


@pytest.mark.parametrize("name", list(GRAPHS))
def test_tensorrt_restrictions_and_dynamic_shapes(name):
    """The restrictions TensorRT's matrix lists for the ops used, and the patterns that make
    dynamic shapes hard for it: none of the graphs computes a shape (no Shape, Reshape,
    Slice or Expand on shape values), so the dynamic batch (and P-Net's height and width)
    reach every layer as plain dimensions, and one profile covers them."""
    m = GRAPHS[name]
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    ranks = {}
    inferred = shape_inference.infer_shapes(m)
    for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        ranks[v.name] = len(v.type.tensor_type.shape.dim)
    assert not {"Shape", "Reshape", "Slice", "Expand", "NonZero", "Loop", "If"} & {n.op_type for n in m.graph.node}
    for n in m.graph.node:
        a = attrs(n)
        if n.op_type == "Conv":
            assert len(a["kernel_shape"]) == 2 and n.input[1] in inits  # 2-D, weights constant
        elif n.op_type == "MaxPool":
            assert len(a["kernel_shape"]) == 2 and len(n.output) == 1  # 2-D, no Indices output
            assert all(d == 1 for d in a.get("dilations", [1, 1]))
            assert a.get("auto_pad", b"NOTSET") in (b"NOTSET", b"VALID", b"SAME_UPPER")
            assert not a.get("ceil_mode", 0)
        elif n.op_type == "PRelu":
            slope = inits[n.input[1]]  # constant, and broadcastable to the input unidirectionally
            assert slope.ndim <= ranks[n.input[0]]
            assert slope.shape[0] == slope.size or slope.ndim == 1
        elif n.op_type == "Softmax":
            assert a.get("axis", -1) in (1, -1) and ranks[n.input[0]] in (2, 4)
        elif n.op_type == "Gemm":
            assert ranks[n.input[0]] == 2 and n.input[1] in inits and not a.get("transA", 0)
        elif n.op_type == "Dropout":  # opset 11: inference is the identity; no is_training input
            assert len(n.input) == 1
    inp = [i for i in m.graph.input if i.name not in inits]
    assert len(inp) == 1
    dims = [d.dim_value or d.dim_param for d in inp[0].type.tensor_type.shape.dim]
    profile = models.input_profile(dims, models.AcceleratorOptions())
    assert profile is not None and profile[0][0] == 1  # a dynamic batch, which the profile spans
    if name == "pnet":
        assert [isinstance(d, str) for d in dims] == [True, False, True, True]
        out = [d.dim_param for d in m.graph.output[0].type.tensor_type.shape.dim]
        assert out[0] == "N" and out[2:] == ["h", "w"]  # outputs follow the input's height and width
    else:
        assert all(isinstance(d, int) for d in dims[1:])
