"""A dropped model checked before it is used: its bytes (sha256, TFLite structure), the
dynamic-batch copy of a baked embedder (:func:`prepare_model`), then a self-test with the
configured accelerator (:func:`self_test`)."""
from __future__ import annotations

import logging
import os
from typing import List, Optional

import numpy as np

from edged.runtime import modelstore
from edged.runtime.limits import (DEFAULT_FRAME, DEFAULT_MAX_MB, ModelMemoryError,
                                  check_model_memory, run_shapes)
from edged.runtime.tflitefile import ModelFormatError, make_batch_dynamic
from edged.ota.intake import DROP_ROLES, DropRejected, check_magic
from edged.ota.store import ModelBlob

log = logging.getLogger("edged.ota")

#: Self-test per role: the input shape fed and the output shapes expected (any order).
#: P-Net's input is declared for one small level (24 x 24) so that no big plan is made.
#: The embedder's width "W" is its manifest entry's (192 MobileFaceNet, 128 SFace), or for a
#: model the manifest does not name its own, 1 to 4096 values: :func:`_expected_outputs`.
SELF_TEST = {
    "pnet": ((1, 24, 24, 3), [(1, 7, 7, 2), (1, 7, 7, 4)]),
    "rnet": ((1, 24, 24, 3), [(1, 2), (1, 4)]),
    "onet": ((1, 48, 48, 3), [(1, 2), (1, 4), (1, 10)]),
    "embedder": ((1, 112, 112, 3), [(1, "W")]),
    "antispoof": ((1, 256, 256, 3), [(1, 8), (1, 8)]),
}

#: Test hook only: sha256s (comma separated) whose self-test is skipped, so that a model that
#: fails at run time can be put in service to exercise the rollback.
SKIP_SELFTEST_ENV = "EDGED_TEST_SKIP_SELFTEST"


def prepare_model(role: str, data: bytes, where, expected_sha: Optional[str] = None,
                  expected_size: int = 0, derived_sha: Optional[str] = None) -> ModelBlob:
    """Check a dropped model's bytes and return what will be loaded; raise DropRejected."""
    if role not in DROP_ROLES:
        raise DropRejected(f"{where}: role {role!r} is not used by the daemon "
                           f"(roles: {', '.join(DROP_ROLES)})")
    check_magic(where, data[:8])
    try:
        if expected_sha:
            modelstore.check_blob(data, expected_sha.lower(), where, expected_size)
        else:
            from edged.runtime.tflitefile import check_model_bytes
            check_model_bytes(data)
    except modelstore.ModelError as exc:
        raise DropRejected(str(exc)) from None
    except ModelFormatError as exc:
        raise DropRejected(f"{where}: {exc}") from None
    sha = modelstore.sha256_bytes(data)
    if role == "embedder":
        try:
            derived = make_batch_dynamic(data)
        except ModelFormatError:
            derived = None  # no RESHAPE to [2, 192]: already dynamic (or not MobileFaceNet:
            # the self-test says so)
        if derived is not None:
            dsha = modelstore.sha256_bytes(derived)
            if derived_sha and dsha != derived_sha.lower():
                raise DropRejected(f"{where}: its dynamic-batch copy has sha256 {dsha}, the "
                                   f"manifest says {derived_sha}")
            return ModelBlob(role, derived, dsha, str(where), dropped_sha256=sha)
    return ModelBlob(role, data, sha, str(where))


def self_test(blob: ModelBlob, accel) -> None:
    """Build the model with ``accel``, run it once on a fixed input; raise DropRejected."""
    from edged.vision.detect import pnet_model_for
    from edged.runtime import open_runner

    skip = {s.strip().lower() for s in os.environ.get(SKIP_SELFTEST_ENV, "").split(",") if s.strip()}
    if blob.sha256 in skip or blob.dropped_sha256 in skip:
        log.warning("self-test of %s skipped (%s, test hook)", blob.file, SKIP_SELFTEST_ENV)
        return
    shape, expected = SELF_TEST[blob.role]
    try:
        data = pnet_model_for(blob.data, shape) if blob.role == "pnet" else blob.data
        runner = open_runner(data, accel, name=f"selftest-{blob.role}", sha256=blob.sha256,
                             where=_accel_key(blob.role))
        if tuple(runner.input_details()[0]["shape"]) != shape:
            runner.resize(shape)
        x = np.random.default_rng(20261121).uniform(-1.0, 1.0, shape).astype(np.float32)
        outs = runner.run(x)
    except Exception as exc:
        raise DropRejected(f"{blob.file}: self-test as {blob.role} failed: "
                           f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    got = sorted(tuple(int(d) for d in np.shape(o)) for o in outs)
    expected = _expected_outputs(blob, expected, got)
    if got != sorted(expected):
        raise DropRejected(f"{blob.file}: self-test as {blob.role}: output shapes {got}, "
                           f"expected {sorted(expected)}")
    for o in outs:
        if not np.isfinite(np.asarray(o, dtype=np.float64)).all():
            raise DropRejected(f"{blob.file}: self-test as {blob.role}: non-finite output "
                               f"(NaN or inf) on the fixed input")


def _accel_key(role: str) -> str:
    return {"embedder": "models.embedder", "antispoof": "liveness.accelerator"}.get(
        role, "models.detector")


def _expected_outputs(blob: ModelBlob, expected: list, got: list) -> list:
    """``expected`` with an embedder's width filled in: its manifest entry's when the manifest
    names the model, else the model's own when it gives one row of 1 to 4096 values."""
    if blob.role != "embedder":
        return expected
    from edged.vision.embed import EmbedderSpec

    spec = EmbedderSpec.of_model(blob.sha256) or EmbedderSpec.of_model(blob.dropped_sha256)
    if spec is not None:
        return [(1, spec.dim)]
    if len(got) == 1 and len(got[0]) == 2 and got[0][0] == 1 and 1 <= got[0][1] <= 4096:
        return got
    return [(1, "1..4096")]


def check_drop(role: str, data: bytes, where, daemon) -> dict:
    """The memory check of a model dropped into ``daemon`` (at its cameras' sizes, with its
    detection settings and ``models.max_memory_mb``); raises :class:`DropRejected`."""
    cfg = daemon.cfg
    limit = getattr(cfg.models, "max_memory_mb", DEFAULT_MAX_MB)
    try:
        return check_model_memory(role, data, where,
                                  run_shapes(role, camera_frames(daemon),
                                             getattr(cfg, "detection", None)), limit)
    except ModelMemoryError as exc:
        raise DropRejected(exc.reason) from None


def camera_frames(daemon) -> List[tuple]:
    """``(width, height)`` of each camera of ``daemon``: its resolution once a frame came,
    else the configured size, else :data:`DEFAULT_FRAME` (none without cameras)."""
    live = getattr(daemon, "cameras", None) or {}
    frames = set()
    for cs in getattr(daemon.cfg, "cameras", None) or []:
        cam = live.get(cs.name)
        res = getattr(cam, "resolution", None)
        if res:
            frames.add((int(res[0]), int(res[1])))
        elif cs.width and cs.height:
            frames.add((int(cs.width), int(cs.height)))
        else:
            frames.add(DEFAULT_FRAME)
    return sorted(frames)
