#!/usr/bin/env python3
"""What the HTTP endpoint costs the daemon: fps with ``http.listen`` on and scraped every
second against off, interleaved in one run (off, on, off, on...), so that the load of a shared
machine falls on both alike.

Each run is the real daemon (edged.daemon.service.Daemon) on the public clip (tests/publicdata.py: 640x360,
two visitors and an empty scene) in a loop, read as fast as the pipeline takes frames
(``realtime: false``), detection on every frame, a gallery of the two visitors, MQTT off.  With
the endpoint on, a separate process (as Prometheus would be) GETs ``/metrics`` and ``/healthz``
every ``--every`` seconds.

- fps: frames through the pipeline between frame ``--warmup`` and frame ``--frames``, over
  the time between them (model loading and warm-up not counted);
- CPU per frame: the process's CPU time over the same frames (its scrapes included);
- a scrape: the time of one ``GET /metrics`` as the scraper sees it, and its size;
- the cost by accounting, less sensitive to a busy machine than the fps: the CPU time of one
  scrape's work (``/metrics`` encoded and ``/healthz`` built, on the running daemon, measured
  with ``time.thread_time``) and of the stage-histogram observations on the frame path (a
  micro-benchmark of ``RollingStats.add`` with and without its histogram), against the CPU
  time the daemon spends per second.

    .venv/bin/python tools/bench_http.py [--pairs 6] [--frames 400] [--every 1.0]
"""
from __future__ import annotations

import argparse
import logging
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from edged import config as configmod  # noqa: E402
from edged.daemon.service import Daemon  # noqa: E402
from edged.daemon.sdnotify import Notifier  # noqa: E402

SCRAPER = r"""
import sys, time, urllib.request
port, every, out = int(sys.argv[1]), float(sys.argv[2]), open(sys.argv[3], "a", buffering=1)
nxt = time.monotonic()
while True:
    for path in ("/metrics", "/healthz"):
        t0 = time.perf_counter()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
                n = len(r.read())
        except OSError as e:
            if getattr(e, "code", None) != 503:
                n = -1
            else:
                n = 0
        out.write(f"{path} {time.perf_counter() - t0:.6f} {n}\n")
    nxt += every
    time.sleep(max(nxt - time.monotonic(), 0.0))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_once(clip: Path, gallery: Path, state: Path, args, http: bool, scrape_log: Path) -> dict:
    port = free_port()
    cfg = configmod.build(configmod.Config, {
        "device": {"name": "bench"},
        "cameras": [{"name": "bench", "source": str(clip), "realtime": False, "loop": True}],
        "tracking": {"detect_every": 1},
        "paths": {"gallery": str(gallery), "state_dir": str(state)},
        "mqtt": {"enabled": False},
        "http": {"listen": f"127.0.0.1:{port}" if http else ""},
        "logging": {"target": "stderr", "level": "warning"},
    })
    d = Daemon(cfg, notifier=Notifier(address=""))
    d.start(camera_wait=30)
    scraper = None
    if http:
        scraper = subprocess.Popen([sys.executable, "-c", SCRAPER, str(port), str(args.every),
                                    str(scrape_log)])
    runner = threading.Thread(target=d.run, daemon=True)
    runner.start()
    marks, scrape_ms = {}, None
    try:
        while len(marks) < 2:
            n = d.counters.frames_done_total
            for key, at in (("a", args.warmup), ("b", args.frames)):
                if key not in marks and n >= at:
                    marks[key] = (n, time.monotonic(), sum(os.times()[:2]))
            time.sleep(0.01)
        if http:
            scrape_ms = scrape_cpu_ms(d)
    finally:
        if scraper is not None:
            scraper.terminate()
            scraper.wait()
        d.request_stop()
        runner.join(60)
    (n0, t0, c0), (n1, t1, c1) = marks["a"], marks["b"]
    return {"fps": (n1 - n0) / (t1 - t0), "cpu_ms": 1000.0 * (c1 - c0) / (n1 - n0),
            "cpu_per_s": (c1 - c0) / (t1 - t0), "scrape_ms": scrape_ms}


def scrape_cpu_ms(d, n: int = 30) -> float:
    """CPU milliseconds of one scrape's work (/metrics and /healthz), median of ``n``."""
    out = []
    for _ in range(n):
        t0 = time.thread_time()
        d.http.metrics("")
        d.http.healthz()
        out.append(1000.0 * (time.thread_time() - t0))
    return statistics.median(out)


def observe_us(n: int = 200_000) -> float:
    """Microseconds a stage histogram adds to one ``RollingStats.add``."""
    from edged.daemon.stats import RollingStats
    from edged.publish.metrics import STAGE_BUCKETS, Histogram

    def per_call(stats) -> float:
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(n):
                stats.add(0.003)
            best = min(best, (time.perf_counter() - t0) / n)
        return best

    return 1e6 * (per_call(RollingStats(histogram=Histogram(STAGE_BUCKETS)))
                  - per_call(RollingStats()))


def scrape_figures(path: Path) -> str:
    if not path.exists():
        return "no scrape"
    rows = [line.split() for line in path.read_text().splitlines()]
    met = [(float(t), int(n)) for p, t, n in rows if p == "/metrics" and int(n) > 0]
    if not met:
        return "no scrape answered"
    ms = sorted(t * 1000.0 for t, _ in met)
    return (f"{len(met)} scrapes of /metrics: median {statistics.median(ms):.1f} ms, max "
            f"{ms[-1]:.1f} ms, {met[-1][1]} bytes; failed: {sum(1 for r in rows if r[2] == '-1')}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=6, help="off/on pairs (default 6)")
    ap.add_argument("--frames", type=int, default=400, help="frames per run (default 400)")
    ap.add_argument("--warmup", type=int, default=30, help="frames not counted (default 30)")
    ap.add_argument("--every", type=float, default=1.0, help="seconds between scrapes")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    for name in ("edged.runtime", "edged.gallery", "edged.hotswap", "edged.daemon"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import publicdata
    from edged_daemon_helpers import build_gallery

    photos = publicdata.fetch()
    clip = publicdata.make_clip(publicdata.cache_dir() / "clips" / "visits-v1.mp4", photos=photos)
    runs = {False: [], True: []}
    with tempfile.TemporaryDirectory(prefix="edged-bench-http-") as tmp:
        tmp = Path(tmp)
        enrol = tmp / "enrol"
        for person, names in (("Barack_Obama", ("obama2.jpg", "obama3.jpg")),
                              ("Joe_Biden", ("biden.jpg",))):
            (enrol / person).mkdir(parents=True)
            for n in names:
                (enrol / person / n).write_bytes((photos / n).read_bytes())
        gallery = build_gallery(enrol, tmp / "people.edgal")
        scrape_log = tmp / "scrapes.txt"
        for i in range(args.pairs):
            for http in ((False, True) if i % 2 == 0 else (True, False)):
                r = run_once(clip, gallery, tmp / "state", args, http, scrape_log)
                runs[http].append(r)
                print(f"pair {i + 1} endpoint {'on ' if http else 'off'}: {r['fps']:.2f} fps, "
                      f"{r['cpu_ms']:.1f} ms CPU per frame", flush=True)
        scrapes = scrape_figures(scrape_log)
    off = [r["fps"] for r in runs[False]]
    on = [r["fps"] for r in runs[True]]
    ratios = [b / a for a, b in zip(off, on)]
    cpu_off = statistics.median(r["cpu_ms"] for r in runs[False])
    cpu_on = statistics.median(r["cpu_ms"] for r in runs[True])
    print(f"\nfps off: median {statistics.median(off):.2f} ({min(off):.2f}-{max(off):.2f}); "
          f"on, scraped every {args.every:g} s: median {statistics.median(on):.2f} "
          f"({min(on):.2f}-{max(on):.2f})")
    print(f"on/off per pair: median {statistics.median(ratios):.4f} "
          f"(min {min(ratios):.4f}, max {max(ratios):.4f}): "
          f"{100.0 * (statistics.median(ratios) - 1.0):+.2f} %")
    print(f"CPU per frame: off {cpu_off:.1f} ms, on {cpu_on:.1f} ms "
          f"({100.0 * (cpu_on / cpu_off - 1.0):+.2f} %)")
    print(scrapes)
    scrape_ms = statistics.median(r["scrape_ms"] for r in runs[True])
    obs = observe_us()
    cpu_s = statistics.median(r["cpu_per_s"] for r in runs[False])
    fps_off = statistics.median(off)
    per_s = scrape_ms / 1000.0 / args.every + 6 * obs * 1e-6 * fps_off  # <= 6 stages a frame
    print(f"by accounting: a scrape (/metrics + /healthz) costs {scrape_ms:.2f} ms CPU, a "
          f"histogram observation {obs:.3f} us (at most 6 a frame); at {fps_off:.1f} fps and "
          f"one scrape per {args.every:g} s that is {1000.0 * per_s:.2f} ms CPU per second, "
          f"{100.0 * per_s / cpu_s:.2f} % of the daemon's {cpu_s:.2f} s CPU per second")
    return 0


if __name__ == "__main__":
    sys.exit(main())
