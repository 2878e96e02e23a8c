#!/usr/bin/env python3
"""The daemon's cost with each embedder: SFace against MobileFaceNet, interleaved run by run.

Each run is the real daemon (``edged.daemon.service.Daemon`` with the configuration's defaults:
tracking, motion gating, detection at 640 wide; ``realtime: false``, MQTT off) in a child
process of its own, on one shared clip, with ``models.embedder_model`` set to the embedder
under test and a gallery that embedder enrolled from ../shared/videos/hamilton_enrol
(``edged gallery build --embedder``).  The embedders alternate run by run (A/B, then B/A: the
machine is shared and noisy, so compare the ratios of one repeat).

Per run: fps = (frames through the pipeline - 1) / (time the last frame was done - time the
first was done); CPU ms per frame = the child's CPU time (user + system, ``os.times`` in the
child, from ``start`` to the end of ``run``) over the frames; CPU s in all = the child's whole
resource usage (``os.wait4``: loading the models included); faces embedded (the pipeline's
embedder calls, counted in the child) and who was recognised.

    .venv/bin/python tools/bench_embedders.py [--repeat 3] [--clips hamilton sadtalker]
        [--embedders mobilefacenet sface] [--models DIR] [--detect-every N] [--markdown]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHARED = Path(os.environ.get("EDGED_SHARED", ROOT.parent / "shared"))
CLIPS = {"hamilton": SHARED / "videos" / "facerec_short_hamilton_clip.mp4",
         "sadtalker": SHARED / "videos" / "sadtalker_WDA_AlexandriaOcasioCortez_000.mp4"}
EMBEDDERS = ["mobilefacenet", "sface"]


# ---------------------------------------------------------------------------- the child


def child(spec: dict) -> dict:
    """One daemon run (in this process) as ``spec`` says; its figures."""
    import logging

    from edged import config as configmod
    from edged.daemon.service import Daemon
    from edged.daemon.sdnotify import Notifier

    logging.basicConfig(level=logging.WARNING)
    data = {"device": {"name": "bench"},
            "cameras": [{"name": "bench", "source": spec["clip"], "realtime": False}],
            "models": {"embedder_model": spec["embedder"]},
            "paths": {"models_dir": spec["models"], "gallery": spec["gallery"],
                      "state_dir": spec["state"]},
            "drops": {"enabled": False}, "mqtt": {"enabled": False},
            "logging": {"target": "stderr", "level": "warning"}}
    if spec.get("detect_every"):
        data["tracking"] = {"detect_every": spec["detect_every"]}
    cfg = configmod.build(configmod.Config, data)
    d = Daemon(cfg, models_dir=spec["models"], notifier=Notifier(address=""),
               exit_when_done=True)
    events, embedded = [], [0]
    d.events.hooks.append(lambda ev, lat: events.append(ev))
    cpu0 = sum(os.times()[:2])
    d.start(camera_wait=30)
    emb, threshold = d.service.pipeline.embedder, d.service.gallery.settings.threshold
    inner = emb.embed

    def counting(aligned, flip=False):
        embedded[0] += len(aligned)
        return inner(aligned, flip=flip)

    emb.embed = counting
    d.run()
    cpu = sum(os.times()[:2]) - cpu0
    frames = d.counters.frames_done_total
    span = d.counters.last_done_monotonic - d.counters.first_done_monotonic
    return {"frames": frames, "fps": (frames - 1) / span if span > 0 else 0.0,
            "cpu_ms_per_frame": 1000.0 * cpu / max(frames, 1), "embedded": embedded[0],
            "threshold": threshold,
            "detect_every": cfg.tracking.detect_every, "embed_every": cfg.tracking.embed_every,
            "recognized": sorted(e.identity for e in events if e.type == "recognized")}


# ---------------------------------------------------------------------------- the parent


def build_gallery(embedder: str, models: str, out: Path) -> Path:
    r = subprocess.run([sys.executable, "-m", "edged", "gallery", "build",
                        str(SHARED / "videos" / "hamilton_enrol"), "-o", str(out),
                        "--embedder", embedder, "--models", models, "-q"],
                       capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        raise SystemExit(f"edged gallery build --embedder {embedder}: {r.stderr.strip()}")
    return out


def run_child(spec: dict) -> dict:
    """``spec`` run in a child process; its figures and its whole resource usage."""
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, __file__, "--child", json.dumps(spec)],
                            stdout=subprocess.PIPE, cwd=ROOT)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"the run {spec} failed ({proc.returncode})")
    r = json.loads(out.decode().strip().splitlines()[-1])
    r["cpu_s_total"] = usage.ru_utime + usage.ru_stime
    r["wall_s_total"] = time.monotonic() - t0
    return r


def summarise(runs: list) -> dict:
    med = lambda k: statistics.median(r[k] for r in runs)  # noqa: E731
    return {"frames": runs[0]["frames"], "fps": med("fps"),
            "fps_min": min(r["fps"] for r in runs), "fps_max": max(r["fps"] for r in runs),
            "cpu_ms": med("cpu_ms_per_frame"), "cpu_s_total": med("cpu_s_total"),
            "embedded": runs[0]["embedded"], "threshold": runs[0]["threshold"],
            "recognized": runs[0]["recognized"]}


def markdown(runs: dict, clips, embedders) -> list:
    out = ["| clip | embedder | frames | fps (median; min-max) | CPU ms per frame | "
           "CPU s in all | faces embedded | threshold | recognized |",
           "|---|---|---|---|---|---|---|---|---|"]
    for (clip, emb), rs in runs.items():
        s = summarise(rs)
        out.append(f"| {clip} | {emb} | {s['frames']} | {s['fps']:.1f} ({s['fps_min']:.1f}-"
                   f"{s['fps_max']:.1f}) | {s['cpu_ms']:.1f} | {s['cpu_s_total']:.1f} | "
                   f"{s['embedded']} | {s['threshold']:g} | "
                   f"{', '.join(s['recognized']) or '-'} |")
    if len(embedders) == 2:
        a, b = embedders
        out += ["", f"| clip | fps {b} / {a} (per repeat) | CPU ms per frame {b} / {a} |",
                "|---|---|---|"]
        for clip in clips:
            ra, rb = runs[(clip, a)], runs[(clip, b)]
            fps = [f"{y['fps'] / x['fps']:.2f}" for x, y in zip(ra, rb) if x["fps"] > 0]
            cpu = [f"{y['cpu_ms_per_frame'] / x['cpu_ms_per_frame']:.2f}" for x, y in zip(ra, rb)]
            out.append(f"| {clip} | {', '.join(fps)} | {', '.join(cpu)} |")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--clips", nargs="+", default=list(CLIPS), choices=list(CLIPS))
    ap.add_argument("--embedders", nargs="+", default=EMBEDDERS, choices=EMBEDDERS)
    ap.add_argument("--models", default="", help="models directory with both embedders "
                                                 "(default: the installed one)")
    ap.add_argument("--detect-every", type=int, default=0,
                    help="tracking.detect_every (default: the configuration's default)")
    ap.add_argument("--markdown", action="store_true", help="print Markdown tables")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))), flush=True)
        return 0
    from edged.runtime.modelstore import resolve_models_dir

    models = str(resolve_models_dir(args.models or None))
    runs = {(c, e): [] for c in args.clips for e in args.embedders}
    with tempfile.TemporaryDirectory(prefix="edged-bench-emb-") as tmp:
        tmp = Path(tmp)
        galleries = {e: build_gallery(e, models, tmp / f"{e}.edgal") for e in args.embedders}
        for rep in range(args.repeat):
            order = args.embedders if rep % 2 == 0 else args.embedders[::-1]
            for clip in args.clips:
                for emb in order:
                    spec = {"clip": str(CLIPS[clip]), "embedder": emb, "models": models,
                            "gallery": str(galleries[emb]), "state": str(tmp / "state"),
                            "detect_every": args.detect_every}
                    r = run_child(spec)
                    runs[(clip, emb)].append(r)
                    print(f"[{rep + 1}/{args.repeat}] {clip} {emb}: {r['frames']} frames, "
                          f"{r['fps']:.1f} fps, {r['cpu_ms_per_frame']:.1f} CPU ms/frame, "
                          f"{r['cpu_s_total']:.1f} CPU s in all, {r['embedded']} faces "
                          f"embedded, recognized {r['recognized']} (detect_every "
                          f"{r['detect_every']}, embed_every {r['embed_every']})", flush=True)
    if args.markdown:
        print()
        print("\n".join(markdown(runs, args.clips, args.embedders)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
