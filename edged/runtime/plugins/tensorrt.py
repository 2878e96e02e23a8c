"""TensorRT on Jetson: each verified model built into an engine on the device's GPU.

From the verified TFLite bytes: ONNX (:mod:`edged.runtime.onnxexport`: tf2onnx, which reads
``.tflite`` and needs TensorFlow; checked against TFLite on real faces in CI), then a TensorRT engine built with the Python API for the precision asked
(``fp16`` by default, ``fp32``, or ``int8`` with a calibration set), an optimisation profile
over the batch sizes edged runs (R-Net, O-Net, the embedder) or one engine per input shape (the
P-Net pyramid), on the GPU or a DLA core. Engines are cached as files under ``engine_cache``
named by the model's sha256, the TensorRT version, the GPU and the precision: a restart reuses
them, a dropped model builds its own off the hot path (at the drop's self-test).

Where TensorRT, CUDA or a GPU is missing, :meth:`TensorRtPlugin.open` raises and the runtime
falls back to the CPU with one warning saying which (or fails with ``strict: true``), as for
every delegate. This machine has no GPU: the code below the checks is not exercised here
(docs/install.md, docs/models.md).
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
from pathlib import Path
from typing import Dict, Optional

import numpy as np

from edged.runtime.base import CommonSettings, AcceleratorPlugin, Runner, SettingsError

log = logging.getLogger("edged.runtime")

PRECISIONS = ("fp16", "fp32", "int8")
DEFAULT_CACHE = "/var/lib/edged/state/engines"  # paths.state_dir's default, /engines
MAX_BATCH = 64  # the optimisation profile's largest batch (R-Net and O-Net batch their crops)


@dataclasses.dataclass
class TensorRtSettings(CommonSettings):
    precision: str = "fp16"  # fp16 | fp32 | int8 (int8 needs int8_calibration)
    workspace_mb: int = 512  # the builder's scratch memory
    dla_core: Optional[int] = None  # Orin / Xavier: run on this DLA core (GPU fallback on)
    engine_cache: str = ""  # where engines are kept ("": /var/lib/edged/state/engines)
    int8_calibration: Optional[str] = None  # a .npz of real model inputs, one array per input


def engine_key(model_sha256: str, trt_version: str, gpu: str, precision: str,
               shape=None) -> str:
    """The cache file name of an engine: the model, TensorRT, the GPU and the precision (and
    the input shape of a fixed-shape engine: a P-Net pyramid level)."""
    gpu_id = re.sub(r"[^A-Za-z0-9]+", "-", gpu).strip("-").lower() or "gpu"
    shape_part = "" if shape is None else "-" + "x".join(str(int(s)) for s in shape)
    return f"{model_sha256[:16]}-trt{trt_version}-{gpu_id}-{precision}{shape_part}.engine"


def _tensorrt():
    try:
        import tensorrt
    except ImportError as exc:
        raise RuntimeError(f"TensorRT is not importable here ({exc}); on a Jetson it comes with "
                           f"JetPack: apt-get install python3-libnvinfer (docs/install.md)") \
            from None
    return tensorrt


def _cuda():
    """cuda-python's runtime module and the first GPU's name; RuntimeError when there is none."""
    try:
        try:
            from cuda.bindings import runtime as cudart
        except ImportError:
            from cuda import cudart
    except ImportError as exc:
        raise RuntimeError(f"cuda-python is not importable ({exc}): pip install cuda-python "
                           f"(the version of the device's CUDA)") from None
    err, count = cudart.cudaGetDeviceCount()
    if int(err) != 0 or count < 1:
        raise RuntimeError("no CUDA GPU is visible to this process")
    err, props = cudart.cudaGetDeviceProperties(0)
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return cudart, name


class TensorRtPlugin(AcceleratorPlugin):
    type_key = "tensorrt"
    Settings = TensorRtSettings

    @classmethod
    def check(cls, s, where: str) -> None:
        if s.precision not in PRECISIONS:
            raise SettingsError(f"{where}.precision: expected one of {', '.join(PRECISIONS)}, "
                                f"got {s.precision!r}")
        if not isinstance(s.workspace_mb, int) or isinstance(s.workspace_mb, bool) \
                or not 16 <= s.workspace_mb <= 65536:
            raise SettingsError(f"{where}.workspace_mb: expected an integer in [16, 65536], got "
                                f"{s.workspace_mb!r}")
        if s.dla_core is not None and (not isinstance(s.dla_core, int)
                                       or isinstance(s.dla_core, bool) or s.dla_core < 0):
            raise SettingsError(f"{where}.dla_core: expected a core number (0, 1) or null, got "
                                f"{s.dla_core!r}")
        if not isinstance(s.engine_cache, str):
            raise SettingsError(f"{where}.engine_cache: expected a directory, got "
                                f"{s.engine_cache!r}")
        if s.precision == "int8" and not s.int8_calibration:
            raise SettingsError(f"{where}.int8_calibration: precision int8 needs a calibration "
                                f"set of real inputs (a .npz); int8 is never calibrated on "
                                f"made-up data")

    @classmethod
    def describe(cls, s) -> str:
        where = f"DLA core {s.dla_core}" if s.dla_core is not None else "GPU"
        return f"tensorrt, {s.precision} on the {where}"

    def open(self, model: bytes, settings, name: str = "model") -> Runner:
        trt = _tensorrt()
        cudart, gpu = _cuda()
        return TensorRtRunner(model, settings, name, trt, cudart, gpu)


class TensorRtRunner(Runner):
    """One model as TensorRT engines (one per input shape for a fixed-shape model), with the
    Runner interface every stage uses (float32 in, float32 out, resized on demand)."""

    def __init__(self, model: bytes, s: TensorRtSettings, name: str, trt, cudart, gpu: str):
        from edged.runtime.onnxexport import OnnxError, tflite_to_onnx

        self.name, self.s, self.trt, self.cudart, self.gpu = name, s, trt, cudart, gpu
        self.sha = hashlib.sha256(model).hexdigest()
        self.delegate = f"tensorrt {trt.__version__} {s.precision} ({gpu})"
        self._model = model
        try:
            self._onnx = tflite_to_onnx(model, name)
        except OnnxError as exc:
            raise RuntimeError(str(exc)) from None
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._engines: Dict[tuple, object] = {}
        self._shape: Optional[tuple] = None
        inputs, outputs = self._io(self._onnx)
        self._inputs, self._outputs = inputs, outputs
        self.resize(inputs[0]["shape"])

    @staticmethod
    def _io(onnx_bytes: bytes):
        import onnx

        m = onnx.load_from_string(onnx_bytes)
        init = {i.name for i in m.graph.initializer}

        def desc(v):
            dims = [d.dim_value if d.dim_value > 0 else 1 for d in v.type.tensor_type.shape.dim]
            return {"name": v.name, "shape": tuple(dims), "dtype": np.float32}

        return ([desc(v) for v in m.graph.input if v.name not in init],
                [desc(v) for v in m.graph.output])

    def input_details(self) -> list:
        return [dict(d) for d in self._inputs]

    def output_details(self) -> list:
        return [dict(d) for d in self._outputs]

    def resize(self, shape, index: int = 0) -> None:
        shape = tuple(int(x) for x in shape)
        if shape == self._shape:
            return
        key = shape[1:]  # one engine per sample shape, every batch up to MAX_BATCH
        if key not in self._engines:
            self._engines[key] = self._engine(shape)
        self._shape = shape
        self._inputs[index] = dict(self._inputs[index], shape=shape)

    def _engine(self, shape: tuple):
        """The cached engine for ``shape``'s sample shape, or one built (and cached) now."""
        trt = self.trt
        cache = Path(self.s.engine_cache or DEFAULT_CACHE)
        path = cache / engine_key(self.sha, trt.__version__, self.gpu, self.s.precision, shape[1:])
        runtime = trt.Runtime(self._logger)
        if path.is_file():
            engine = runtime.deserialize_cuda_engine(path.read_bytes())
            if engine is not None:
                return engine
            log.warning("%s: the cached engine %s does not load; building it again", self.name,
                        path)
        plan = self._build(shape)
        cache.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(plan)
        os.replace(tmp, path)
        log.info("%s: TensorRT engine built for %s (%s), cached at %s", self.name, shape,
                 self.s.precision, path)
        return runtime.deserialize_cuda_engine(plan)

    def _onnx_for(self, shape: tuple) -> bytes:
        """P-Net's ONNX is made for each pyramid level (tf2onnx bakes the size in)."""
        if self.name != "pnet":
            return self._onnx
        from edged.runtime.onnxexport import pnet_at

        return pnet_at(self._model, shape)

    def _build(self, shape: tuple) -> bytes:
        trt, s = self.trt, self.s
        builder = trt.Builder(self._logger)
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH))
        parser = trt.OnnxParser(network, self._logger)
        if not parser.parse(self._onnx_for(shape)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise RuntimeError(f"TensorRT cannot parse the ONNX of {self.name}: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, s.workspace_mb << 20)
        if s.precision == "fp16":
            config.set_flag(trt.BuilderFlag.FP16)
        elif s.precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)
            config.int8_calibrator = _calibrator(trt, self.cudart, s.int8_calibration, self.name)
        if s.dla_core is not None:
            config.default_device_type = trt.DeviceType.DLA
            config.DLA_core = s.dla_core
            config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
        profile = builder.create_optimization_profile()
        inp = network.get_input(0)
        sample = tuple(shape[1:])
        profile.set_shape(inp.name, (1, *sample), (max(1, shape[0]), *sample),
                          (max(MAX_BATCH, shape[0]), *sample))
        config.add_optimization_profile(profile)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise RuntimeError(f"TensorRT could not build an engine for {self.name} at {shape}")
        return bytes(plan)

    def run(self, *inputs: np.ndarray) -> list:
        if len(inputs) != len(self._inputs):
            raise ValueError(f"{self.name}: expected {len(self._inputs)} inputs, got {len(inputs)}")
        x = np.ascontiguousarray(inputs[0], np.float32)
        if tuple(x.shape) != self._shape:
            self.resize(x.shape)
        engine = self._engines[tuple(x.shape[1:])]
        return _execute(engine, self.cudart, [x])


def _execute(engine, cudart, inputs) -> list:
    """One synchronous inference: host -> device, execute, device -> host."""
    ctx = engine.create_execution_context()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    ins = [n for n in names if engine.get_tensor_mode(n).name == "INPUT"]
    outs = [n for n in names if n not in ins]
    buffers, results = [], []
    try:
        for n, x in zip(ins, inputs):
            ctx.set_input_shape(n, x.shape)
            ptr = _device_copy(cudart, x)
            buffers.append(ptr)
            ctx.set_tensor_address(n, ptr)
        for n in outs:
            out = np.empty(tuple(ctx.get_tensor_shape(n)), np.float32)
            err, ptr = cudart.cudaMalloc(out.nbytes)
            buffers.append(ptr)
            ctx.set_tensor_address(n, ptr)
            results.append((out, ptr))
        err, stream = cudart.cudaStreamCreate()
        ctx.execute_async_v3(stream)
        for out, ptr in results:
            cudart.cudaMemcpyAsync(out.ctypes.data, ptr, out.nbytes,
                                   cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream)
        cudart.cudaStreamSynchronize(stream)
        cudart.cudaStreamDestroy(stream)
        return [out for out, _ in results]
    finally:
        for ptr in buffers:
            cudart.cudaFree(ptr)


def _device_copy(cudart, x: np.ndarray):
    err, ptr = cudart.cudaMalloc(x.nbytes)
    cudart.cudaMemcpy(ptr, x.ctypes.data, x.nbytes, cudart.cudaMemcpyKind.cudaMemcpyHostToDevice)
    return ptr


def _calibrator(trt, cudart, path: str, name: str):
    """An entropy calibrator over the real inputs of ``path`` (a .npz, one array per batch)."""
    batches = [np.ascontiguousarray(a, np.float32) for a in np.load(path).values()]
    if not batches:
        raise RuntimeError(f"{name}: the int8 calibration set {path} is empty")

    class Calibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self):
            super().__init__()
            self.i, self.ptr = 0, None

        def get_batch_size(self):
            return int(batches[0].shape[0])

        def get_batch(self, names):
            if self.i >= len(batches):
                return None
            if self.ptr is not None:
                cudart.cudaFree(self.ptr)
            self.ptr = _device_copy(cudart, batches[self.i])
            self.i += 1
            return [int(self.ptr)]

        def read_calibration_cache(self):
            return None

        def write_calibration_cache(self, cache):
            return None

    return Calibrator()
