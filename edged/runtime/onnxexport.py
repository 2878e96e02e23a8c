"""The verified TFLite models as ONNX (``edged models convert --to onnx``), for TensorRT.

tf2onnx reads the ``.tflite`` file (it needs TensorFlow; ``pip install 'edged[onnx]'``) and
writes opset 13 with the same layout as TFLite (NHWC in and out, P-Net's swapped width and
height included), so a runner feeds an engine made from it exactly what it feeds TFLite. The
file is then made to take what edged runs: the batch dimension is symbolic (R-Net, O-Net and
the embedder run batches of crops; the embedder's file was published with a batch of 2, which
tf2onnx bakes into its ``Reshape`` constants: those keep the input's batch instead, ``0``).
P-Net is converted for one input shape at a time (:func:`pnet_at`: tf2onnx bakes the spatial
size into its ``Reshape`` constants too), one model per pyramid level. tf2onnx 1.17 drops the
bias of a ``FULLY_CONNECTED`` whose input is 4-D (R-Net's and O-Net's first dense layer: a
``MatMul`` with no ``Add``, outputs off by up to 0.37); it is added back from the TFLite file
(:func:`_fc_biases`). Outputs are checked against TFLite on real faces by the tests
(tests/test_onnx_export.py).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Dict

import numpy as np

log = logging.getLogger("edged.models")

OPSET = 13


class OnnxError(RuntimeError):
    """The model cannot be converted here; the message says why and what to install."""


def _tf2onnx():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up chatter
    try:
        import onnx  # noqa: F401  (the post-processing below needs it)
        import tf2onnx
    except ImportError as exc:
        raise OnnxError(f"converting to ONNX needs tf2onnx, TensorFlow and onnx ({exc}): "
                        f"pip install 'edged[onnx]' (on a Jetson: NVIDIA's TensorFlow wheel, "
                        f"then tf2onnx and onnx)") from None
    return tf2onnx


def tflite_to_onnx(model: bytes, role: str) -> bytes:
    """The ONNX of one TFLite model of ``role``, with the dimensions edged varies symbolic."""
    tf2onnx = _tf2onnx()
    with tempfile.NamedTemporaryFile(suffix=".tflite") as f:
        f.write(model)
        f.flush()
        try:
            proto, _ = tf2onnx.convert.from_tflite(f.name, opset=OPSET)
        except Exception as exc:  # tf2onnx raises whatever TensorFlow raises
            raise OnnxError(f"{role}: tf2onnx could not convert the model: {exc}") from exc
    _add_missing_biases(proto, _fc_biases(model))
    if role != "pnet":
        _symbolic(proto)
    return proto.SerializeToString()


def pnet_at(model: bytes, shape) -> bytes:
    """P-Net's ONNX for one input ``shape`` ([1, W, H, 3], swapped as in TFLite)."""
    from edged.runtime.tflitefile import pnet_model_for

    return tflite_to_onnx(pnet_model_for(model, shape), "pnet")


def _fc_biases(model: bytes) -> Dict[str, np.ndarray]:
    """``output tensor name -> bias`` of every FULLY_CONNECTED op of the TFLite model that has
    a bias."""
    from edged.runtime.base import tflite_module

    interp = tflite_module().Interpreter(model_content=model)
    interp.allocate_tensors()
    names = {d["index"]: d["name"] for d in interp.get_tensor_details()}
    out = {}
    for op in interp._get_ops_details():  # (LiteRT's op list: its only public form)
        ins = list(op["inputs"])
        if op["op_name"] == "FULLY_CONNECTED" and len(ins) >= 3 and ins[2] >= 0:
            out[names[op["outputs"][0]]] = np.asarray(interp.get_tensor(ins[2]), np.float32)
    return out


def _add_missing_biases(proto, biases: Dict[str, np.ndarray]) -> None:
    """A dense layer converted to a bare ``MatMul`` gets its bias back as an ``Add``."""
    from onnx import helper, numpy_helper

    g = proto.graph
    for k, node in enumerate(list(g.node)):
        if node.op_type != "MatMul" or not node.output or node.output[0] not in biases:
            continue
        out = node.output[0]
        node.output[0] = out + "__without_bias"
        g.initializer.append(numpy_helper.from_array(biases[out], out + "__bias"))
        add = helper.make_node("Add", [node.output[0], out + "__bias"], [out],
                               name=node.name + "__bias")
        g.node.insert(list(g.node).index(node) + 1, add)


def _symbolic(proto) -> None:
    """The batch as a symbolic dimension; batches baked into ``Reshape`` constants kept."""
    from onnx import numpy_helper

    g = proto.graph
    batch = g.input[0].type.tensor_type.shape.dim[0].dim_value
    for v in list(g.input) + list(g.output):
        v.type.tensor_type.shape.dim[0].dim_param = "batch"
    inits = {i.name: i for i in g.initializer}
    for node in g.node:
        if node.op_type != "Reshape" or len(node.input) < 2 or node.input[1] not in inits:
            continue
        shape = numpy_helper.to_array(inits[node.input[1]]).copy()
        if shape.size and batch > 1 and shape[0] == batch:
            shape[0] = 0  # the input's own batch (allowzero is off)
            inits[node.input[1]].CopyFrom(numpy_helper.from_array(shape.astype(np.int64),
                                                                  node.input[1]))


def convert_set(out: Path, models_dir=None, roles=None) -> Path:
    """Every verified model of ``roles`` as ``<role>.onnx`` in ``out``, with ``onnx.json``
    naming each file's sha256 and its source's; returns that document's path."""
    from edged.runtime import modelstore

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for role in roles or modelstore.ROLES:
        data, digest, path = modelstore.read_verified(role, models_dir)
        onnx_bytes = tflite_to_onnx(data, role)
        name = f"{role}.onnx"
        modelstore.atomic_write(out / name, onnx_bytes)
        entries.append({"role": role, "file": name,
                        "sha256": hashlib.sha256(onnx_bytes).hexdigest(),
                        "source_file": Path(path).name, "source_sha256": digest})
        log.info("%s: %s -> %s", role, Path(path).name, out / name)
    doc = {"format": "edged-onnx-set", "version": 1, "opset": OPSET,
           "converter": f"tf2onnx {_tf2onnx().__version__}", "models": entries}
    path = out / "onnx.json"
    modelstore.atomic_write(path, (json.dumps(doc, indent=2) + "\n").encode())
    return path


def onnx_session(onnx_bytes: bytes):
    """An onnxruntime CPU session (the equivalence check; ``pip install onnxruntime``)."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise OnnxError(f"onnxruntime is not installed ({exc})") from None
    return ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])


def run_onnx(session, x: np.ndarray) -> list:
    return session.run(None, {session.get_inputs()[0].name: np.ascontiguousarray(x, np.float32)})
