"""The one way training jobs turn an onnx.helper graph into the file facecore loads."""

from __future__ import annotations

import onnx
from onnx import helper


def finish_model(graph: onnx.GraphProto, meta: dict[str, str]) -> onnx.ModelProto:
    """Opset 13, IR 8 (readable by every onnxruntime the project allows), ``meta`` as the
    model's metadata (pinned with the file by sha256), checked before it is written."""
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="facecluster-training")
    proto.ir_version = 8
    helper.set_model_props(proto, meta)
    onnx.checker.check_model(proto)
    return proto
