"""The memory check of dropped models (edged.runtime.limits): bounded, and before allocation.

The hostile model is the real P-Net with six operators added in front of it (the flatbuffer
is extended, the original tables are kept as they are): the input is reshaped to
``[1, N, 1, 3]`` and ``[1, 1, N, 3]`` (N = its pixels) and the two are added, a tensor of
``N * N * 3`` floats, whose sum times zero is added to the input before the first
convolution, so the outputs are exactly P-Net's.  At the 24 x 24 self-test input that tensor
takes 4 MB; at the first pyramid level of a 640 x 360 frame, 5 GB; of a 1920 x 1080 frame,
418 GB.
"""
from __future__ import annotations

import struct
import time

import flatbuffers
import numpy as np
import pytest

from edged.runtime import modelstore
from edged.runtime import tflitefile as tf
from edged.runtime.limits import (DEFAULT_FRAME, ModelMemoryError, check_declared,
                                  check_model_memory, run_shapes)
from conftest import wait_for
from test_ota import base_gallery, start_device, write_drop  # noqa: F401  (a fixture)

I32 = flatbuffers.number_types.Int32Flags
U32 = flatbuffers.number_types.Uint32Flags
U8 = flatbuffers.number_types.Uint8Flags
ADD, MUL, SUM, RESHAPE = 0, 18, 74, 22  # BuiltinOperator
RESHAPE_OPTIONS = 17  # BuiltinOptions
FLOAT32, INT32 = 0, 2  # TensorType
CLIP = "videos/facerec_short_hamilton_clip.mp4"  # 640 x 360


# ---------------------------------------------------------------------------- the crafted model


def _target(tab, index):
    off = tf._field(tab, index)
    return None if not off else tab.Indirect(tab.Pos + off)


class _Extender:
    """A flatbuffers Builder that starts with the old model as its last bytes: new tables
    are written in front of it and may point forward to the old ones (``old(pos)``)."""

    def __init__(self, old: bytes):
        self.old = bytes(old) + b"\0" * (-len(old) % 16)  # old alignments kept
        self.b = flatbuffers.Builder(0)
        self.b.Bytes, self.b.head, self.b.minalign = bytearray(self.old), 0, 16

    def old_ref(self, pos: int) -> int:
        return len(self.old) - pos

    def _vector(self, items, prepend) -> int:
        self.b.StartVector(4, len(items), 4)
        for item in reversed(items):
            prepend(item)
        return self.b.EndVector()

    def ints(self, values) -> int:
        return self._vector(values, self.b.PrependInt32)

    def refs(self, offsets) -> int:
        """A vector of tables: builder offsets (``old_ref`` for the old ones)."""
        return self._vector(offsets, self.b.PrependUOffsetTRelative)

    def table(self, n_fields: int, fields) -> int:
        """``fields``: [(slot, kind, value)], kind "u32", "i32", "i8", "u8" or "ref"."""
        b = self.b
        b.StartObject(n_fields)
        for slot, kind, value in fields:
            {"u32": lambda: b.PrependUint32Slot(slot, value, 0xFFFFFFFF),
             "i32": lambda: b.PrependInt32Slot(slot, value, -1),
             "i8": lambda: b.PrependInt8Slot(slot, value, -1),
             "u8": lambda: b.PrependUint8Slot(slot, value, 0xFF),
             "ref": lambda: b.PrependUOffsetTRelativeSlot(slot, value, 0)}[kind]()
        return b.EndObject()

    def buffer(self, data: bytes) -> int:
        b = self.b
        b.StartVector(1, len(data), 16)
        for x in reversed(data):
            b.PrependByte(x)
        return self.table(3, [(0, "ref", b.EndVector())])

    def tensor(self, shape, kind: int, buffer: int, name: str) -> int:
        s, n = self.ints(shape), self.b.CreateString(name)
        return self.table(8, [(0, "ref", s), (1, "i8", kind), (2, "u32", buffer), (3, "ref", n)])

    def op(self, code: int, ins, outs, options=None) -> int:
        fields = [(0, "u32", code), (1, "ref", self.ints(ins)), (2, "ref", self.ints(outs))]
        if options is not None:
            fields += [(3, "u8", options[0]), (4, "ref", options[1])]
        return self.table(5, fields)


def quadratic_pnet(pnet: bytes, declare_c=None) -> bytes:
    """P-Net whose memory grows with the square of its input's pixels (module doc);
    ``declare_c``: the shape declared for the big tensor (default: its 24 x 24 size)."""
    model = tf._root(pnet)
    sg = tf._table_vector(model, 2)[0]
    codes = [max(tf._scalar(o, 3, I32), tf._scalar(o, 0, flatbuffers.number_types.Int8Flags))
             for o in tf._table_vector(model, 1)]
    ops = tf._table_vector(sg, 3)
    n_t, n_b, n_c = len(tf._table_vector(sg, 0)), len(tf._table_vector(model, 4)), len(codes)
    inp = struct.unpack_from("<i", pnet, tf._vector(sg, 1)[0])[0]
    ia, ib, ta, tb, tc, tax, tz, ts, tzz, tx = range(n_t, n_t + 10)
    # the first convolution reads crafted/x instead of the input (patched in place)
    buf = bytearray(pnet)
    first_in = tf._vector(ops[0], 1)[0]
    assert struct.unpack_from("<i", buf, first_in)[0] == inp
    struct.pack_into("<i", buf, first_in, tx)
    e = _Extender(buf)
    sum_op = next(o for o in ops if codes[tf._scalar(o, 0, U32)] == SUM)
    sum_options = (tf._scalar(sum_op, 3, U8), e.old_ref(_target(sum_op, 4)))  # keep_dims
    sa, sb = [1, -1, 1, 3], [1, 1, -1, 3]
    tensors = [e.tensor([4], INT32, n_b, "crafted/shape_a"),
               e.tensor([4], INT32, n_b + 1, "crafted/shape_b"),
               e.tensor([1, 576, 1, 3], FLOAT32, 0, "crafted/a"),
               e.tensor([1, 1, 576, 3], FLOAT32, 0, "crafted/b"),
               e.tensor(declare_c or [1, 576, 576, 3], FLOAT32, 0, "crafted/c"),
               e.tensor([4], INT32, n_b + 2, "crafted/axes"),
               e.tensor([1], FLOAT32, n_b + 3, "crafted/zero"),
               e.tensor([1, 1, 1, 1], FLOAT32, 0, "crafted/s"),
               e.tensor([1, 1, 1, 1], FLOAT32, 0, "crafted/z"),
               e.tensor([1, 1280, 960, 3], FLOAT32, 0, "crafted/x")]

    def reshape_to(shape):
        return RESHAPE_OPTIONS, e.table(1, [(0, "ref", e.ints(shape))])

    new_ops = [e.op(n_c, [inp, ia], [ta], reshape_to(sa)), e.op(n_c, [inp, ib], [tb], reshape_to(sb)),
               e.op(codes.index(ADD), [ta, tb], [tc]),
               e.op(codes.index(SUM), [tc, tax], [ts], sum_options),
               e.op(codes.index(MUL), [ts, tz], [tzz]), e.op(codes.index(ADD), [inp, tzz], [tx])]
    buffers = [e.buffer(struct.pack("<4i", *sa)), e.buffer(struct.pack("<4i", *sb)),
               e.buffer(struct.pack("<4i", 0, 1, 2, 3)), e.buffer(struct.pack("<f", 0.0))]
    reshape_code = e.table(4, [(0, "i8", RESHAPE), (2, "i32", 1), (3, "i32", RESHAPE)])

    def old_items(tab, index):
        return [e.old_ref(t.Pos) for t in tf._table_vector(tab, index)]

    sg_fields = [(0, "ref", e.refs(old_items(sg, 0) + tensors)),
                 (3, "ref", e.refs(new_ops + old_items(sg, 3)))]
    sg_fields += [(f, "ref", e.old_ref(_target(sg, f))) for f in (1, 2, 4) if _target(sg, f)]
    new_sg = e.table(6, sg_fields)
    fields = [(0, "u32", tf._scalar(model, 0, U32)),
              (1, "ref", e.refs(old_items(model, 1) + [reshape_code])),
              (2, "ref", e.refs([new_sg])), (4, "ref", e.refs(old_items(model, 4) + buffers))]
    fields += [(f, "ref", e.old_ref(_target(model, f))) for f in (3, 5, 6, 7) if _target(model, f)]
    e.b.Finish(e.table(8, fields), file_identifier=tf.FILE_IDENTIFIER)
    return bytes(e.b.Output())


@pytest.fixture(scope="module")
def pnet(models_dir):
    return modelstore.read_verified("pnet", models_dir)[0]


@pytest.fixture(scope="module")
def crafted(pnet):
    return quadratic_pnet(pnet)


# ---------------------------------------------------------------------------- unit


def test_the_crafted_pnet_is_pnet_and_passes_the_24x24_self_test(pnet, crafted):
    """The premise: the old self-test accepts it (its outputs are P-Net's)."""
    from edged.ota.modelcheck import self_test
    from edged.ota.store import ModelBlob
    from edged.runtime import open_runner
    from edged.runtime.tflitefile import pnet_model_for

    shape = (1, 24, 24, 3)
    self_test(ModelBlob("pnet", crafted, modelstore.sha256_bytes(crafted), "crafted.tflite"),
              {"type": "cpu", "num_threads": 1})
    x = np.random.default_rng(3).uniform(-1, 1, shape).astype(np.float32)
    want = open_runner(pnet_model_for(pnet, shape), None).run(x)
    got = open_runner(pnet_model_for(crafted, shape), None).run(x)
    for w, g in zip(want, got):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_a_model_whose_memory_grows_with_the_frame_is_refused_at_the_frame_size(crafted):
    shapes = run_shapes("pnet")  # no camera size known: DEFAULT_FRAME
    assert shapes[0] == (1, 576, 324, 3)  # 1920 x 1080 scaled by 12 / 40, swapped
    t0 = time.monotonic()
    with pytest.raises(ModelMemoryError) as err:
        check_model_memory("pnet", crafted, "crafted.tflite", shapes, 512)
    assert time.monotonic() - t0 < 60
    why = err.value.reason
    assert why.startswith("crafted.tflite: needs more than the 512 MB a model may use "
                          "(models.max_memory_mb) at input [1, 576, 324, 3]"), why


def test_the_limit_decides_and_the_check_reports_what_was_used(crafted):
    """A 200 x 150 frame: the big tensor takes 87 MB at the first level (60 x 45)."""
    shapes = run_shapes("pnet", [(200, 150)])
    with pytest.raises(ModelMemoryError, match=r"64 MB a model may use .* at input \[1, 60, 45, 3\]"):
        check_model_memory("pnet", crafted, "c.tflite", shapes, 64)
    report = check_model_memory("pnet", crafted, "c.tflite", shapes, 512)
    assert 87 * 2**20 < report["peak"] < 512 * 2**20, report
    assert report["shapes"] == len(shapes)


def test_a_declared_huge_tensor_is_refused_from_the_file_alone(pnet):
    """53 GB declared for one tensor: refused by reading the flatbuffer, no interpreter."""
    model = quadratic_pnet(pnet, declare_c=[1, 68000, 68000, 3])
    with pytest.raises(ModelMemoryError) as err:
        check_declared("pnet", model, [(1, 24, 24, 3)], 512 << 20, "big.tflite")
    index = len(tf._table_vector(tf._table_vector(tf._root(pnet), 2)[0], 0)) + 4
    assert err.value.reason == (
        f"big.tflite: tensor {index} 'crafted/c' declares shape [1, 68000, 68000, 3], 52917 MB: "
        f"over the 512 MB a model may use (models.max_memory_mb)")
    with pytest.raises(ModelMemoryError, match="'crafted/c' declares shape"):
        check_model_memory("pnet", model, "big.tflite", [(1, 24, 24, 3)], 512)


def test_the_installed_models_pass_at_every_size_they_run_at(models_dir):
    frames = [DEFAULT_FRAME, (640, 480)]
    for role in ("pnet", "rnet", "onet", "embedder"):
        data = modelstore.read_verified(role, models_dir)[0]
        report = check_model_memory(role, data, role, run_shapes(role, frames), 512)
        assert report["peak"] < 256 * 2**20, (role, report)


def test_run_shapes_are_the_shapes_the_detector_opens(models_dir):
    from edged.vision.detect import MtcnnDetector

    det = MtcnnDetector.from_models(models_dir)
    det.detect(np.zeros((360, 640, 3), np.uint8))
    assert set(det._pnet_cache) == set(run_shapes("pnet", [(640, 360)]))
    assert run_shapes("rnet")[-1] == (16, 24, 24, 3) and run_shapes("onet")[-1] == (4, 48, 48, 3)
    assert [s[0] for s in run_shapes("embedder")] == [1, 2, 4, 8]


# ---------------------------------------------------------------------------- the daemon


def test_the_daemon_refuses_the_crafted_drop_and_keeps_serving(
        shared_dir, models_dir, base_gallery, broker, tmp_path, crafted):
    """Dropped into a running daemon (a 640 x 360 camera): refused on MQTT with the input
    size, before any interpreter is built for it; the daemon lives on, the P-Net in service
    stays and frames keep coming through it."""
    installed = {r: modelstore.read_verified(r, models_dir)[:2]
                 for r in ("pnet", "rnet", "onet", "embedder")}
    frame_log = tmp_path / "frames.log"
    cfg, mdir, gpath, watch, d = start_device(tmp_path, models_dir, shared_dir, base_gallery,
                                              broker, installed, "otamem", fps_limit=5.0,
                                              env={"EDGED_FRAME_LOG": str(frame_log)})
    try:
        p0 = installed["pnet"][1]
        watch.wait(lambda s: s["versions"]["detector"]["pnet"] == p0, 30, "the detector")
        write_drop(mdir, [("pnet", "pnet-quadratic.tflite", crafted)], "pnet-quadratic")
        st = watch.wait(lambda s: s.get("last_rejected_drop") is not None, 60, "a refusal")
        why = st["last_rejected_drop"]["why"]
        assert "needs more than the 512 MB a model may use (models.max_memory_mb) at input " \
               "[1, 192, 108, 3]" in why, why
        assert st["versions"]["detector"]["pnet"] == p0
        seen = len(frame_log.read_text().splitlines())
        assert wait_for(lambda: len(frame_log.read_text().splitlines()) > seen + 3, 30)
        assert d.proc.poll() is None
        assert watch.last()["versions"]["detector"]["pnet"] == p0
    finally:
        d.terminate()
        d.kill()
        watch.close()
