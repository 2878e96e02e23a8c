"""Fully int8 models (``edged models quantize --full-int8``): the first step to an Edge TPU.

The Edge TPU runs only models whose every op, input and output is int8, compiled by
``edgetpu_compiler``. The published nets write PReLU with ``NEG`` (MTCNN) and ``ABS``
(MobileFaceNet), which ai-edge-quantizer cannot quantise. :func:`without_neg_abs` rewrites them
with ops it can: ``NEG(x)`` as ``MUL(x, -1)``, ``ABS(x)`` as ``MAXIMUM(x, MUL(x, -1))``; the
float model computes exactly the same values (tests/test_quantize.py checks it bit for bit).
The ``full`` recipe then quantises every op and the model's input and output too
(``static_wi8_ai8`` without the float input/output that the other static recipes keep).
edged's TFLite runner quantises a float input with the model's own scale and zero point and
dequantises the outputs (edged.runtime.base), so such a model also runs on the CPU, which is
how it is checked here; ``edgetpu_compiler model.tflite`` is the step these machines cannot
do (docs/int8.md).
"""
from __future__ import annotations

from typing import Dict, Tuple

import numpy as np


def without_neg_abs(data: bytes) -> bytes:
    """The float model with every ``NEG`` as ``MUL(x, -1)`` and every ``ABS`` as
    ``MAXIMUM(x, MUL(x, -1))`` (one constant -1 shared); other ops untouched."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model_from_bytearray(bytearray(data))
    ops = schema.BuiltinOperator
    codes = {max(c.builtinCode, c.deprecatedBuiltinCode): i
             for i, c in enumerate(model.operatorCodes)}
    if ops.NEG not in codes and ops.ABS not in codes:
        return data

    def code(op: int) -> int:
        if op not in codes:
            c = schema.OperatorCodeT()
            c.builtinCode, c.deprecatedBuiltinCode, c.version = op, min(op, 127), 1
            model.operatorCodes.append(c)
            codes[op] = len(model.operatorCodes) - 1
        return codes[op]

    for sg in model.subgraphs:
        minus_one = _constant(model, sg, np.float32(-1.0), "edged/minus_one")
        new_ops = []
        for op in sg.operators:
            kind = max(model.operatorCodes[op.opcodeIndex].builtinCode,
                       model.operatorCodes[op.opcodeIndex].deprecatedBuiltinCode)
            if kind == ops.NEG:
                _as_mul(schema, op, code(ops.MUL), op.inputs[0], minus_one)
            elif kind == ops.ABS:
                x = op.inputs[0]
                neg = _tensor_like(sg, x, f"{_name(sg, op.outputs[0])}/negated")
                mul = schema.OperatorT()
                _as_mul(schema, mul, code(ops.MUL), x, minus_one)
                mul.outputs = [neg]
                new_ops.append(mul)
                op.opcodeIndex = code(ops.MAXIMUM)
                op.inputs = [x, neg]
                op.builtinOptionsType = schema.BuiltinOptions.MaximumMinimumOptions
                op.builtinOptions = schema.MaximumMinimumOptionsT()
            new_ops.append(op)
        sg.operators = new_ops
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def _as_mul(schema, op, opcode: int, x: int, c: int) -> None:
    op.opcodeIndex = opcode
    op.inputs = [x, c]
    op.builtinOptionsType = schema.BuiltinOptions.MulOptions
    op.builtinOptions = schema.MulOptionsT()  # (no fused activation)


def _name(sg, index: int) -> str:
    n = sg.tensors[index].name
    return n.decode() if isinstance(n, bytes) else str(n)


def _constant(model, sg, value: np.ndarray, name: str) -> int:
    """A new constant tensor (shape [1]) of ``value`` in ``sg``; its index."""
    from ai_edge_litert import schema_py_generated as schema

    buf = schema.BufferT()
    buf.data = np.frombuffer(np.asarray([value], np.float32).tobytes(), np.uint8).tolist()
    model.buffers.append(buf)
    t = schema.TensorT()
    t.shape, t.type, t.buffer, t.name = [1], schema.TensorType.FLOAT32, len(model.buffers) - 1, name
    sg.tensors.append(t)
    return len(sg.tensors) - 1


def _tensor_like(sg, index: int, name: str) -> int:
    """A new activation tensor shaped as tensor ``index`` of ``sg``; its index."""
    from ai_edge_litert import schema_py_generated as schema

    src = sg.tensors[index]
    t = schema.TensorT()
    t.shape, t.type, t.buffer, t.name = list(src.shape), src.type, 0, name
    if src.shapeSignature is not None:
        t.shapeSignature = list(src.shapeSignature)
    sg.tensors.append(t)
    return len(sg.tensors) - 1


def io_types(data: bytes) -> Tuple[str, str]:
    """The dtype names of the model's first input and first output (``int8`` when full)."""
    from edged.runtime.base import tflite_module

    it = tflite_module().Interpreter(model_content=data)
    return (np.dtype(it.get_input_details()[0]["dtype"]).name,
            np.dtype(it.get_output_details()[0]["dtype"]).name)


def op_names(data: bytes) -> Dict[str, int]:
    """``op name -> count`` of the model's ops (LiteRT's own list)."""
    from edged.runtime.base import tflite_module

    it = tflite_module().Interpreter(model_content=data)
    out: Dict[str, int] = {}
    for op in it._get_ops_details():  # (LiteRT's op list: its only public form)
        out[op["op_name"]] = out.get(op["op_name"], 0) + 1
    return out


def full_set(calibration, out, sources, prepared, log=print) -> dict:
    """The ``full`` set: each net without NEG and ABS, calibrated and quantised with its input
    and output in int8 (edged.runtime.fullint8); its manifest and output SNR per net."""
    from edged.runtime.quantize import FULL, ROLES, calibrate, quantize_model, write_set

    models, layers = {}, {}
    for role in ROLES:
        rewritten = without_neg_abs(prepared[role])
        ranges = calibrate(role, rewritten, calibration.split(role)[0])
        models[role] = quantize_model(role, rewritten, FULL, ranges)
        layers[role] = {"io": list(io_types(models[role])), "float_layers": []}
        log(f"{FULL:<8} {role:<9} {len(models[role]):>9} bytes  input/output "
            f"{'/'.join(layers[role]['io'])}")
    manifest = write_set(out / FULL, FULL, models, sources, calibration, {})
    return {"manifest": str(manifest), "models": layers}
