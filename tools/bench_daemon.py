#!/usr/bin/env python3
"""End-to-end benchmark of the daemon: frames per second and capture-to-event latency.

Runs the real daemon (edged.daemon.Daemon: capture thread, detection worker threads, track
thread, events thread) on the shared clips, each read as fast as it decodes with no frame
skipped (``realtime: false``) and detection on every frame (``tracking.detect_every: 1``).
Setups ``WORKERSxTHREADS``: 1x1 (one detection thread, interpreters on one CPU thread),
1x2 (one detection thread, interpreters on two CPU threads), 2x1 (two detection threads
working on alternate frames, one CPU thread each).  The gallery is enrolled from
../shared/videos/hamilton_enrol.

- fps: (frames through the pipeline - 1) / (time the last frame was done - time the first
  was done), so model loading and warm-up are not counted;
- latency: from the capture of the frame that caused an event to the event handed to the
  publisher (MQTT off here, so the broker's round trip is not in it), median and p99 over
  all events of all repeats;
- stage times: median per call of detect (frame), embed (batch) and match.

    .venv/bin/python tools/bench_daemon.py [--repeat 3] [--setups 1x1 1x2 2x1] [--markdown]
"""
from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edged import config as configmod  # noqa: E402
from edged.daemon import Daemon  # noqa: E402
from edged.sdnotify import Notifier  # noqa: E402

SHARED = Path(os.environ.get("EDGED_SHARED", ROOT.parent / "shared"))
CLIPS = ["facerec_short_hamilton_clip.mp4", "sadtalker_WDA_AlexandriaOcasioCortez_000.mp4"]


def build_gallery(path: Path) -> None:
    from edged.gallery import write_gallery
    from edged.imageio import load_image
    from edged.pipeline import FacePipeline, central_face

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


def run_once(clip: Path, workers: int, threads: int, gallery: Path, state: Path) -> dict:
    cfg = configmod.build(configmod.Config, {
        "device": {"name": "bench"},
        "cameras": [{"name": "bench", "source": str(clip), "realtime": False}],
        "models": {"detector": {"type": "cpu", "num_threads": threads},
                   "embedder": {"type": "cpu", "num_threads": threads}},
        "pipeline": {"workers": workers},
        "paths": {"gallery": str(gallery), "state_dir": str(state)},
        "mqtt": {"enabled": False},
        "logging": {"target": "stderr", "level": "warning"},
    })
    d = Daemon(cfg, notifier=Notifier(address=""), exit_when_done=True)
    d.start(camera_wait=30)
    d.run()
    frames = d.frames_done_total
    span = d.last_done_monotonic - d.first_done_monotonic
    st = {k: v.summary(time.monotonic() + 0, scale=1000.0) for k, v in d.stage.items()}
    return {"frames": frames, "fps": (frames - 1) / span if span > 0 else 0.0,
            "latencies": list(d.latencies_all), "stages": {k: (v.get("median"), v.get("n"))
                                                           for k, v in st.items()},
            "events": len(d.latencies_all)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--setups", nargs="+", default=["1x1", "1x2", "2x1"],
                    help="WORKERSxTHREADS: detection worker threads x interpreter threads each "
                         "(default: 1x1 1x2 2x1)")
    ap.add_argument("--clips", nargs="+", default=CLIPS)
    ap.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    for name in ("edged.runtime", "edged.gallery", "edged.hotswap"):
        logging.getLogger(name).setLevel(logging.ERROR)
    rows = []
    with tempfile.TemporaryDirectory(prefix="edged-bench-") as tmp:
        tmp = Path(tmp)
        gallery = tmp / "hamilton.edgal"
        build_gallery(gallery)
        for clip in args.clips:
            for setup in args.setups:
                workers, threads = (int(x) for x in setup.split("x"))
                runs = [run_once(SHARED / "videos" / clip, workers, threads, gallery, tmp / "state")
                        for _ in range(args.repeat)]
                fps = [r["fps"] for r in runs]
                lat = np.asarray([x for r in runs for x in r["latencies"]]) * 1000.0
                stages = runs[-1]["stages"]
                row = {"clip": clip, "setup": f"{workers} x {threads}", "frames": runs[0]["frames"],
                       "fps_median": statistics.median(fps), "fps_min": min(fps),
                       "fps_max": max(fps), "events": runs[0]["events"],
                       "lat_median": float(np.median(lat)) if lat.size else float("nan"),
                       "lat_p99": float(np.percentile(lat, 99)) if lat.size else float("nan"),
                       "detect_ms": stages["detect"][0], "embed_ms": stages["embed"][0],
                       "match_ms": stages["match"][0]}
                rows.append(row)
                print(f"{clip} workers x threads = {row['setup']}: {row['frames']} frames, fps median "
                      f"{row['fps_median']:.1f} (min {row['fps_min']:.1f}, max {row['fps_max']:.1f}); "
                      f"{row['events']} events, latency median {row['lat_median']:.1f} ms, "
                      f"p99 {row['lat_p99']:.1f} ms; detect {row['detect_ms']} ms, embed "
                      f"{row['embed_ms']} ms, match {row['match_ms']} ms", flush=True)
    if args.markdown:
        print()
        print("| clip | detection workers x interpreter threads | frames | fps (median of runs; min-max) | events per run | "
              "capture-to-event latency median | p99 | detect per frame (median) | "
              "embed per batch (median) |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['clip']} | {r['setup']} | {r['frames']} | {r['fps_median']:.1f} "
                  f"({r['fps_min']:.1f}-{r['fps_max']:.1f}) | {r['events']} | "
                  f"{r['lat_median']:.1f} ms | {r['lat_p99']:.1f} ms | {r['detect_ms']} ms | "
                  f"{r['embed_ms']} ms |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
