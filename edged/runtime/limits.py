"""Memory bounds of a model, checked before the daemon builds anything for it.

A dropped model is refused when, at one of the input sizes it will run at, it needs more
memory than ``models.max_memory_mb`` (:data:`DEFAULT_MAX_MB` by default).  The sizes are
those of the daemon: for P-Net every level of the image pyramid of every camera's frame size
(the camera's resolution once known, else its configured ``width`` x ``height``, else
:data:`DEFAULT_FRAME`), for R-Net, O-Net and the embedder every batch size they use (the
powers of two up to their largest batch).  Two checks, in this order:

1. **Declared tensors**, read from the flatbuffer with no interpreter: a tensor that is not a
   constant and whose declared shape takes more than the limit is refused (for P-Net, as
   declared for each pyramid level, which is how the detector opens it).
2. **A trial run in a child process** whose address space is limited (``RLIMIT_AS``) to what
   it uses after start-up plus the limit: the model is opened on the CPU, resized to each
   input size, allocated and invoked once on zeros, as the daemon would.  An allocation over
   the limit fails in the child (TFLite reports it, or the child dies), never in the daemon;
   that, a crash or a run longer than :data:`CHECK_TIMEOUT_S` is a refusal that names the
   input size.  The child reports the address space each size took.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Iterable, List, Sequence

MB = 1 << 20
DEFAULT_MAX_MB = 512
DEFAULT_FRAME = (1920, 1080)  # (width, height) of a camera whose size is not known yet
CHECK_TIMEOUT_S = 300.0


class ModelMemoryError(ValueError):
    """A model needs more memory than allowed (or its memory could not be checked)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# ---------------------------------------------------------------------------- sizes


def _batches(sample: tuple, max_batch: int) -> List[tuple]:
    shapes, n = [], 1
    while n <= max_batch:
        shapes.append((n,) + sample)
        n *= 2
    return shapes


def run_shapes(role: str, frames: Iterable[Sequence[int]] = (), detection=None) -> List[tuple]:
    """Every input shape ``role`` runs at: P-Net's pyramid levels for the ``(width, height)``
    frames (:data:`DEFAULT_FRAME` when none), the batch sizes of the other models."""
    from edged.vision.detect import ONET_MAX_BATCH, RNET_MAX_BATCH, DetectionSettings, pnet_levels
    from edged.vision.embed import MAX_BATCH

    if role == "rnet":
        return _batches((24, 24, 3), RNET_MAX_BATCH)
    if role == "onet":
        return _batches((48, 48, 3), ONET_MAX_BATCH)
    if role == "embedder":
        return _batches((112, 112, 3), MAX_BATCH)
    if role == "antispoof":
        return [(1, 256, 256, 3)]  # one face at a time (edged.vision.liveness)
    if role != "pnet":
        raise ValueError(f"unknown model role {role!r}")
    d = detection or DetectionSettings()
    shapes = set()
    for w, h in (list(frames) or [DEFAULT_FRAME]):
        shapes.update(shape for _, shape in pnet_levels(int(h), int(w), d.min_face, d.scale_factor))
    return sorted(shapes, key=lambda s: (-s[1] * s[2], s))


# ---------------------------------------------------------------------------- checks


def _model_for(role: str, data: bytes, shape) -> bytes:
    from edged.runtime.tflitefile import pnet_model_for

    return pnet_model_for(data, shape) if role == "pnet" else data


def check_declared(role: str, data: bytes, shapes, limit_bytes: int, where) -> None:
    """Refuse a non-constant tensor whose declared shape takes more than ``limit_bytes``."""
    from edged.runtime.tflitefile import ModelFormatError, tensor_infos

    variants = [(None, data)] + ([(s, _model_for(role, data, s)) for s in shapes]
                                 if role == "pnet" else [])
    for shape, model in variants:
        try:
            infos = tensor_infos(model)
        except (ModelFormatError, ValueError) as exc:
            raise ModelMemoryError(f"{where}: {exc}") from None
        for t in infos:
            if not t.constant and t.nbytes > limit_bytes:
                at = f" (as declared for input {list(shape)})" if shape else ""
                raise ModelMemoryError(
                    f"{where}: tensor {t.index} {t.name!r} declares shape {list(t.shape)}{at}, "
                    f"{t.nbytes / MB:.0f} MB: over the {limit_bytes // MB} MB a model may use "
                    f"(models.max_memory_mb)")


def trial_run(role: str, data: bytes, shapes, limit_bytes: int, where,
              timeout: float = CHECK_TIMEOUT_S) -> dict:
    """Run the model at every shape in a child process limited to ``limit_bytes`` more address
    space than it starts with; ``{"baseline": bytes, "peak": bytes over it, "shapes": n}``."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "edged.runtime.limits", role, str(int(limit_bytes)),
           json.dumps([list(s) for s in shapes])]
    limit_txt = f"the {limit_bytes // MB} MB a model may use (models.max_memory_mb)"
    try:
        proc = subprocess.run(cmd, input=data, capture_output=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise ModelMemoryError(f"{where}: the memory check did not finish in {timeout:.0f} s "
                               f"({len(shapes)} input sizes)") from None
    lines = [json.loads(x) for x in proc.stdout.decode("utf-8", "replace").splitlines()
             if x.startswith("{")]
    last = lines[-1] if lines else {}
    if proc.returncode == 0 and last.get("done"):
        return last
    shape = last.get("shape")
    at = f" at input {shape}" if shape else ""
    if "error" in last:
        detail = last["error"] or "allocation failed"
        raise ModelMemoryError(f"{where}: needs more than {limit_txt}{at}: {detail}")
    how = (f"killed by signal {-proc.returncode}" if proc.returncode < 0
           else f"exit status {proc.returncode}")
    tail = proc.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or [""]
    raise ModelMemoryError(f"{where}: the memory check failed{at} ({how}; over {limit_txt}?) "
                           f"{tail[0]}".rstrip())


def check_model_memory(role: str, data: bytes, where, shapes, limit_mb: int = DEFAULT_MAX_MB,
                       timeout: float = CHECK_TIMEOUT_S) -> dict:
    """Both checks (module doc) for ``data`` in ``role`` at ``shapes``; raise
    :class:`ModelMemoryError` naming the tensor or the input size.  Returns the trial's
    report."""
    limit = int(limit_mb) * MB
    shapes = [tuple(int(d) for d in s) for s in shapes]
    check_declared(role, data, shapes, limit, where)
    return trial_run(role, data, shapes, limit, where, timeout)


# ---------------------------------------------------------------------------- the child


def _vm_bytes(key: str = "VmSize") -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _say(**doc) -> None:
    sys.stdout.write(json.dumps(doc) + "\n")
    sys.stdout.flush()


def _child(argv: List[str]) -> int:
    role, limit, shapes = argv[0], int(argv[1]), [tuple(s) for s in json.loads(argv[2])]
    data = sys.stdin.buffer.read()
    import numpy as np

    from edged.runtime import open_runner

    base = _vm_bytes()
    resource.setrlimit(resource.RLIMIT_AS, (base + limit, base + limit))
    peak = 0
    cpu = {"type": "cpu", "num_threads": 1}
    for shape in shapes:
        _say(shape=list(shape))
        try:
            runner = open_runner(_model_for(role, data, shape), cpu, name=f"memcheck-{role}",
                                 input_shape=shape)
            dtype = runner.input_details()[0]["dtype"]
            runner.run(np.zeros(shape, dtype=dtype))
        except (MemoryError, RuntimeError, ValueError, OSError) as exc:
            _say(shape=list(shape), error=str(exc).strip().splitlines()[0] if str(exc).strip()
                 else f"{type(exc).__name__} (allocation failed)")
            return 3
        peak = max(peak, _vm_bytes("VmPeak") - base)
        del runner
    _say(done=True, baseline=base, peak=peak, shapes=len(shapes))
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
