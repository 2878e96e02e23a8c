"""Int8 variants of edged's models (``edged models quantize``), made with ai-edge-quantizer.

Three recipes, each applied to P-Net, R-Net, O-Net and the embedder (the installed
dynamic-batch MobileFaceNet):

- ``dynamic``: int8 weights (per channel), float activations quantised on the fly by the
  kernels; no calibration;
- ``static``: int8 weights and int8 activations, activation ranges calibrated on real faces;
  the model's inputs and outputs stay float32 (a QUANTIZE op after the input, DEQUANTIZE
  before each output), so it runs through edged's runtime unchanged;
- ``mixed``: ``static`` with the layers that lose most kept in float (chosen from the
  per-layer error report of ``static``, :func:`layer_errors`).

Calibration samples are exactly what the float pipeline feeds each net (recorded from the
running float detector, :class:`_RecordingDetector`): P-Net at every pyramid level, R-Net and
O-Net on the candidate crops of the earlier stages, the embedder on aligned faces.

Two things about the published models that the quantiser needs (:func:`prepare_float`): their
operator codes are in the old ``deprecated_builtin_code`` field (ai-edge-quantizer reads only
``builtin_code`` and would take every op for an ADD), and they have no signature (the
quantiser's calibration runs signatures).  Both are rewritten in a float copy whose outputs
are bit-identical to the original's; the manifest records the sha256 of the file quantised
from (the installed one) all the same.

Each set is written with a drop manifest (``manifest.json``, the format of docs/ota.md) that
also carries, per model, the source model's sha256, the recipe and the calibration set.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import contextlib
import io
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from edged.runtime import modelstore
from edged.runtime.tflitefile import ModelFormatError, check_model_bytes, pnet_model_for

ROLES = modelstore.ROLES
RECIPES = ("dynamic", "static", "mixed")  # the default sets
FULL = "full"  # every op, the input and the output in int8 (--full-int8; edged.runtime.fullint8)
#: file name suffix of each recipe's models: mtcnn_pnet.int8-static.tflite
SUFFIX = {"dynamic": "int8-dynamic", "static": "int8-static", "mixed": "int8-mixed",
          FULL: "int8-full"}
#: samples per calibration batch (R-Net, O-Net, embedder) and the caps per net
BATCH = {"rnet": 32, "onet": 16, "embedder": 8}
MAX_SAMPLES = {"pnet": 160, "rnet": 1024, "onet": 512, "embedder": 256}
#: the share of samples held back from calibration for the per-layer error report
VALIDATION_SHARE = 0.2
#: a person of the dev set is in the calibration split when sha256(name) % CAL_MOD == 0
CAL_MOD = 8
SIGNATURE = "serving_default"
IMAGE_EXT = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
VIDEO_STEP = 30  # every 30th frame of each clip


class QuantizeError(Exception):
    """A model, a calibration source or the quantiser itself is not usable; says which and why."""


def quantizer_api():
    """The ``ai_edge_quantizer`` modules ``(quantizer, recipe, validation_utils)``."""
    try:
        from ai_edge_quantizer import quantizer, recipe
        from ai_edge_quantizer.utils import validation_utils
    except ImportError as exc:
        raise QuantizeError(f"ai-edge-quantizer is not installed ({exc}): pip install "
                            f"'edged[quantize]' (needs Python >= 3.10)") from None
    return quantizer, recipe, validation_utils


def quantizer_version() -> str:
    try:
        from importlib.metadata import version
        return version("ai-edge-quantizer")
    except Exception:  # noqa: BLE001  (metadata missing: report it, do not fail)
        return "unknown"


@contextlib.contextmanager
def _quiet():
    """Without the quantiser's progress bars (tqdm, on sys.stderr) and its warning that
    keeping every tensor (calibration, validation) is for debugging."""
    with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*experimental_preserve_all_tensors.*")
        yield


# ---------------------------------------------------------------------------- the float model


def prepare_float(data: bytes, where: str = "model") -> bytes:
    """A copy of a float TFLite model the quantiser reads correctly: operator codes moved to
    ``builtin_code`` and one signature (``serving_default``: ``input``, ``output_0``...)."""
    try:
        check_model_bytes(data)
    except ModelFormatError as exc:
        raise QuantizeError(f"{where}: {exc}") from None
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    try:
        model = flatbuffer_utils.read_model_from_bytearray(bytearray(data))
    except Exception as exc:  # noqa: BLE001  (the flatbuffer reader raises anything)
        raise QuantizeError(f"{where}: not a readable TFLite model: {exc}") from None
    for code in model.operatorCodes:
        code.builtinCode = max(code.builtinCode, code.deprecatedBuiltinCode)
    sg = model.subgraphs[0]
    if len(sg.inputs) != 1:
        raise QuantizeError(f"{where}: has {len(sg.inputs)} inputs; edged's nets have one")
    if any(t.type != schema.TensorType.FLOAT32 for t in (sg.tensors[i] for i in sg.inputs)):
        raise QuantizeError(f"{where}: its input is not float32 (already quantised?)")

    def entry(name: str, index: int):
        t = schema.TensorMapT()
        t.name, t.tensorIndex = name, int(index)
        return t

    sig = schema.SignatureDefT()
    sig.signatureKey, sig.subgraphIndex = SIGNATURE, 0
    sig.inputs = [entry("input", sg.inputs[0])]
    sig.outputs = [entry(f"output_{k}", i) for k, i in enumerate(sg.outputs)]
    model.signatureDefs = [sig]
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def at_shape(role: str, data: bytes, shape) -> bytes:
    """The model declared for input ``shape`` (P-Net only; the others resize by batch)."""
    return pnet_model_for(data, shape) if role == "pnet" else data


# ---------------------------------------------------------------------------- recipes


def recipe_for(kind: str, float_tensors: Sequence[str] = ()) -> list:
    """The ai-edge-quantizer recipe (a list of rules, later ones win) for ``kind``; the ops
    producing ``float_tensors`` stay in float (``mixed``)."""
    _, recipe, _ = quantizer_api()
    if kind == "dynamic":
        return list(recipe.dynamic_wi8_afp32())
    if kind == FULL:  # (on a model without NEG and ABS: fullint8.without_neg_abs)
        return list(recipe.static_wi8_ai8())
    if kind not in ("static", "mixed"):
        raise QuantizeError(f"unknown recipe {kind!r}; expected one of "
                            f"{', '.join(RECIPES + (FULL,))}")
    rules = list(recipe.static_wi8_ai8())
    # float32 in and out: the runtime feeds floats (a QUANTIZE op is inserted after the input)
    rules += [{"regex": ".*", "operation": op, "algorithm_key": "no_quantize"}
              for op in ("INPUT", "OUTPUT")]
    rules += [{"regex": "^" + re.escape(name) + ";", "operation": "*",
               "algorithm_key": "no_quantize"} for name in float_tensors]
    return rules


def _signature_data(samples: Sequence[np.ndarray]) -> dict:
    return {SIGNATURE: [{"input": x} for x in samples]}


def calibrate(role: str, float_model: bytes, samples: Sequence[np.ndarray]) -> dict:
    """Activation ranges of a prepared float model on ``samples`` (for the static recipes).

    Calibrated at the samples' own size: at P-Net's declared 1280 x 960 input the calibrator
    would keep every activation at that size (about 1.5 GB)."""
    quantizer, _, _ = quantizer_api()
    if not samples:
        raise QuantizeError(f"{role}: the static recipes need calibration samples, got none")
    small = at_shape(role, float_model, samples[0].shape)
    cal = quantizer.Quantizer(bytearray(small), recipe_for("static"))
    with _quiet():
        return cal.calibrate(_signature_data(samples), num_threads=1)


def quantize_model(role: str, float_model: bytes, kind: str, ranges: Optional[dict] = None,
                   float_tensors: Sequence[str] = ()) -> bytes:
    """Quantise one prepared float model (:func:`prepare_float`) with recipe ``kind``;
    ``ranges`` from :func:`calibrate` for the static recipes."""
    quantizer, _, _ = quantizer_api()
    q = quantizer.Quantizer(bytearray(float_model), recipe_for(kind, float_tensors))
    if q.need_calibration and ranges is None:
        raise QuantizeError(f"{role}: recipe {kind!r} needs calibration ranges (calibrate())")
    try:
        with _quiet():
            result = q.quantize(ranges if q.need_calibration else None,
                                enable_progress_report=False, enable_progress_bar=False)
    except Exception as exc:  # noqa: BLE001  (the quantiser's own errors: say which model)
        raise QuantizeError(f"{role}: ai-edge-quantizer failed with recipe {kind!r}: {exc}") from exc
    return bytes(result.quantized_model)


# ---------------------------------------------------------------------------- per-layer errors


def _snr_db(snr: float) -> float:
    return 10.0 * math.log10(max(float(snr), 1e-12))


def _op_graph(float_model: bytes) -> list:
    """``[(op type, output tensor name, [activation input names])]`` in graph order."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model_from_bytearray(bytearray(float_model))
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    sg = model.subgraphs[0]

    def name(i: int) -> str:
        t = sg.tensors[i]
        return t.name.decode() if isinstance(t.name, bytes) else str(t.name)

    def constant(i: int) -> bool:
        buf = model.buffers[sg.tensors[i].buffer]
        return buf.data is not None and len(buf.data) > 0

    out = []
    for op in sg.operators:
        code = model.operatorCodes[op.opcodeIndex]
        kind = names.get(max(code.builtinCode, code.deprecatedBuiltinCode), "?")
        ins = [name(i) for i in op.inputs if i >= 0 and not constant(i)]
        out.append((kind, name(op.outputs[0]), ins))
    return out


#: op types that do the arithmetic of a layer (their weights dominate the error)
WEIGHTED_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")
#: the SNR of an exact (float) input, for a layer's own loss: about that of an int8 signal
#: using its full range (6.02 * 8 + 1.76 dB), so the first layer is not ranked first by default
EXACT_SNR_DB = 50.0


def _layers(graph: list) -> List[dict]:
    """The layers of a graph: each weighted op and the ops after it up to the next one (its
    bias, PReLU, residual ADD): ``{"op", "tensor" (the weighted op's output), "inputs",
    "tensors" (every output in the layer), "output" (the last one)}``."""
    layers = []
    for kind, out, ins in graph:
        if kind in WEIGHTED_OPS or not layers:
            layers.append({"op": kind, "tensor": out, "inputs": ins, "tensors": []})
        layers[-1]["tensors"].append(out)
        layers[-1]["output"] = out
    return layers


def layer_errors(role: str, float_model: bytes, quant_model: bytes,
                 samples: Sequence[np.ndarray]) -> List[dict]:
    """The layers of ``quant_model`` whose int8 output departs most from float, worst first.

    Measured with ai-edge-quantizer's own validator (every tensor of both models kept and
    compared on ``samples``).  Per layer (a weighted op and its activation, :func:`_layers`):
    the SNR (dB) and cosine to float of its output, and ``loss_db``, the SNR the layer itself
    loses (its input's SNR, at most EXACT_SNR_DB, minus its output's), which separates the
    layers that add error from those that pass on earlier error.
    """
    quantizer, _, vu = quantizer_api()
    shape = samples[0].shape
    ref, target = at_shape(role, float_model, shape), at_shape(role, quant_model, shape)
    q = quantizer.Quantizer(bytearray(ref), previous_quantized_model=bytearray(target))
    metrics = [vu.ValidationErrorMetric.SNR, vu.ValidationErrorMetric.COSINE_SIMILARITY]
    with _quiet():
        result = q.validate(_signature_data(samples), error_metrics=metrics, num_threads=1)
    per_tensor = result.get_all_tensor_results()

    def snr(name: str) -> float:
        return _snr_db(per_tensor[name]["snr"]) if name in per_tensor else EXACT_SNR_DB

    rows = []
    for layer in _layers(_op_graph(float_model)):
        out = layer["output"]
        if out not in per_tensor:
            continue
        before = min([min(snr(i), EXACT_SNR_DB) for i in layer["inputs"]] or [EXACT_SNR_DB])
        rows.append({"op": layer["op"], "tensor": layer["tensor"], "output": out,
                     "ops": len(layer["tensors"]), "snr_db": round(snr(out), 2),
                     "cosine": round(per_tensor[out]["cosine_similarity"], 6),
                     "loss_db": round(before - snr(out), 2), "tensors": layer["tensors"]})
    rows.sort(key=lambda r: -r["loss_db"])
    return rows


def output_names(float_model: bytes) -> set:
    """The names of the model's output tensors."""
    from ai_edge_litert.tools import flatbuffer_utils

    sg = flatbuffer_utils.read_model_from_bytearray(bytearray(float_model)).subgraphs[0]
    names = (sg.tensors[i].name for i in sg.outputs)
    return {n.decode() if isinstance(n, bytes) else str(n) for n in names}


def output_snr(rows: List[dict], float_model: bytes) -> float:
    """The lowest SNR (dB) among the model's outputs in a :func:`layer_errors` report."""
    outs = output_names(float_model)
    vals = [r["snr_db"] for r in rows if r["output"] in outs]
    return min(vals) if vals else float("nan")


def worst_layers(rows: List[dict], n: int) -> List[str]:
    """Every op output of the ``n`` layers that lose the most SNR themselves (to keep in float)."""
    worst = [r for r in rows if r["op"] in WEIGHTED_OPS and r["loss_db"] > 0][:n]
    return [t for r in worst for t in r["tensors"]]


# ---------------------------------------------------------------------------- calibration


@dataclass
class Calibration:
    """The inputs each net gets from the float pipeline, and where they came from."""

    samples: Dict[str, List[np.ndarray]] = field(default_factory=dict)  # role -> model inputs
    description: dict = field(default_factory=dict)

    def split(self, role: str) -> tuple:
        """``(calibration samples, validation samples)``: the last VALIDATION_SHARE held back."""
        s = self.samples.get(role, [])
        k = max(1, int(round(len(s) * VALIDATION_SHARE))) if len(s) > 1 else 0
        return s[:len(s) - k], (s[len(s) - k:] or s)


def calibration_person(name: str) -> bool:
    """Whether a dev-set person (folder name, or the ``<identity>__`` prefix of an unknown/
    file) is in the calibration split: evaluations leave these people out."""
    return int(hashlib.sha256(name.encode("utf-8")).hexdigest()[:8], 16) % CAL_MOD == 0


def person_of(path: Path) -> str:
    """The identity of a dev-set photo: its folder, or the prefix of an ``unknown/`` file."""
    if path.parent.name == "unknown":
        return path.name.split("__", 1)[0]
    return path.parent.name


def _recorder_class():
    from edged.vision.detect import MtcnnDetector

    class _Recorder:
        def __init__(self, inner, sink: list):
            self.inner, self.sink = inner, sink

        def run(self, x):
            self.sink.append(np.array(x, dtype=np.float32, copy=True))
            return self.inner.run(x)

        def __getattr__(self, key):
            return getattr(self.inner, key)

    class _RecordingDetector(MtcnnDetector):
        """The float MTCNN, recording every input it gives each net."""

        def __init__(self, *args, **kwargs):
            self.recorded = {"pnet": [], "rnet": [], "onet": []}
            super().__init__(*args, **kwargs)
            self.rnet = _Recorder(self.rnet, self.recorded["rnet"])
            self.onet = _Recorder(self.onet, self.recorded["onet"])

        def _pnet_for(self, shape):
            return _Recorder(super()._pnet_for(shape), self.recorded["pnet"])

    return _RecordingDetector


def _spread(items: list, cap: int) -> list:
    """At most ``cap`` of ``items``, evenly spaced (deterministic)."""
    if len(items) <= cap:
        return list(items)
    idx = np.linspace(0, len(items) - 1, cap).round().astype(int)
    return [items[i] for i in sorted(set(idx.tolist()))]


def _batches(rows: List[np.ndarray], role: str) -> List[np.ndarray]:
    if not rows:
        return []
    x = np.concatenate(rows)
    x = x[np.linspace(0, len(x) - 1, min(len(x), MAX_SAMPLES[role])).round().astype(int)]
    b = BATCH[role]
    return [x[i:i + b] for i in range(0, len(x), b)]


def calibrate_on_images(mtcnn_images: Sequence[np.ndarray], face_images: Sequence[np.ndarray],
                        models_dir=None, description: Optional[dict] = None) -> Calibration:
    """Record the float pipeline's inputs to each net: MTCNN on ``mtcnn_images`` (BGR), the
    embedder on the central aligned face of each of ``face_images``."""
    from edged.vision.align import align_face
    from edged.vision.embed import Embedder
    from edged.vision.pipeline import central_face

    blobs = {r: modelstore.read_verified(r, models_dir)[0] for r in ("pnet", "rnet", "onet")}
    det = _recorder_class()(blobs["pnet"], blobs["rnet"], blobs["onet"])
    for img in mtcnn_images:
        det.detect(img)
    faces = []
    for img in face_images:
        face = central_face(det.detect(img), img.shape)
        if face is not None:
            faces.append(align_face(img, face.landmarks))
    emb = Embedder.from_models(models_dir)
    cal = Calibration(description=dict(description or {}))
    cal.samples["pnet"] = _spread(det.recorded["pnet"], MAX_SAMPLES["pnet"])
    cal.samples["rnet"] = _batches(det.recorded["rnet"], "rnet")
    cal.samples["onet"] = _batches(det.recorded["onet"], "onet")
    cal.samples["embedder"] = _batches([emb._batch(faces)] if faces else [], "embedder")
    cal.description["samples"] = {
        "pnet": f"{len(cal.samples['pnet'])} pyramid levels",
        "rnet": f"{sum(map(len, cal.samples['rnet']))} candidate crops 24x24",
        "onet": f"{sum(map(len, cal.samples['onet']))} candidate crops 48x48",
        "embedder": f"{sum(map(len, cal.samples['embedder']))} aligned faces 112x112"}
    missing = [r for r in ROLES if not cal.samples[r]]
    if missing:
        raise QuantizeError(f"calibration images gave no samples for {', '.join(missing)} "
                            f"(no face found in {len(mtcnn_images)} + {len(face_images)} images)")
    return cal


def _clip_frames(videos: Path, step: int, cap: int) -> tuple:
    import cv2

    frames, used = [], {}
    for clip in sorted(videos.glob("*.mp4")):
        cap_ = cv2.VideoCapture(str(clip))
        i, got = 0, []
        while len(got) < cap:
            ok, frame = cap_.read()
            if not ok:
                break
            if i % step == 0:
                frames.append(frame)
                got.append(i)
            i += 1
        cap_.release()
        used[clip.name] = got
    return frames, used


def dev_photos(dev: Path) -> List[Path]:
    return sorted(p for p in dev.rglob("*") if p.suffix.lower() in IMAGE_EXT and p.is_file())


def calibration_from_dir(source: Path, models_dir=None, max_photos: int = 160,
                         frames_per_clip: int = 12) -> Calibration:
    """Calibration from a data folder laid out as ../shared: ``videos/*.mp4`` (every
    VIDEO_STEP-th frame, at most ``frames_per_clip`` a clip) and the photos of the dev-set
    people in the calibration split (:func:`calibration_person`), at most ``max_photos``."""
    from edged.vision.imageio import ImageError, load_image

    source = Path(source)
    dev = source / "faces" / "dev"
    if not dev.is_dir():
        raise QuantizeError(f"{source}: no faces/dev folder: the calibration source must be laid "
                            f"out as ../shared (faces/dev/<person>/*.jpg, videos/*.mp4)")
    photos = _spread([p for p in dev_photos(dev) if calibration_person(person_of(p))], max_photos)
    images = []
    for p in photos:
        try:
            images.append(load_image(p))
        except ImageError:
            continue
    frames, used = _clip_frames(source / "videos", VIDEO_STEP, frames_per_clip)
    desc = {"source": str(source.resolve()),
            "dev_people": sorted({person_of(p) for p in photos}),
            "dev_split": f"people with int(sha256(name)[:8], 16) % {CAL_MOD} == 0 "
                         f"(edged.runtime.quantize.calibration_person); evaluations leave them out",
            "dev_photos": len(images), "clip_frames": used}
    return calibrate_on_images(images + frames, images, models_dir, desc)


def default_calibration_source() -> Optional[Path]:
    shared = modelstore.CHECKOUT_ROOT.parent / "shared"
    return shared if (shared / "faces" / "dev").is_dir() else None


# ---------------------------------------------------------------------------- a whole set


def source_models(models_dir=None) -> Dict[str, tuple]:
    """``role -> (verified bytes, sha256, file name)`` of the installed float models."""
    out = {}
    for role in ROLES:
        data, digest, path = modelstore.read_verified(role, models_dir)
        out[role] = (data, digest, Path(path).name)
    return out


def output_name(source_file: str, kind: str) -> str:
    return f"{Path(source_file).stem}.{SUFFIX[kind]}.tflite"


def write_set(out: Path, kind: str, models: Dict[str, bytes], sources: Dict[str, tuple],
              calibration: Calibration, float_layers: Dict[str, List[str]]) -> Path:
    """Write one quantised set and its drop manifest into ``out``; return the manifest path."""
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for role, data in models.items():
        _, src_sha, src_file = sources[role]
        name = output_name(src_file, kind)
        modelstore.atomic_write(out / name, data)
        entries.append({
            "role": role, "file": name, "sha256": modelstore.sha256_bytes(data), "size": len(data),
            "quantization": {
                "recipe": kind, "source_file": src_file, "source_sha256": src_sha,
                "tool": f"ai-edge-quantizer {quantizer_version()}",
                "float_layers": list(float_layers.get(role, [])),
                "calibration": calibration.description.get("samples", {}).get(role, "")
                if kind != "dynamic" else "none (weights only)"}})
    manifest = {"format": "edged-model-manifest", "version": 1,
                "quantization": {"recipe": kind, "date": datetime.date.today().isoformat(),
                                 "calibration": calibration.description},
                "models": entries}
    path = out / "manifest.json"
    modelstore.atomic_write(path, (json.dumps(manifest, indent=2) + "\n").encode())
    return path


def _report_rows(rows: List[dict], n: int = 8) -> List[dict]:
    return [{k: v for k, v in r.items() if k != "tensors"} for r in rows[:n]]


#: the output SNR a layer kept in float must add for ``mixed`` to keep it (dB)
MIN_GAIN_DB = 0.5


def choose_float_layers(role: str, float_model: bytes, ranges: dict, samples, rows: List[dict],
                        n: int) -> tuple:
    """Greedy mixed precision: keep the layer that loses most in float, re-quantise, measure
    again; up to ``n`` layers, each kept only if the output SNR gains MIN_GAIN_DB.  Returns
    ``(model, its layer rows, names of the layers kept in float, their op outputs)``."""
    keep, names, model = [], [], None
    best = output_snr(rows, float_model)
    for _ in range(n):
        cand = [r for r in rows if r["op"] in WEIGHTED_OPS and r["loss_db"] > 0
                and r["tensor"] not in names]
        if not cand:
            break
        trial = keep + cand[0]["tensors"]
        m = quantize_model(role, float_model, "mixed", ranges, trial)
        r = layer_errors(role, float_model, m, samples)
        if output_snr(r, float_model) < best + MIN_GAIN_DB:
            break  # keeping it in float does not recover enough: stop here
        keep, model, rows, best = trial, m, r, output_snr(r, float_model)
        names.append(cand[0]["tensor"])
    if model is None:
        model = quantize_model(role, float_model, "mixed", ranges, ())
    return model, rows, names, keep


def quantize_all(calibration: Calibration, out: Path, recipes: Sequence[str] = RECIPES,
                 models_dir=None, float_layers: int = 2, log=print) -> dict:
    """Make every recipe's set under ``out/<recipe>/``, and ``out/report.json``: per set and
    model the output SNR and the worst layers (:func:`layer_errors`) on held-back samples.
    ``mixed`` keeps in float up to ``float_layers`` layers chosen by
    :func:`choose_float_layers` from the ``static`` report."""
    for kind in recipes:
        if kind not in RECIPES + (FULL,):
            raise QuantizeError(f"unknown recipe {kind!r}; expected one of "
                                f"{', '.join(RECIPES + (FULL,))}")
    sources = source_models(models_dir)
    prepared = {r: prepare_float(sources[r][0], sources[r][2]) for r in ROLES}
    static = [k for k in recipes if k not in ("dynamic", FULL)]
    ranges = {r: calibrate(r, prepared[r], calibration.split(r)[0]) for r in ROLES} if static else {}
    report = {"calibration": calibration.description, "sets": {}}
    static_rows: Dict[str, list] = {}
    for kind in dict.fromkeys((["static"] if static else []) + [k for k in recipes if k != FULL]):
        models, layers = {}, {}
        for role in ROLES:
            val = calibration.split(role)[1][:4]
            names = []
            if kind == "mixed":
                models[role], rows, names, _ = choose_float_layers(
                    role, prepared[role], ranges[role], val, static_rows[role], float_layers)
            else:
                models[role] = quantize_model(role, prepared[role], kind, ranges.get(role))
                rows = layer_errors(role, prepared[role], models[role], val)
            if kind == "static":
                static_rows[role] = rows
            layers[role] = {"output_snr_db": output_snr(rows, prepared[role]),
                            "float_layers": names, "worst": _report_rows(rows)}
            log(f"{kind:<8} {role:<9} {len(models[role]):>9} bytes  output SNR "
                f"{layers[role]['output_snr_db']:6.1f} dB  worst layer "
                f"{rows[0]['tensor'] if rows else '-'} ({rows[0]['loss_db'] if rows else 0} dB "
                f"lost)" + (f"; in float: {', '.join(names) or 'none'}" if kind == "mixed" else ""))
        if kind in recipes:
            manifest = write_set(out / kind, kind, models, sources, calibration,
                                 {r: layers[r]["float_layers"] for r in ROLES})
            report["sets"][kind] = {"manifest": str(manifest), "models": layers}
    if FULL in recipes:
        from edged.runtime.fullint8 import full_set

        report["sets"][FULL] = full_set(calibration, out, sources, prepared, log)
    modelstore.atomic_write(out / "report.json", (json.dumps(report, indent=2) + "\n").encode())
    return report
