"""Read and patch TFLite flatbuffers without the generated schema code.

Only the few tables edged needs are walked (Model, SubGraph, Tensor, Operator,
OperatorCode, Buffer, ReshapeOptions), by their field numbers in TFLite's
``schema.fbs``.  Used to check that a file is a TFLite model at all, to list the tensors it
declares and their sizes (the memory check, :mod:`edged.runtime.limits`), to rewrite
MobileFaceNet's baked batch of 2 into a dynamic batch, and to declare P-Net for one pyramid
level.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

import flatbuffers
from flatbuffers.table import Table

FILE_IDENTIFIER = b"TFL3"
BUILTIN_RESHAPE = 22
BUILTIN_OPTIONS_RESHAPE = 17  # BuiltinOptions.ReshapeOptions


class ModelFormatError(ValueError):
    """The bytes are not a TFLite model edged can read."""


# what the flatbuffers walker raises on garbage offsets and sizes (a corrupt file)
_UNREADABLE = (IndexError, struct.error, TypeError, ValueError, OverflowError)


def _field(tab: Table, index: int) -> int:
    return tab.Offset(4 + 2 * index)


def _vector(tab: Table, index: int):
    """(start position, length) of a vector field, or (None, 0)."""
    off = _field(tab, index)
    if not off:
        return None, 0
    return tab.Vector(off), tab.VectorLen(off)


def _table_vector(tab: Table, index: int):
    start, n = _vector(tab, index)
    out = []
    for i in range(n):
        pos = tab.Indirect(start + 4 * i)
        out.append(Table(tab.Bytes, pos))
    return out


def _scalar(tab: Table, index: int, flags, default=0):
    off = _field(tab, index)
    if not off:
        return default
    return tab.Get(flags, tab.Pos + off)


def _sub_table(tab: Table, index: int):
    off = _field(tab, index)
    if not off:
        return None
    return Table(tab.Bytes, tab.Indirect(tab.Pos + off))


def _root(buf) -> Table:
    if len(buf) < 8:
        raise ModelFormatError(f"file is {len(buf)} bytes, too short for a TFLite model")
    if bytes(buf[4:8]) != FILE_IDENTIFIER:
        raise ModelFormatError(
            f"not a TFLite model: file identifier is {bytes(buf[4:8])!r}, expected {FILE_IDENTIFIER!r}"
        )
    root = struct.unpack_from("<I", buf, 0)[0]
    if root >= len(buf):
        raise ModelFormatError("not a TFLite model: root table offset points past the end of the file")
    return Table(buf, root)


@dataclass
class _Reshape:
    shape_pos: int  # byte position of the int32 shape constant, or -1
    shape_len: int
    options_pos: int  # byte position of ReshapeOptions.new_shape data, or -1
    options_len: int


def _reshapes(buf) -> list:
    model = _root(buf)
    try:
        opcodes = []
        for oc in _table_vector(model, 1):
            code = _scalar(oc, 3, flatbuffers.number_types.Int32Flags, 0)
            old = _scalar(oc, 0, flatbuffers.number_types.Int8Flags, 0)
            opcodes.append(max(code, old))
        buffers = _table_vector(model, 4)
        found = []
        for sg in _table_vector(model, 2):
            tensors = _table_vector(sg, 0)
            for op in _table_vector(sg, 3):
                idx = _scalar(op, 0, flatbuffers.number_types.Uint32Flags, 0)
                if opcodes[idx] != BUILTIN_RESHAPE:
                    continue
                in_start, n_in = _vector(op, 1)
                shape_pos, shape_len = -1, 0
                if n_in >= 2:
                    t_index = struct.unpack_from("<i", buf, in_start + 4)[0]
                    tensor = tensors[t_index]
                    b_index = _scalar(tensor, 2, flatbuffers.number_types.Uint32Flags, 0)
                    data_start, data_len = _vector(buffers[b_index], 0)
                    if data_start is not None and data_len % 4 == 0:
                        shape_pos, shape_len = data_start, data_len // 4
                opts_pos, opts_len = -1, 0
                if _scalar(op, 3, flatbuffers.number_types.Uint8Flags, 0) == BUILTIN_OPTIONS_RESHAPE:
                    opts = _sub_table(op, 4)
                    if opts is not None:
                        start, n = _vector(opts, 0)
                        if start is not None:
                            opts_pos, opts_len = start, n
                found.append(_Reshape(shape_pos, shape_len, opts_pos, opts_len))
        return found
    except _UNREADABLE as exc:
        raise ModelFormatError(f"not a readable TFLite model: {exc}") from exc


def tensor_shapes(buf) -> tuple:
    """``([(byte position of the shape vector, rank)] for every tensor of the first subgraph,
    index of its first input tensor)``, for patching declared shapes in place."""
    try:
        sgs = _table_vector(_root(buf), 2)  # Model.subgraphs
        if not sgs:
            raise ModelFormatError("model has no subgraph")
        in_start, n_in = _vector(sgs[0], 1)  # SubGraph.inputs
        if not n_in:
            raise ModelFormatError("model has no input")
        first_input = struct.unpack_from("<i", buf, in_start)[0]
        return [_vector(t, 0) for t in _table_vector(sgs[0], 0)], first_input  # Tensor.shape
    except _UNREADABLE as exc:
        raise ModelFormatError(f"not a readable TFLite model: {exc}") from exc


#: bytes per element of each TensorType (schema.fbs); a type not listed counts 8 bytes
_TYPE_BYTES = {0: 4, 1: 2, 2: 4, 3: 1, 4: 8, 6: 1, 7: 2, 8: 8, 9: 1, 10: 8, 11: 16, 12: 8,
               15: 4, 16: 2, 17: 1, 18: 2}


@dataclass
class TensorInfo:
    """One tensor as the file declares it."""

    index: int
    name: str
    shape: tuple  # declared dims (-1: dynamic)
    itemsize: int  # bytes per element
    constant: bool  # its data is in the file (weights, shape constants)

    @property
    def nbytes(self) -> int:
        """Bytes the declared shape takes (a dynamic dim counts 1)."""
        n = self.itemsize
        for d in self.shape:
            n *= max(int(d), 1)
        return n


def tensor_infos(buf) -> list:
    """:class:`TensorInfo` for every tensor of every subgraph, in file order."""
    model = _root(buf)
    try:
        buffers = _table_vector(model, 4)  # Model.buffers
        out = []
        for sg in _table_vector(model, 2):
            for i, t in enumerate(_table_vector(sg, 0)):
                start, rank = _vector(t, 0)  # Tensor.shape
                shape = struct.unpack_from(f"<{rank}i", buf, start) if rank else ()
                kind = _scalar(t, 1, flatbuffers.number_types.Int8Flags, 0)
                b = _scalar(t, 2, flatbuffers.number_types.Uint32Flags, 0)
                const = 0 < b < len(buffers) and (
                    _vector(buffers[b], 0)[1] > 0  # Buffer.data, or Buffer.size (large models)
                    or _scalar(buffers[b], 2, flatbuffers.number_types.Uint64Flags, 0) > 0)
                name_off = _field(t, 3)
                name = t.String(t.Pos + name_off).decode("utf-8", "replace") if name_off else ""
                out.append(TensorInfo(i, name, tuple(shape), _TYPE_BYTES.get(kind, 8), const))
        return out
    except _UNREADABLE as exc:
        raise ModelFormatError(f"not a readable TFLite model: {exc}") from exc


def check_model_bytes(buf) -> None:
    """Raise :class:`ModelFormatError` unless ``buf`` parses as a TFLite model."""
    _reshapes(buf)


def make_batch_dynamic(buf: bytes, batch: int = 2, width: int = 192) -> bytes:
    """Return a copy of ``buf`` whose final ``RESHAPE`` to ``[batch, width]`` is ``[-1, width]``.

    Both the shape constant (the op's second input) and the ``ReshapeOptions.new_shape``
    attribute are rewritten, in place in the copy: same length, same layout, only the
    batch integer changes.  Raises :class:`ModelFormatError` if no such reshape exists.
    """
    out = bytearray(buf)
    target = (batch, width)
    patched = 0
    for r in _reshapes(out):
        for pos, n in ((r.shape_pos, r.shape_len), (r.options_pos, r.options_len)):
            if pos < 0 or n != 2:
                continue
            if struct.unpack_from("<2i", out, pos) == target:
                struct.pack_into("<2i", out, pos, -1, width)
                patched += 1
    if not patched:
        raise ModelFormatError(f"no RESHAPE to {list(target)} found: is this the MobileFaceNet model?")
    return bytes(out)


def pnet_model_for(model: bytes, shape) -> bytes:
    """A copy of the P-Net model declared for input ``shape`` ([1, W, H, 3], swapped).

    P-Net is published for a 1280 x 960 input, and its activation tensors are declared at the
    matching sizes; XNNPACK plans (and keeps) memory for the declared sizes when an interpreter
    is opened, about 150 MB each, whatever size it is resized to later.  So the input and every
    activation's declared shape are rewritten in place (int32 values only, same rank) to what
    the level needs: 3 x 3 valid convolution (-2), 2 x 2 max-pool with SAME padding (ceil of
    half), two more 3 x 3 convolutions (-2, -2), then 1 x 1 convolutions.  A shape this misses
    is only a hint: the interpreter recomputes every shape when it allocates.
    """
    buf = bytearray(model)
    tensors, first = tensor_shapes(buf)
    pos, rank = tensors[first]
    if rank != 4 or len(shape) != 4:
        raise ValueError(f"P-Net input has rank {rank}, asked for shape {tuple(shape)}")
    declared = struct.unpack_from("<4i", buf, pos)

    def chain(s0: int, s: int) -> dict:
        half0, half = (s0 - 2 + 1) // 2, (s - 2 + 1) // 2
        return {s0: s, s0 - 2: s - 2, half0: half, half0 - 2: half - 2, half0 - 4: half - 4}

    maps = {1: chain(declared[1], int(shape[1])), 2: chain(declared[2], int(shape[2]))}
    struct.pack_into("<4i", buf, pos, *(int(v) for v in shape))
    for i, (p, r) in enumerate(tensors):
        if i == first or r != 4:
            continue
        dims = list(struct.unpack_from("<4i", buf, p))
        if dims[0] != 1:
            continue  # weights, not activations
        new = [dims[0], maps[1].get(dims[1], dims[1]), maps[2].get(dims[2], dims[2]), dims[3]]
        if new != dims:
            struct.pack_into("<4i", buf, p, *new)
    return bytes(buf)
