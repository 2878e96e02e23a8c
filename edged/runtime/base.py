"""The Runner interface, the TFLite runner, and the plugin base class."""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import logging
import os
import sys
import tempfile
import threading
from typing import Optional

import numpy as np

log = logging.getLogger("edged.runtime")


class DelegateError(RuntimeError):
    """An accelerator was required (``strict: true``) and could not be used."""


class SettingsError(ValueError):
    """An accelerator setting is malformed; the message names the key."""


def threads_text(n: int) -> str:
    """``1 thread``, ``2 threads``: how logs and the status name a CPU runner's threads."""
    return f"{n} thread" if n == 1 else f"{n} threads"


def tflite_module():
    """The TFLite interpreter module: ``ai_edge_litert`` or, on Python 3.8, ``tflite_runtime``."""
    try:
        from ai_edge_litert import interpreter as mod  # Python >= 3.10 boards, x86
    except ImportError:
        try:
            from tflite_runtime import interpreter as mod  # JetPack 5 (Python 3.8)
        except ImportError as exc:
            raise ImportError("neither ai-edge-litert nor tflite-runtime is installed; "
                              "pip install ai-edge-litert (or tflite-runtime on Python 3.8)") from exc
    return mod


_STDERR_LOCK = threading.Lock()


@contextlib.contextmanager
def _tflite_info_to_debug():
    """Route TFLite's native ``INFO:`` lines (one per interpreter) to the debug log.

    LiteRT writes them straight to file descriptor 2 with no setting to turn them off; any
    other line written meanwhile is passed back to stderr unchanged.
    """
    with _STDERR_LOCK:
        try:
            sys.stderr.flush()
            saved = os.dup(2)
        except (OSError, ValueError, AttributeError):
            yield
            return
        with tempfile.TemporaryFile() as tmp:
            os.dup2(tmp.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved, 2)
                os.close(saved)
                tmp.seek(0)
                for line in tmp.read().decode("utf-8", "replace").splitlines():
                    if line.startswith("INFO: "):
                        log.debug("tflite: %s", line[6:])
                    elif line.strip():
                        os.write(2, (line + "\n").encode())


class Runner:
    """A loaded model ready to run.  Subclasses wrap one engine (TFLite, TensorRT, ...)."""

    name: str = "model"
    delegate: str = "unknown"  # what the model actually runs on
    sha256: str = ""
    fallback_reason: Optional[str] = None

    def input_details(self) -> list:
        """``[{"name", "shape", "dtype"}]`` in the model's input order."""
        raise NotImplementedError

    def output_details(self) -> list:
        raise NotImplementedError

    def resize(self, shape, index: int = 0) -> None:
        """Give input ``index`` a new shape (a batch, a pyramid level) and re-plan once."""
        raise NotImplementedError

    def run(self, *inputs: np.ndarray) -> list:
        """Run on ``inputs`` (resizing when a shape differs); outputs in model order, as copies."""
        raise NotImplementedError


class TfliteRunner(Runner):
    def __init__(self, model: bytes, delegates=None, num_threads: Optional[int] = None,
                 name: str = "model", delegate_name: str = "cpu (XNNPACK)"):
        mod = tflite_module()
        self._model = model  # keep the buffer alive for the interpreter's lifetime
        self.name = name
        self.delegate = delegate_name
        kwargs = {"model_content": model, "num_threads": num_threads}
        if delegates:
            kwargs["experimental_delegates"] = list(delegates)
        with _tflite_info_to_debug():
            self.interpreter = mod.Interpreter(**kwargs)
            self.interpreter.allocate_tensors()
        self._inputs = self.interpreter.get_input_details()
        self._outputs = self.interpreter.get_output_details()

    @staticmethod
    def _describe(details) -> list:
        return [{"name": d["name"], "shape": tuple(int(x) for x in d["shape"]), "dtype": d["dtype"]}
                for d in details]

    def input_details(self) -> list:
        return self._describe(self._inputs)

    def output_details(self) -> list:
        return self._describe(self.interpreter.get_output_details())

    def resize(self, shape, index: int = 0) -> None:
        shape = [int(s) for s in shape]
        if list(self._inputs[index]["shape"]) == shape:
            return
        with _tflite_info_to_debug():
            self.interpreter.resize_tensor_input(self._inputs[index]["index"], shape)
            self.interpreter.allocate_tensors()
        self._inputs = self.interpreter.get_input_details()
        self._outputs = self.interpreter.get_output_details()

    def run(self, *inputs: np.ndarray) -> list:
        if len(inputs) != len(self._inputs):
            raise ValueError(f"{self.name}: expected {len(self._inputs)} inputs, got {len(inputs)}")
        for i, x in enumerate(inputs):
            if tuple(x.shape) != tuple(self._inputs[i]["shape"]):
                self.resize(x.shape, i)
        interp = self.interpreter
        for d, x in zip(self._inputs, inputs):
            interp.set_tensor(d["index"], _quantized(x, d))
        interp.invoke()
        return [_dequantized(interp.get_tensor(d["index"]), d) for d in self._outputs]


def _quantized(x: np.ndarray, d: dict) -> np.ndarray:
    """``x`` as the input tensor ``d`` takes it: a float array quantised with the tensor's own
    scale and zero point when the model's input is int8 (a fully int8 model)."""
    dtype = np.dtype(d["dtype"])
    scale, zero = d.get("quantization") or (0.0, 0)
    if dtype.kind in "iu" and scale and np.asarray(x).dtype.kind == "f":
        info = np.iinfo(dtype)
        q = np.rint(np.asarray(x, np.float32) / np.float32(scale)) + zero
        return np.ascontiguousarray(np.clip(q, info.min, info.max), dtype=dtype)
    return np.ascontiguousarray(x, dtype=dtype)


def _dequantized(y: np.ndarray, d: dict) -> np.ndarray:
    """An int8 output as floats (its scale and zero point); other outputs as they are."""
    scale, zero = d.get("quantization") or (0.0, 0)
    if y.dtype.kind in "iu" and scale:
        return (y.astype(np.float32) - np.float32(zero)) * np.float32(scale)
    return y


@dataclasses.dataclass
class CommonSettings:
    """Settings every accelerator type takes."""

    num_threads: Optional[int] = None  # CPU threads (for the CPU and for fallbacks)
    strict: bool = False  # fail start-up instead of falling back to the CPU


class AcceleratorPlugin:
    """One accelerator type, keyed by ``type_key``, with its own typed ``Settings``."""

    type_key: str = ""
    Settings = CommonSettings

    @classmethod
    def parse(cls, raw: dict, where: str = "accelerator"):
        fields = {f.name: f for f in dataclasses.fields(cls.Settings)}
        for key, value in raw.items():
            if key not in fields:
                raise SettingsError(f"{where}.{key}: unknown key for accelerator {cls.type_key!r}; "
                                    f"expected one of {', '.join(sorted(fields))}")
        values = dict(raw)
        s = cls.Settings(**values)
        nt = s.num_threads
        if nt is not None and (not isinstance(nt, int) or isinstance(nt, bool) or nt < 1):
            raise SettingsError(f"{where}.num_threads: expected a positive integer, got {nt!r}")
        if not isinstance(s.strict, bool):
            raise SettingsError(f"{where}.strict: expected true or false, got {s.strict!r}")
        cls.check(s, where)
        return s

    @classmethod
    def check(cls, settings, where: str) -> None:
        """Type checks of the plugin's own keys."""

    @classmethod
    def describe(cls, settings) -> str:
        return cls.type_key

    def open(self, model: bytes, settings, name: str = "model") -> Runner:
        raise NotImplementedError


def load_delegate(library: str, options: Optional[dict] = None):
    """Load a TFLite delegate library; raises OSError or ValueError when it cannot."""
    mod = tflite_module()
    # Open it with ctypes first: a missing library then fails with a clean OSError instead of
    # the half-built Delegate object LiteRT leaves behind (which errors again in __del__).
    lib = ctypes.CDLL(library)
    if not hasattr(lib, "tflite_plugin_create_delegate"):
        raise ValueError(f"{library} is not a TFLite delegate library "
                         f"(it has no tflite_plugin_create_delegate symbol)")
    opts = {str(k): str(v) for k, v in (options or {}).items()}
    return mod.load_delegate(library, opts)


class DelegatePlugin(AcceleratorPlugin):
    """A TFLite delegate loaded from a shared library (GPU, NNAPI, Edge TPU, external)."""

    default_library = ""

    @classmethod
    def library_of(cls, settings) -> str:
        return getattr(settings, "library", "") or cls.default_library

    @classmethod
    def options_of(cls, settings) -> dict:
        return dict(getattr(settings, "options", None) or {})

    @classmethod
    def check(cls, settings, where: str) -> None:
        lib = getattr(settings, "library", "")
        if lib is not None and not isinstance(lib, str):
            raise SettingsError(f"{where}.library: expected a path or library name, got {lib!r}")
        opts = getattr(settings, "options", None)
        if opts is not None and not isinstance(opts, dict):
            raise SettingsError(f"{where}.options: expected a mapping, got {opts!r}")

    @classmethod
    def describe(cls, settings) -> str:
        return f"{cls.type_key}, library {cls.library_of(settings)}"

    def open(self, model: bytes, settings, name: str = "model") -> Runner:
        lib = self.library_of(settings)
        delegate = load_delegate(lib, self.options_of(settings))
        return TfliteRunner(model, [delegate], settings.num_threads, name,
                            delegate_name=f"{self.type_key} ({lib})")
