"""The one place where edged creates inference engines.

Every model runs in a :class:`Runner` made by :func:`open_runner` from verified model bytes
and an accelerator setting ``{"type": "cpu" | "gpu" | "nnapi" | "edgetpu" | "external",
...}``.  Each type is a small plugin in :mod:`edged.runtime.plugins` with its own typed
settings (see :func:`plugin_types`).  A delegate that cannot be loaded logs one warning and
falls back to the CPU, unless the setting says ``strict: true``; then :class:`DelegateError`
stops start-up with the same message.

A non-TFLite engine (TensorRT on Jetson, say) is added as another plugin whose ``open``
returns its own :class:`Runner` subclass; callers only use the Runner interface.
"""
from __future__ import annotations

import importlib
import logging
import pkgutil
import time

import numpy as np

from edged.runtime.base import (AcceleratorPlugin, DelegateError, Runner, SettingsError,
                                TfliteRunner, threads_text, tflite_module)

__all__ = ["Runner", "TfliteRunner", "DelegateError", "SettingsError", "AcceleratorPlugin",
           "open_runner", "plugin_types", "parse_settings", "tflite_module", "time_invoke"]

log = logging.getLogger("edged.runtime")

_PLUGINS: dict = {}


def _discover() -> dict:
    if not _PLUGINS:
        from edged.runtime import plugins

        for mod in pkgutil.iter_modules(plugins.__path__):
            m = importlib.import_module(f"{plugins.__name__}.{mod.name}")
            for obj in vars(m).values():
                if (isinstance(obj, type) and issubclass(obj, AcceleratorPlugin)
                        and obj is not AcceleratorPlugin and getattr(obj, "type_key", None)):
                    _PLUGINS[obj.type_key] = obj
    return _PLUGINS


def plugin_types() -> dict:
    """``{type name: plugin class}`` for every accelerator edged knows."""
    return dict(_discover())


def parse_settings(accel, where: str = "accelerator"):
    """Turn a mapping (from YAML) into the plugin's typed settings; errors name ``where``."""
    if accel is None:
        accel = {"type": "cpu"}
    if isinstance(accel, str):
        accel = {"type": accel}
    if not isinstance(accel, dict):
        raise SettingsError(f"{where}: expected a mapping with a 'type', got {accel!r}")
    kind = accel.get("type", "cpu")
    plugins = _discover()
    if not isinstance(kind, str):
        raise SettingsError(f"{where}.type: expected the name of an accelerator, got {kind!r}")
    if kind not in plugins:
        raise SettingsError(f"{where}.type: unknown accelerator {kind!r}; "
                            f"expected one of {', '.join(sorted(plugins))}")
    plugin = plugins[kind]
    return plugin, plugin.parse({k: v for k, v in accel.items() if k != "type"}, where)


def open_runner(model: bytes, accel=None, *, name: str = "model", sha256: str = "",
                where: str = "accelerator", input_shape=None) -> Runner:
    """Build a runner for ``model`` (verified bytes) on the requested accelerator, its first
    input resized to ``input_shape`` when given.

    On a delegate failure: a warning and the CPU, or :class:`DelegateError` when strict.  A
    resize re-plans the graph, which a delegate may refuse (a GPU or Edge TPU build for fixed
    shapes): that counts as a failure of the delegate too.
    """
    plugin, settings = parse_settings(accel, where)
    try:
        runner = plugin().open(model, settings, name=name)
        if input_shape is not None:
            runner.resize(input_shape)
    except (OSError, ValueError, RuntimeError) as exc:
        if plugin.type_key == "cpu":  # nothing to fall back to: the model itself fails
            raise
        msg = (f"{name}: cannot use accelerator {plugin.type_key!r} "
               f"({plugin.describe(settings)}): {exc}")
        if getattr(settings, "strict", False):
            raise DelegateError(msg + " (strict: true, not falling back)") from exc
        log.warning("%s; falling back to the CPU (XNNPACK, %s)", msg,
                    threads_text(getattr(settings, "num_threads", None) or 1))
        cpu = _discover()["cpu"]
        runner = cpu().open(model, cpu.parse({"num_threads": getattr(settings, "num_threads", None)},
                                             where), name=name)
        if input_shape is not None:
            runner.resize(input_shape)
        runner.fallback_reason = str(exc)
    runner.sha256 = sha256
    # one line per model set says where the models run (edged.daemon); each runner at debug
    log.debug("%s runs on %s", name, runner.delegate)
    return runner


def time_invoke(runner: Runner, repeat: int = 1) -> float:
    """Seconds for one invoke on a fixed input (zeros), the median of ``repeat`` runs."""
    inputs = [np.zeros(d["shape"], dtype=d["dtype"]) for d in runner.input_details()]
    runner.run(*inputs)  # warm-up
    times = []
    for _ in range(max(1, repeat)):
        t = time.perf_counter()
        runner.run(*inputs)
        times.append(time.perf_counter() - t)
    return float(np.median(times))
