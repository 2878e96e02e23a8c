"""Plays edged for the MQTT tests: a Publisher producing synthetic events in its own process.

The tests SIGKILL or SIGTERM this process to check the spool, the last will and the clean stop.
Each event's id, camera and sequence number is appended to ``--produced`` once
``publish_event`` has returned (the event is in the spool by then).  Lines on stdout:
``started``, ``produced N`` (every event), ``empty`` (spool drained, with --exit-when-empty),
``stopped``.

    python tests/mqtt_producer.py --port 1883 --state-dir /tmp/s --count 100 --interval 0.01
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edged.publish.mqtt import MqttSettings, SpoolSettings  # noqa: E402
from edged.publish.publisher import Publisher  # noqa: E402
from edged.types import Event  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--state-dir", required=True)
    ap.add_argument("--device", default="testcam")
    ap.add_argument("--protocol", default="5")
    ap.add_argument("--count", type=int, default=-1,
                    help="events to produce (-1: until stopped)")
    ap.add_argument("--interval", type=float, default=0.05)
    ap.add_argument("--cameras", default="front,back")
    ap.add_argument("--keepalive", type=int, default=2)
    ap.add_argument("--produced", default=None, help="file to append 'id camera seq' lines to")
    ap.add_argument("--exit-when-empty", action="store_true",
                    help="after producing, exit cleanly once the spool is empty")
    ap.add_argument("--start-seq", type=int, default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(threadName)s: %(message)s")

    settings = MqttSettings(port=args.port, protocol=args.protocol, keepalive=args.keepalive,
                            reconnect_min_s=0.2, reconnect_max_s=1.0,
                            spool=SpoolSettings(fsync="normal"))
    pub = Publisher(settings, args.device, args.state_dir, people=["alice"])
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    pub.start()
    print("started", flush=True)
    out = open(args.produced, "a", buffering=1) if args.produced else None
    cams = args.cameras.split(",")
    seq = args.start_seq
    n = 0
    while not stop.is_set() and (args.count < 0 or n < args.count):
        cam = cams[seq % len(cams)]
        ev = Event(id=uuid.uuid4().hex, type="face_appeared", camera=cam, track_id=seq,
                   frame_time=time.time(), box=[10.0, 20.0, 110.0, 140.0], quality=0.8,
                   versions={"embedder": "0" * 64})
        pub.publish_event(ev)
        if out:
            out.write(f"{ev.id} {cam} {seq}\n")
        seq += 1
        n += 1
        print(f"produced {n}", flush=True)
        stop.wait(args.interval)
    if args.exit_when_empty:
        while not stop.is_set() and pub.spool_depth:
            stop.wait(0.05)
        print("empty", flush=True)
    else:
        stop.wait()
    pub.stop(clean=True)
    print("stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())


# ---------------------------------------------------------------------------------------------
# Helpers for the tests (imported by tests/test_*.py; not used when run as a script)

class Subscriber:
    """A paho subscriber that records every message; reconnects on its own.

    ``persistent``: MQTT 5 session kept by the broker (clean_start false, session expiry 1 h),
    so QoS 1 messages published while it is away are queued for it.
    """

    def __init__(self, port: int, topics, client_id: str = None, persistent: bool = False,
                 host: str = "127.0.0.1"):
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        self.topics = [topics] if isinstance(topics, str) else list(topics)
        self.msgs = []  # (topic, payload bytes, retain)
        self.cond = threading.Condition()
        self.subscribed = threading.Event()
        self.c = paho.Client(CallbackAPIVersion.VERSION2,
                             client_id=client_id or f"test-sub-{uuid.uuid4().hex[:8]}",
                             protocol=paho.MQTTv5)
        self.c.on_connect = self._on_connect
        self.c.on_subscribe = lambda *a: self.subscribed.set()
        self.c.on_message = self._on_message
        self.c.reconnect_delay_set(0.1, 0.5)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600 if persistent else 0
        self.c.connect_async(host, port, keepalive=5, clean_start=not persistent,
                             properties=props)
        self.c.loop_start()
        if not self.subscribed.wait(10):
            raise TimeoutError(f"subscriber could not subscribe to {self.topics} on port {port}")

    def _on_connect(self, client, userdata, flags, rc, props):
        if not rc.is_failure:
            client.subscribe([(t, 1) for t in self.topics])

    def _on_message(self, client, userdata, msg):
        with self.cond:
            self.msgs.append((msg.topic, bytes(msg.payload), bool(msg.retain)))
            self.cond.notify_all()

    def wait_for(self, pred, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        with self.cond:
            while not pred(self):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(min(left, 0.2))
            return True

    def payloads(self, topic: str):
        with self.cond:
            return [p for t, p, _ in self.msgs if t == topic]

    def json(self, topic: str):
        import json
        return [json.loads(p) for p in self.payloads(topic) if p]

    def publish(self, topic: str, payload, retain: bool = False):
        self.c.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)

    def close(self):
        self.c.disconnect()
        self.c.loop_stop()


def make_ca(d: Path, name: str = "ca"):
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate (openssl).

    Returns a dict of paths: ca, server_cert, server_key, client_cert, client_key.
    """
    import subprocess

    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)

    def run(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run("req", "-x509", *ec, "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "2",
        "-subj", f"/CN=edged test {name}")
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    out = {"ca": d / f"{name}.crt"}
    for who, ext in (("server", ["-extfile", "san.ext"]), ("client", [])):
        run("req", *ec, "-keyout", f"{name}-{who}.key", "-out", f"{name}-{who}.csr",
            "-subj", f"/CN={who}")
        run("x509", "-req", "-in", f"{name}-{who}.csr", "-CA", f"{name}.crt", "-CAkey",
            f"{name}.key", "-CAcreateserial", "-out", f"{name}-{who}.crt", "-days", "2", *ext)
        out[f"{who}_cert"] = d / f"{name}-{who}.crt"
        out[f"{who}_key"] = d / f"{name}-{who}.key"
    return out


def wait_until(pred, timeout: float = 10.0, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return bool(pred())
