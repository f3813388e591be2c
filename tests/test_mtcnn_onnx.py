"""The ONNX graphs built from mtcnn's Keras weights compute what an independent torch port computes."""

from __future__ import annotations

import math
import subprocess
import sys

import joblib
import numpy as np
import onnxruntime as ort
import pytest

from facecore.models import resolve
from facecore.mtcnn_onnx import BUILDERS

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional


def _weights(net: str) -> list[np.ndarray]:
    path, _ = resolve(f"mtcnn-{net}")
    return joblib.load(path)


def _conv(w: np.ndarray, b: np.ndarray) -> nn.Conv2d:
    kh, kw, cin, cout = w.shape  # Keras HWIO
    conv = nn.Conv2d(cin, cout, (kh, kw))
    conv.weight.data = torch.from_numpy(w.transpose(3, 2, 0, 1).copy())
    conv.bias.data = torch.from_numpy(b.copy())
    return conv


def _prelu(alpha: np.ndarray) -> nn.PReLU:
    p = nn.PReLU(alpha.size)
    p.weight.data = torch.from_numpy(alpha.ravel().copy())
    return p


def _dense(w: np.ndarray, b: np.ndarray) -> nn.Linear:
    lin = nn.Linear(*w.shape)
    lin.weight.data = torch.from_numpy(w.T.copy())
    lin.bias.data = torch.from_numpy(b.copy())
    return lin


class TFSamePool(nn.Module):
    """TF/Keras MaxPooling2D(padding='same'): pad to ceil(in/stride) outputs, the odd pixel at the end."""

    def __init__(self, k: int, s: int):
        super().__init__()
        self.k, self.s = k, s

    def forward(self, x):
        pads = []
        for n in (x.shape[3], x.shape[2]):  # F.pad order: last dim first
            total = max((math.ceil(n / self.s) - 1) * self.s + self.k - n, 0)
            pads += [total // 2, total - total // 2]
        return F.max_pool2d(F.pad(x, pads, value=-math.inf), self.k, self.s)


class KerasFlatten(nn.Module):
    """Permute((2, 1, 3)) then Flatten of a channels-last tensor: (W, H, C) order."""

    def forward(self, x):
        return x.permute(0, 3, 2, 1).flatten(1)


class TorchPNet(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.body = nn.Sequential(_conv(w[0], w[1]), _prelu(w[2]), TFSamePool(2, 2),
                                  _conv(w[3], w[4]), _prelu(w[5]), _conv(w[6], w[7]), _prelu(w[8]))
        self.reg, self.cls = _conv(w[9], w[10]), _conv(w[11], w[12])

    def forward(self, x):
        x = self.body(x)
        return self.reg(x), F.softmax(self.cls(x), dim=1)


class TorchRNet(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.body = nn.Sequential(_conv(w[0], w[1]), _prelu(w[2]), TFSamePool(3, 2),
                                  _conv(w[3], w[4]), _prelu(w[5]), nn.MaxPool2d(3, 2),
                                  _conv(w[6], w[7]), _prelu(w[8]), KerasFlatten(),
                                  _dense(w[9], w[10]), _prelu(w[11]))
        self.reg, self.cls = _dense(w[12], w[13]), _dense(w[14], w[15])

    def forward(self, x):
        x = self.body(x)
        return self.reg(x), F.softmax(self.cls(x), dim=1)


class TorchONet(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.body = nn.Sequential(_conv(w[0], w[1]), _prelu(w[2]), TFSamePool(3, 2),
                                  _conv(w[3], w[4]), _prelu(w[5]), nn.MaxPool2d(3, 2),
                                  _conv(w[6], w[7]), _prelu(w[8]), TFSamePool(2, 2),
                                  _conv(w[9], w[10]), _prelu(w[11]), KerasFlatten(),
                                  _dense(w[12], w[13]), _prelu(w[14]))
        self.reg, self.landmarks, self.cls = _dense(w[15], w[16]), _dense(w[17], w[18]), _dense(w[19], w[20])

    def forward(self, x):
        x = self.body(x)
        return self.reg(x), self.landmarks(x), F.softmax(self.cls(x), dim=1)


TORCH = {"pnet": TorchPNet, "rnet": TorchRNet, "onet": TorchONet}
SHAPES = {  # odd and even P-Net sizes exercise the 'same' pooling's end padding
    "pnet": [(2, 3, 12, 12), (3, 3, 37, 50), (1, 3, 64, 31)],
    "rnet": [(1, 3, 24, 24), (7, 3, 24, 24)],
    "onet": [(1, 3, 48, 48), (5, 3, 48, 48)],
}


@pytest.mark.parametrize("net", ["pnet", "rnet", "onet"])
def test_onnx_matches_torch(net):
    weights = _weights(net)
    model = BUILDERS[net](weights)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    reference = TORCH[net](weights).eval()
    rng = np.random.default_rng(0)
    for shape in SHAPES[net]:
        x = rng.uniform(-1, 1, shape).astype(np.float32)
        got = session.run(None, {"input": x})
        with torch.no_grad():
            want = [t.numpy() for t in reference(torch.from_numpy(x))]
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert g.shape == w.shape
            np.testing.assert_allclose(g, w, atol=1e-4, rtol=0)


def test_graph_inputs_and_outputs():
    dims = {}
    for net in BUILDERS:
        model = BUILDERS[net](_weights(net))
        inp = model.graph.input[0]
        assert inp.name == "input"
        dims[net] = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
        outputs = ["reg", "landmarks", "prob"] if net == "onet" else ["reg", "prob"]
        assert [o.name for o in model.graph.output] == outputs
    assert dims == {"pnet": ["N", 3, "H", "W"], "rnet": ["N", 3, 24, 24], "onet": ["N", 3, 48, 48]}


def test_wrong_weights_are_refused():
    with pytest.raises(ValueError):
        BUILDERS["rnet"](_weights("pnet"))


def test_runtime_needs_neither_torch_nor_tensorflow():
    code = ("import sys, facecore.detect, facecore.mtcnn_onnx; "
            "bad = {'torch', 'tensorflow', 'mtcnn'} & set(sys.modules); assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
