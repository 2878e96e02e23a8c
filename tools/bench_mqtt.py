#!/usr/bin/env python3
"""Benchmark of the MQTT publisher with its on-disk spool, against a local mosquitto.

Starts its own mosquitto on a free loopback port, then for each spool fsync policy:

1. sustained: N events pushed through ``Publisher.publish_event`` as fast as it returns,
   timed until a QoS 1 subscriber has received all of them (events per second end to end) and
   the cost of one ``publish_event`` call (the spool commit the pipeline pays, median / p99);
2. backlog: N events spooled with the broker down, then the broker started: time until the
   spool is empty (the drain rate after an outage).

    .venv/bin/python tools/bench_mqtt.py [--events 5000] [--policies off,normal,full]

Prints a Markdown table for docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import logging
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import paho.mqtt.client as paho  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

from edged.publish.mqtt import MqttSettings, SpoolSettings  # noqa: E402
from edged.publish.publisher import Publisher  # noqa: E402
from edged.types import Event  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Mosquitto:
    def __init__(self, workdir: Path):
        self.dir = workdir
        self.port = free_port()
        self.exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.proc = None

    def start(self):
        conf = self.dir / "mosquitto.conf"
        conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\n"
                        "persistence false\nmax_queued_messages 0\n")
        self.proc = subprocess.Popen([self.exe, "-c", str(conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("mosquitto did not start")

    def stop(self):
        if self.proc:
            self.proc.terminate()
            self.proc.wait(5)
            self.proc = None


class Counter:
    def __init__(self, port: int, topic: str):
        self.n = 0
        self.cond = threading.Condition()
        self.c = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-{uuid.uuid4().hex[:6]}")
        ready = threading.Event()
        self.c.on_connect = lambda c, *a: c.subscribe(topic, 1)
        self.c.on_subscribe = lambda *a: ready.set()
        self.c.on_message = self._msg
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        ready.wait(10)

    def _msg(self, *a):
        with self.cond:
            self.n += 1
            self.cond.notify_all()

    def wait(self, n: int, timeout: float = 300) -> bool:
        deadline = time.monotonic() + timeout
        with self.cond:
            while self.n < n:
                if time.monotonic() > deadline:
                    return False
                self.cond.wait(0.5)
        return True

    def close(self):
        self.c.disconnect()
        self.c.loop_stop()


def event(i: int) -> Event:
    return Event(id=uuid.uuid4().hex, type="recognized", camera=f"cam{i % 2}", track_id=i,
                 frame_time=time.time(), name="alice", identity="id-alice", score=0.7,
                 margin=0.2, box=[10.0, 20.0, 110.0, 140.0], quality=0.8,
                 versions={"embedder": "ab" * 32, "detector": "cd" * 32, "gallery": "ef" * 8})


def settings(port: int, policy: str) -> MqttSettings:
    return MqttSettings(port=port, reconnect_min_s=0.1, reconnect_max_s=0.5,
                        spool=SpoolSettings(fsync=policy, max_events=10 ** 6,
                                            max_bytes=1024 ** 3))


def sustained(port: int, policy: str, n: int, work: Path) -> dict:
    counter = Counter(port, "edged/bench/events")
    pub = Publisher(settings(port, policy), "bench", work / f"sus-{policy}")
    pub.start()
    deadline = time.monotonic() + 10
    while not pub.connected and time.monotonic() < deadline:
        time.sleep(0.01)
    calls = []
    t0 = time.perf_counter()
    for i in range(n):
        a = time.perf_counter()
        pub.publish_event(event(i))
        calls.append(time.perf_counter() - a)
    t_push = time.perf_counter() - t0
    ok = counter.wait(n)
    t_all = time.perf_counter() - t0
    while pub.spool_depth and time.perf_counter() - t0 < 300:
        time.sleep(0.01)
    pub.stop()
    counter.close()
    calls.sort()
    return {"ok": ok, "push_rate": n / t_push, "rate": n / t_all,
            "call_med_ms": statistics.median(calls) * 1e3,
            "call_p99_ms": calls[int(0.99 * (len(calls) - 1))] * 1e3}


def backlog(broker: Mosquitto, policy: str, n: int, work: Path) -> dict:
    broker.stop()
    pub = Publisher(settings(broker.port, policy), "bench", work / f"bl-{policy}")
    pub.start()
    for i in range(n):
        pub.publish_event(event(i))
    assert pub.spool_depth == n
    broker.start()
    counter = Counter(broker.port, "edged/bench/events")
    while not pub.connected:  # time the drain, not the reconnect backoff
        time.sleep(0.001)
    t0 = time.perf_counter()
    while pub.spool_depth and time.perf_counter() - t0 < 300:
        time.sleep(0.005)
    dt = time.perf_counter() - t0
    pub.stop()
    counter.close()
    return {"drain_rate": n / dt, "drain_s": dt}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=5000)
    ap.add_argument("--policies", default="off,normal,full")
    ap.add_argument("--dir", default=None, help="where the spools go (default: a temp dir; "
                                                "put it on the board's real storage)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    work = Path(args.dir or tempfile.mkdtemp(prefix="bench-mqtt-"))
    work.mkdir(parents=True, exist_ok=True)
    broker = Mosquitto(work)
    broker.start()
    rows = []
    try:
        for policy in args.policies.split(","):
            s = sustained(broker.port, policy, args.events, work)
            b = backlog(broker, policy, args.events, work)
            rows.append((policy, s, b))
            print(f"{policy}: {s} {b}", file=sys.stderr, flush=True)
    finally:
        broker.stop()
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)
    fs = subprocess.run(["df", "-T", str(work.parent if not args.dir else work)],
                        capture_output=True, text=True).stdout.splitlines()[-1].split()[1]
    print(f"\n{args.events} events per run, paho-mqtt {_paho_version()}, mosquitto on "
          f"127.0.0.1, spool on {fs}, {platform.machine()} {os.cpu_count()} CPU(s), "
          f"Python {platform.python_version()}\n")
    print("| spool fsync | publish_event median / p99 (ms) | calls/s | end to end events/s "
          "(QoS 1, to a subscriber) | drain after outage (events/s) |")
    print("|---|---|---|---|---|")
    for policy, s, b in rows:
        print(f"| {policy} | {s['call_med_ms']:.3f} / {s['call_p99_ms']:.3f} | "
              f"{s['push_rate']:.0f} | {s['rate']:.0f}{'' if s['ok'] else ' (incomplete)'} | "
              f"{b['drain_rate']:.0f} |")
    return 0


def _paho_version() -> str:
    try:
        from importlib.metadata import version
        return version("paho-mqtt")
    except Exception:
        return "?"


if __name__ == "__main__":
    sys.exit(main())
