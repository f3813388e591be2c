"""The one way training jobs turn an onnx.helper graph into the file facecore loads."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from pathlib import Path

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


def write_artifact(out: Path, name: str, proto: onnx.ModelProto, version: str, card: dict) -> Path:
    """``out/<name>.onnx`` and its model card ``out/<name>.json`` (name, version, file, sha256,
    then ``card``, then the date); returns the onnx path."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.onnx"
    path.write_bytes(proto.SerializeToString())
    full = {"name": name, "version": version, "file": path.name,
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), **card, "date": dt.date.today().isoformat()}
    (out / f"{name}.json").write_text(json.dumps(full, indent=2) + "\n")
    return path
