#!/usr/bin/env python3
"""End-to-end benchmark of the daemon: the defaults against the old behaviour, side by side.

Runs the real daemon (edged.daemon.service.Daemon: capture thread, detection worker threads, track
thread, events thread) in two modes, interleaved run by run (the machine is shared and noisy:
compare the ratios of one repeat, not absolute figures of different hours):

- ``new``: the defaults (``pipeline.detect_width: 640``, motion gating on,
  ``tracking.detect_every: 3`` with the tracks refined by R-Net and O-Net in between);
- ``old``: ``pipeline.detect_width: 0``, ``motion.enabled: false``,
  ``tracking.detect_every: 1`` (the full MTCNN pyramid on every full-resolution frame).

Inputs (``--inputs``):

- ``hamilton``: ../shared/videos/facerec_short_hamilton_clip.mp4 (640x360, 275 frames);
- ``720p``, ``1080p``: that clip upscaled with ffmpeg (lanczos) into ``--tmp`` (made once;
  never committed);
- ``1080p-rt``: the 1080p clip paced at its frame rate (``realtime: true``): frames dropped;
- ``static``: a still, faceless frame (the curtain of the close shot) as a 30 fps clip of
  ``--static-s`` seconds, paced in real time: CPU time in % of one core.

Per run: fps = (frames through the pipeline - 1) / (time the last frame was done - time the
first was done); CPU ms per frame = the process's CPU time (user + system) over ``run()``
divided by the frames through the pipeline; capture-to-event latency median and p99 (every
event; MQTT off); frames dropped by the hub; events: ``recognized`` (who) and the tracks
reported (``face_appeared``).  The gallery is enrolled from ../shared/videos/hamilton_enrol.

    .venv/bin/python tools/bench_daemon.py [--repeat 3] [--setup 2x1]
        [--inputs hamilton 720p 1080p 1080p-rt static] [--modes new old] [--markdown]
"""
from __future__ import annotations

import argparse
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edged import config as configmod  # noqa: E402
from edged.daemon.service import Daemon  # noqa: E402
from edged.daemon.sdnotify import Notifier  # noqa: E402

SHARED = Path(os.environ.get("EDGED_SHARED", ROOT.parent / "shared"))
HAMILTON = SHARED / "videos" / "facerec_short_hamilton_clip.mp4"
INPUTS = ["hamilton", "720p", "1080p", "1080p-rt", "static"]
#: the old behaviour, selectable in the configuration
OLD = {"pipeline": {"detect_width": 0}, "motion": {"enabled": False},
       "tracking": {"detect_every": 1}}


def build_gallery(path: Path) -> None:
    from edged.gallery import write_gallery
    from edged.vision.imageio import load_image
    from edged.vision.pipeline import FacePipeline, central_face

    p = FacePipeline.from_models()
    ids, rows, embs = [], [], []
    for j, d in enumerate(sorted((SHARED / "videos" / "hamilton_enrol").iterdir())):
        ids.append((d.name, d.name.replace("_", " ")))
        for img in sorted(d.iterdir()):
            im = load_image(img)
            f = central_face(p.process(im), im.shape)
            if f is not None and f.embedding is not None:
                rows.append(j)
                embs.append(f.embedding)
    write_gallery(path, ids, rows, np.stack(embs), p.embedder_sha256)


def _ffmpeg(*args) -> None:
    subprocess.run(["ffmpeg", "-v", "error", "-y", *args], check=True)


def make_inputs(names, tmp: Path, static_s: float) -> dict:
    """``{name: (clip, realtime)}``; the upscales and the still clip are made into ``tmp``."""
    if not HAMILTON.exists():
        raise SystemExit(f"{HAMILTON}: no such file (set $EDGED_SHARED to the shared data)")
    tmp.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in names:
        if name == "hamilton":
            out[name] = (HAMILTON, False)
        elif name in ("720p", "1080p", "1080p-rt"):
            w, h = (1280, 720) if name == "720p" else (1920, 1080)
            clip = tmp / f"hamilton_{w}x{h}.mp4"
            if not clip.exists():
                _ffmpeg("-i", str(HAMILTON), "-vf", f"scale={w}:{h}:flags=lanczos",
                        "-fps_mode", "passthrough", "-an", "-c:v", "libx264", "-preset", "veryfast", "-crf", "18", str(clip))
            out[name] = (clip, name.endswith("-rt"))
        elif name == "static":
            still, clip = tmp / "still.png", tmp / f"static_{static_s:g}s.mp4"
            if not clip.exists():
                _ffmpeg("-i", str(HAMILTON), "-vf",
                        r"select=eq(n\,100),crop=320:180:320:0,scale=640:360", "-frames:v", "1",
                        str(still))
                _ffmpeg("-loop", "1", "-i", str(still), "-t", f"{static_s:g}", "-r", "30",
                        "-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p",
                        str(clip))
            out[name] = (clip, True)
        else:
            raise SystemExit(f"--inputs: unknown input {name!r} (expected {', '.join(INPUTS)})")
    return out


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = dict(out.get(k, {}), **v) if isinstance(v, dict) else v
    return out


def run_once(clip: Path, realtime: bool, mode: str, workers: int, threads: int,
             gallery: Path, state: Path) -> dict:
    data = {
        "device": {"name": "bench"},
        "cameras": [{"name": "bench", "source": str(clip), "realtime": realtime}],
        "models": {"detector": {"type": "cpu", "num_threads": threads},
                   "embedder": {"type": "cpu", "num_threads": threads}},
        "pipeline": {"workers": workers},
        "paths": {"gallery": str(gallery), "state_dir": str(state)},
        "mqtt": {"enabled": False},
        "logging": {"target": "stderr", "level": "warning"},
    }
    cfg = configmod.build(configmod.Config, _merge(data, OLD) if mode == "old" else data)
    d = Daemon(cfg, notifier=Notifier(address=""), exit_when_done=True)
    events = []
    d.events.hooks.append(lambda ev, lat: events.append(ev))
    d.start(camera_wait=30)
    cpu0, wall0 = sum(os.times()[:2]), time.monotonic()
    d.run()
    cpu, wall = sum(os.times()[:2]) - cpu0, time.monotonic() - wall0
    frames = d.counters.frames_done_total
    span = d.counters.last_done_monotonic - d.counters.first_done_monotonic
    lat = np.asarray(list(d.counters.latencies_all)) * 1000.0
    return {"frames": frames, "fps": (frames - 1) / span if span > 0 else 0.0,
            "cpu_ms_per_frame": 1000.0 * cpu / max(frames, 1),
            "cpu_percent": 100.0 * cpu / wall if wall > 0 else 0.0,
            "dropped": d.hub.dropped.get("bench", 0), "read": d.cameras["bench"].frames_read,
            "lat_median": float(np.median(lat)) if lat.size else float("nan"),
            "lat_p99": float(np.percentile(lat, 99)) if lat.size else float("nan"),
            "recognized": sorted(e.identity for e in events if e.type == "recognized"),
            "tracks": len({e.track_id for e in events if e.type == "face_appeared"})}


def summarise(name: str, mode: str, runs: list) -> dict:
    med = lambda k: statistics.median(r[k] for r in runs)  # noqa: E731
    return {"input": name, "mode": mode, "frames": runs[0]["frames"], "read": runs[0]["read"],
            "fps": med("fps"), "fps_min": min(r["fps"] for r in runs),
            "fps_max": max(r["fps"] for r in runs), "cpu_ms": med("cpu_ms_per_frame"),
            "cpu_percent": med("cpu_percent"), "dropped": med("dropped"),
            "lat_median": med("lat_median"), "lat_p99": med("lat_p99"),
            "recognized": runs[0]["recognized"], "tracks": runs[0]["tracks"]}


def print_markdown(runs: dict, inputs: list, modes: list) -> None:
    rows = [summarise(n, m, rs) for (n, m), rs in runs.items()]
    print()
    print("| input | mode | frames done / read | fps (median; min-max) | CPU ms per frame | "
          "CPU % of one core | dropped | latency median | p99 | recognized | tracks |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['input']} | {r['mode']} | {r['frames']} / {r['read']} | {r['fps']:.1f} "
              f"({r['fps_min']:.1f}-{r['fps_max']:.1f}) | {r['cpu_ms']:.1f} | "
              f"{r['cpu_percent']:.0f} | {r['dropped']:g} | {r['lat_median']:.0f} ms | "
              f"{r['lat_p99']:.0f} ms | {', '.join(r['recognized']) or '-'} | "
              f"{r['tracks']} |")
    if "new" in modes and "old" in modes:
        print()
        print("| input | fps new / old (per repeat) | CPU ms per frame old / new |")
        print("|---|---|---|")
        for name in inputs:
            new, old = runs[(name, "new")], runs[(name, "old")]
            fr = [f"{a['fps'] / b['fps']:.1f}x" for a, b in zip(new, old) if b["fps"] > 0]
            cr = [f"{b['cpu_ms_per_frame'] / a['cpu_ms_per_frame']:.1f}x"
                  for a, b in zip(new, old) if a["cpu_ms_per_frame"] > 0]
            print(f"| {name} | {', '.join(fr)} | {', '.join(cr)} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--setup", default="2x1",
                    help="WORKERSxTHREADS: detection worker threads x interpreter threads each "
                         "(default 2x1: pipeline.workers 2)")
    ap.add_argument("--inputs", nargs="+", default=INPUTS)
    ap.add_argument("--modes", nargs="+", default=["new", "old"], choices=["new", "old"])
    ap.add_argument("--static-s", type=float, default=20.0, help="length of the still clip (s)")
    ap.add_argument("--tmp", type=Path, default=Path(tempfile.gettempdir()) / "edged-bench-clips",
                    help="where the upscaled and still clips are made (default: %(default)s)")
    ap.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    for name in ("edged.runtime", "edged.gallery", "edged.hotswap"):
        logging.getLogger(name).setLevel(logging.ERROR)
    workers, threads = (int(x) for x in args.setup.split("x"))
    inputs = make_inputs(args.inputs, args.tmp, args.static_s)
    runs = {(n, m): [] for n in inputs for m in args.modes}
    with tempfile.TemporaryDirectory(prefix="edged-bench-") as tmp:
        tmp = Path(tmp)
        gallery = tmp / "hamilton.edgal"
        build_gallery(gallery)
        for rep in range(args.repeat):
            modes = args.modes if rep % 2 == 0 else args.modes[::-1]  # A/B, then B/A
            for name, (clip, realtime) in inputs.items():
                for mode in modes:
                    r = run_once(clip, realtime, mode, workers, threads, gallery, tmp / "state")
                    runs[(name, mode)].append(r)
                    print(f"[{rep + 1}/{args.repeat}] {name} {mode}: {r['frames']} frames, "
                          f"{r['fps']:.1f} fps, {r['cpu_ms_per_frame']:.1f} CPU ms/frame, "
                          f"{r['cpu_percent']:.0f} % CPU, dropped {r['dropped']}, latency "
                          f"{r['lat_median']:.0f}/{r['lat_p99']:.0f} ms, recognized "
                          f"{r['recognized']}, tracks {r['tracks']}", flush=True)
    if args.markdown:
        print_markdown(runs, list(inputs), args.modes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
