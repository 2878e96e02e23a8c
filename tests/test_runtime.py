"""The one inference runtime: delegates, fallback, strict mode, settings errors."""
from __future__ import annotations

import logging

import cv2
import numpy as np
import pytest

from edged.runtime import modelstore
from edged.runtime import (DelegateError, SettingsError, open_runner, parse_settings,
                           plugin_types, time_invoke)


@pytest.fixture(scope="module")
def onet(models_dir):
    data, digest, _ = modelstore.read_verified("onet", models_dir)
    return data, digest


def test_plugins_are_keyed_by_type():
    assert {"cpu", "gpu", "nnapi", "edgetpu", "external"} <= set(plugin_types())


def test_cpu_runner_on_real_model(onet, shared_dir):
    data, digest = onet
    r = open_runner(data, {"type": "cpu", "num_threads": 2}, name="onet", sha256=digest)
    assert r.delegate == "cpu (XNNPACK, 2 threads)" and r.sha256 == digest and r.fallback_reason is None
    img = cv2.imread(str(shared_dir / "faces" / "multi_face" / "ultralytics_zidane.jpg"))
    crops = np.stack([cv2.resize(img, (48, 48)), cv2.resize(img[::-1], (48, 48))]).astype(np.float32)
    out = r.run((crops - 127.5) / 128.0)
    assert [o.shape for o in out] == [(2, 2), (2, 4), (2, 10)]
    assert np.allclose(out[0].sum(axis=1), 1.0, atol=1e-4)  # softmax
    assert time_invoke(r) > 0


@pytest.mark.parametrize("accel", [
    {"type": "gpu"},
    {"type": "gpu", "library": "/nonexistent/libtensorflowlite_gpu_delegate.so"},
    {"type": "nnapi"},
    {"type": "edgetpu", "device": "usb"},
    {"type": "external", "library": "/nonexistent/libdelegate.so", "options": {"x": 1}},
    {"type": "external", "library": "libm.so.6"},  # loads, but is no delegate
])
def test_missing_delegate_falls_back_to_cpu_with_one_warning(onet, caplog, accel):
    data, _ = onet
    with caplog.at_level(logging.WARNING, logger="edged.runtime"):
        r = open_runner(data, dict(accel, num_threads=2), name="onet")
    warnings = [rec for rec in caplog.records if rec.levelno == logging.WARNING]
    assert len(warnings) == 1
    msg = warnings[0].getMessage()
    assert "onet" in msg and accel["type"] in msg and "falling back to the CPU" in msg
    assert r.delegate == "cpu (XNNPACK, 2 threads)"
    assert r.fallback_reason
    assert r.run(np.zeros((1, 48, 48, 3), np.float32))[0].shape == (1, 2)


def test_strict_delegate_failure_stops_start_up(onet):
    data, _ = onet
    with pytest.raises(DelegateError, match=r"libedgetpu\.so\.1.*strict: true"):
        open_runner(data, {"type": "edgetpu", "strict": True}, name="onet")


@pytest.mark.parametrize("accel, pattern", [
    ({"type": "tpu9000"}, r"models\.onet\.accelerator\.type: unknown accelerator 'tpu9000'"),
    ({"type": "cpu", "threads": 2}, r"models\.onet\.accelerator\.threads: unknown key"),
    ({"type": "cpu", "num_threads": 0}, r"num_threads: expected a positive integer"),
    ({"type": "gpu", "strict": "yes"}, r"strict: expected true or false"),
    ({"type": "external"}, r"library: required"),
    ({"type": "gpu", "options": [1]}, r"options: expected a mapping"),
    (["cpu"], r"expected a mapping"),
])
def test_bad_settings_name_the_key(accel, pattern):
    with pytest.raises(SettingsError, match=pattern):
        parse_settings(accel, "models.onet.accelerator")


def test_runner_resizes_batch(models_dir):
    data, digest, _ = modelstore.read_verified("rnet", models_dir)
    r = open_runner(data, "cpu", name="rnet")
    for n in (1, 7, 16):
        prob, box = r.run(np.zeros((n, 24, 24, 3), np.float32))
        assert prob.shape == (n, 2) and box.shape == (n, 4)


# A delegate library (TFLite's external delegate plugin interface) that takes the graph as
# first planned and refuses any re-plan, as a GPU or Edge TPU build for fixed shapes does.
FIXED_SHAPE_DELEGATE = r"""
#include <stdint.h>
#include <stdlib.h>
typedef struct Delegate {
    void *data_;
    int (*Prepare)(void *context, struct Delegate *delegate);
    void *copy_from, *copy_to, *free_handle;
    int64_t flags;
    void *opaque_builder;
} Delegate;
static int prepare(void *context, Delegate *d)
{
    (void)context;
    return ++*(long *)d->data_ > 1;  /* kTfLiteOk the first time, kTfLiteError after */
}
Delegate *tflite_plugin_create_delegate(char **keys, char **values, size_t n,
                                        void (*report_error)(const char *))
{
    (void)keys; (void)values; (void)n; (void)report_error;
    Delegate *d = calloc(1, sizeof(Delegate));
    d->data_ = calloc(1, sizeof(long));
    d->Prepare = prepare;
    return d;
}
void tflite_plugin_destroy_delegate(Delegate *d)
{
    free(d->data_);
    free(d);
}
"""


def test_a_delegate_that_refuses_a_new_batch_size_falls_back_to_the_cpu(onet, tmp_path, caplog):
    """R-Net, O-Net and the embedder are resized to each batch size: a delegate that cannot
    re-plan gets the CPU for that size, with the warning, instead of failing mid-frame."""
    import shutil
    import subprocess

    from edged.vision.detect import BatchRunner

    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build the test delegate")
    src, lib = tmp_path / "fixed.c", tmp_path / "libfixed.so"
    src.write_text(FIXED_SHAPE_DELEGATE)
    subprocess.run([cc, "-shared", "-fPIC", "-O1", "-o", str(lib), str(src)], check=True)
    data, _ = onet
    accel = {"type": "external", "library": str(lib)}
    with caplog.at_level(logging.WARNING, logger="edged.runtime"):
        br = BatchRunner(data, accel, name="onet", max_batch=4)
        assert br.delegate.startswith("external") and not caplog.records  # batch 1: as planned
        out = br.run(np.zeros((3, 48, 48, 3), np.float32))  # batches of 2 and 1
    assert out[0].shape == (3, 2) and np.isfinite(out[0]).all()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings and all("falling back to the CPU" in w for w in warnings), warnings
    assert br.runner(2).delegate.startswith("cpu")

    # strict: every batch size is opened up front, so the refusal stops the start
    with pytest.raises(DelegateError, match="strict: true"):
        BatchRunner(data, dict(accel, strict=True), name="onet", max_batch=4)
