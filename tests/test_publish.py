"""The Publisher against a real mosquitto: outages, crashes, availability, presence, status."""
from __future__ import annotations

import base64
import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from pathlib import Path

import pytest

from edged.publish.mqtt import MqttSettings
from edged.publish.publisher import SPOOL_FILE, Publisher, event_payload, iso_utc
from edged.types import Event
from mqtt_producer import Subscriber, wait_until

PRODUCER = Path(__file__).with_name("mqtt_producer.py")
PREFIX = "edged/testcam"


def settings(port, **kw) -> MqttSettings:
    kw.setdefault("reconnect_min_s", 0.2)
    kw.setdefault("reconnect_max_s", 1.0)
    kw.setdefault("keepalive", 5)
    return MqttSettings(port=port, **kw)


class Producer:
    """tests/mqtt_producer.py in its own process (so that it can be SIGKILLed)."""

    def __init__(self, tmp_path: Path, port: int, *args: str, name: str = "producer"):
        self.produced = tmp_path / "produced.txt"
        self.state = tmp_path / "state"
        self.log = open(tmp_path / f"{name}.log", "ab")
        self.logpath = tmp_path / f"{name}.log"
        self.proc = subprocess.Popen(
            [sys.executable, str(PRODUCER), "--port", str(port), "--state-dir", str(self.state),
             "--produced", str(self.produced), *args],
            stdout=subprocess.PIPE, stderr=self.log, text=True)

    def wait_line(self, prefix: str, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            if line.startswith(prefix):
                return line.strip()
        raise AssertionError(f"producer never printed {prefix!r}; log:\n"
                             + self.logpath.read_text()[-3000:])

    def signal(self, sig) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(15)

    def kill_quietly(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def produced(path: Path):
    rows = [line.split() for line in path.read_text().splitlines() if line.strip()]
    return [(i, cam, int(seq)) for i, cam, seq in rows]


def spool_then_crash(tmp_path: Path, port: int, count: int):
    """A producer spools ``count`` events (the broker at ``port`` is down), then is SIGKILLed:
    ``(the producer, its events as produced)``."""
    prod = Producer(tmp_path, port, "--count", str(count), "--interval", "0", name="first")
    try:
        prod.wait_line(f"produced {count}")
        prod.proc.send_signal(signal.SIGKILL)
        prod.proc.wait(10)
    finally:
        prod.kill_quietly()
    return prod, produced(prod.produced)


def drain_after_restart(tmp_path: Path, port: int) -> "Producer":
    """A producer restarted on the same spool, sending what it holds, until it is empty and
    exits; the caller kills it quietly."""
    again = Producer(tmp_path, port, "--count", "0", "--exit-when-empty", name="second")
    try:
        again.wait_line("empty", 30)
        assert again.proc.wait(15) == 0
    except BaseException:
        again.kill_quietly()
        raise
    return again


def check_delivery(msgs, expected):
    """Every expected id at least once; per camera in order; duplicates identical."""
    by_id = {}
    firsts = defaultdict(list)
    for payload in msgs:
        doc = json.loads(payload)
        if doc["id"] in by_id:
            assert by_id[doc["id"]] == doc, "a duplicate differs from the first copy"
            continue
        by_id[doc["id"]] = doc
        firsts[doc["camera"]].append(doc["track_id"])
    missing = [e for e in expected if e[0] not in by_id]
    assert not missing, f"{len(missing)} of {len(expected)} events never arrived: {missing[:5]}"
    for cam, seqs in firsts.items():
        assert seqs == sorted(seqs), f"camera {cam}: out of order {seqs}"
    for i, cam, seq in expected:
        assert by_id[i]["camera"] == cam and by_id[i]["track_id"] == seq
    return len(msgs) - len(by_id)


def test_broker_outage_of_30s_loses_nothing(broker_factory, tmp_path):
    """Broker stopped for 30 s while events are produced, then restarted.

    The subscriber holds a persistent session on a broker with persistence, so what the
    broker accepts while the subscriber is still reconnecting is queued for it.
    """
    b = broker_factory(f"persistence true\npersistence_location {tmp_path}/\n"
                       "autosave_interval 1\nuser root\n").start()
    sub = Subscriber(b.port, f"{PREFIX}/events", client_id="outage-sub", persistent=True)
    prod = Producer(tmp_path, b.port, "--interval", "0.05", "--cameras", "front,back,side")
    try:
        prod.wait_line("started")
        assert sub.wait_for(lambda s: len(s.payloads(f"{PREFIX}/events")) >= 20, 15)
        b.stop()
        t0 = time.monotonic()
        n_down = len(prod.produced.read_text().splitlines())
        time.sleep(30)
        produced_during = len(prod.produced.read_text().splitlines()) - n_down
        assert produced_during > 100  # the producer went on, into its spool
        b.start()
        time.sleep(2)
        assert prod.signal(signal.SIGTERM) == 0
        expected = produced(prod.produced)
        ok = sub.wait_for(lambda s: {json.loads(p)["id"] for p in s.payloads(f"{PREFIX}/events")}
                          >= {e[0] for e in expected}, 30)
        dups = check_delivery(sub.payloads(f"{PREFIX}/events"), expected)
        assert ok
        print(f"{len(expected)} events, {produced_during} during the {time.monotonic() - t0:.0f} s"
              f" outage, {dups} duplicate(s)")
        log = prod.logpath.read_text()
        assert "connection to 127.0.0.1" in log and "lost" in log
    finally:
        prod.kill_quietly()
        sub.close()


def test_producer_sigkilled_with_spooled_events_delivers_them_on_restart(broker_factory,
                                                                         tmp_path):
    b = broker_factory()  # not started: the broker is down
    prod, expected = spool_then_crash(tmp_path, b.port, 60)
    assert len(expected) == 60
    # the spool on disk holds them all, independently of any broker
    db = sqlite3.connect(prod.state / SPOOL_FILE)
    rows = db.execute("SELECT event_id FROM events ORDER BY id").fetchall()
    db.close()
    assert [r[0] for r in rows] == [e[0] for e in expected]

    b.start()
    sub = Subscriber(b.port, f"{PREFIX}/events")
    again = None
    try:
        again = drain_after_restart(tmp_path, b.port)
        assert sub.wait_for(lambda s: len(s.payloads(f"{PREFIX}/events")) >= 60, 10)
        check_delivery(sub.payloads(f"{PREFIX}/events"), expected)
        first = json.loads(sub.payloads(f"{PREFIX}/events")[0])
        assert first["id"] == expected[0][0]  # oldest first, original id
    finally:
        if again is not None:
            again.kill_quietly()
        sub.close()
    assert "60 event(s) waiting from before" in again.logpath.read_text()


def test_availability_offline_on_sigkill_and_stopped_on_sigterm(broker, tmp_path):
    topic = f"{PREFIX}/availability"
    sub = Subscriber(broker.port, topic)
    prod = Producer(tmp_path, broker.port, "--count", "1", "--keepalive", "2")
    try:
        assert sub.wait_for(lambda s: s.payloads(topic)[-1:] == [b"online"], 15)
        t0 = time.monotonic()
        prod.proc.send_signal(signal.SIGKILL)
        prod.proc.wait(10)
        assert sub.wait_for(lambda s: s.payloads(topic)[-1:] == [b"offline"], 10)
        print(f"offline {time.monotonic() - t0:.1f} s after SIGKILL (keepalive 2 s)")
        prod = Producer(tmp_path, broker.port, "--count", "1", "--keepalive", "2", name="p2")
        assert sub.wait_for(lambda s: s.payloads(topic)[-1:] == [b"online"], 15)
        prod.wait_line("produced 1")
        assert prod.signal(signal.SIGTERM) == 0
        assert sub.wait_for(lambda s: s.payloads(topic)[-1:] == [b"stopped"], 10)
        time.sleep(0.5)
        assert sub.payloads(topic)[-1] == b"stopped"  # and no last will after it
    finally:
        prod.kill_quietly()
        sub.close()
    # retained: a late subscriber sees the last state
    late = Subscriber(broker.port, topic)
    try:
        assert late.wait_for(lambda s: s.payloads(topic) == [b"stopped"], 5)
    finally:
        late.close()


def ev(type_="recognized", camera="door", track=1, name="alice", **kw) -> Event:
    return Event(id=uuid.uuid4().hex, type=type_, camera=camera, track_id=track,
                 frame_time=time.time(), name=name, identity=name and f"id-{name}",
                 score=0.71234567, margin=0.2, box=[1.0, 2.0, 30.5, 40.25], quality=0.9,
                 versions={"embedder": "ab" * 32, "gallery": "cd" * 8}, **kw)


@pytest.fixture
def pub_factory(tmp_path):
    made = []

    def make(port, people=("alice", "bob"), **kw):
        p = Publisher(settings(port, **kw), "testcam", tmp_path / f"state{len(made)}",
                      people=people)
        made.append(p)
        p.start()
        return p

    yield make
    for p in made:
        p.stop()


def test_event_payload_contract(broker, pub_factory):
    sub = Subscriber(broker.port, f"{PREFIX}/#")
    p = pub_factory(broker.port)
    try:
        e = ev()
        p.publish_event(e)
        assert sub.wait_for(lambda s: s.json(f"{PREFIX}/events"), 10)
        doc = sub.json(f"{PREFIX}/events")[0]
        assert set(doc) == {"schema", "id", "type", "device", "camera", "track_id", "name",
                            "identity", "score", "margin", "box", "quality", "duration",
                            "best_score", "frame_time", "publish_time", "versions"}
        assert doc["id"] == e.id and doc["type"] == "recognized" and doc["name"] == "alice"
        assert doc["score"] == 0.7123 and doc["box"] == [1.0, 2.0, 30.5, 40.2]
        assert doc["frame_time"].endswith("Z") and "T" in doc["frame_time"]
        assert doc["versions"]["embedder"] == "ab" * 32
        assert wait_until(lambda: p.spool_depth == 0)
    finally:
        sub.close()
    with pytest.raises(ValueError, match="type 'waved' is not one of"):
        event_payload(ev(type_="waved"), "d", time.time())


def test_presence_set_by_recognition_and_cleared_after_timeout(broker, pub_factory):
    sub = Subscriber(broker.port, f"{PREFIX}/person/#")
    p = pub_factory(broker.port, presence_timeout_s=1.0)
    topic = f"{PREFIX}/person/alice"
    try:
        # at start: retained "not present" for every enrolled person
        assert sub.wait_for(lambda s: s.json(topic) and not s.json(topic)[-1]["present"], 10)
        assert sub.wait_for(lambda s: s.json(f"{PREFIX}/person/bob"), 10)
        p.publish_event(ev("face_appeared", name=None, track=7))
        p.publish_event(ev("recognized", track=7))
        assert sub.wait_for(lambda s: s.json(topic)[-1]["present"], 10)
        doc = sub.json(topic)[-1]
        assert doc["camera"] == "door" and doc["last_seen"].endswith("Z")
        time.sleep(1.5)  # the track is still on: no timeout while it lives
        assert sub.json(topic)[-1]["present"]
        t0 = time.monotonic()
        p.publish_event(ev("track_ended", track=7, duration=3.0, best_score=0.8))
        assert sub.wait_for(lambda s: not s.json(topic)[-1]["present"], 10)
        assert 0.9 <= time.monotonic() - t0 < 5
        assert not sub.json(f"{PREFIX}/person/bob")[-1]["present"]
    finally:
        sub.close()


def test_status_is_retained_and_merged(broker, pub_factory):
    p = pub_factory(broker.port)
    p.update_status(versions={"models": {"embedder": "ab" * 32}},
                    cameras={"door": {"connected": True}})
    p.update_status(cameras={"yard": {"connected": False}},
                    last_swap={"kind": "gallery", "result": "ok"},
                    last_rejected_drop={"file": "x.tflite", "why": "sha256 mismatch"})
    topic = f"{PREFIX}/status"
    assert wait_until(lambda: p.connected)
    time.sleep(0.5)
    sub = Subscriber(broker.port, topic)  # subscribes after the fact: retained
    try:
        assert sub.wait_for(lambda s: s.json(topic) and "yard" in s.json(topic)[-1].get(
            "cameras", {}), 10)
        doc = sub.json(topic)[-1]
        assert doc["cameras"] == {"door": {"connected": True}, "yard": {"connected": False}}
        assert doc["versions"]["models"]["embedder"] == "ab" * 32
        assert doc["last_rejected_drop"]["why"] == "sha256 mismatch"
        assert doc["spool"]["dropped"] == 0 and doc["spool"]["fsync"] == "normal"
        assert doc["edged_version"] and doc["device"] == "testcam"
        p.update_status(last_swap=None)
        assert sub.wait_for(lambda s: "last_swap" not in s.json(topic)[-1], 10)
    finally:
        sub.close()


def test_a_replaced_status_part_is_never_published_missing(broker, pub_factory):
    """A swap replaces ``versions`` whole; every status seen on the wire still has them (two
    calls, a delete then a set, let the publisher send a status without versions between)."""
    p = pub_factory(broker.port)
    topic = f"{PREFIX}/status"
    assert wait_until(lambda: p.connected)
    sub = Subscriber(broker.port, topic)
    try:
        for i in range(300):
            p.update_status(_replace=("versions",),
                            versions={"gallery": f"{i:064x}", "detector": {"pnet": "ab"}}
                            if i % 2 else {"gallery": f"{i:064x}"})
            if i % 50 == 0:
                time.sleep(0.05)
        last = f"{299:064x}"
        assert sub.wait_for(lambda s: s.json(topic) and
                            s.json(topic)[-1].get("versions", {}).get("gallery") == last, 10)
        docs = sub.json(topic)
        first = next(i for i, d in enumerate(docs) if "versions" in d)
        docs = docs[first:]  # from the first update on (before it: the status at connect)
        assert len(docs) >= 2
        assert all("versions" in d and "gallery" in d["versions"] for d in docs)
        # whole replacement: the detector part of an odd update does not survive an even one
        assert all(("detector" in d["versions"]) == (int(d["versions"]["gallery"], 16) % 2 == 1)
                   for d in docs)
    finally:
        sub.close()


def test_stats_carry_spool_and_mqtt_parts(broker, pub_factory):
    sub = Subscriber(broker.port, f"{PREFIX}/stats")
    p = pub_factory(broker.port)
    try:
        assert wait_until(lambda: p.connected)
        p.publish_stats({"cameras": {"door": {"fps": 14.9, "dropped": 3}},
                         "latency_ms": {"detect": {"p50": 8.0}}, "cpu_percent": 50.0})
        assert sub.wait_for(lambda s: s.json(f"{PREFIX}/stats"), 10)
        doc = sub.json(f"{PREFIX}/stats")[0]
        assert doc["cameras"]["door"]["fps"] == 14.9
        assert doc["spool"]["depth"] == 0 and doc["spool"]["dropped"] == 0
        assert doc["mqtt"]["connected"] is True and doc["time"].endswith("Z")
    finally:
        sub.close()


def test_full_spool_drops_oldest_and_reports_it(broker_factory, pub_factory):
    from edged.publish.mqtt import SpoolSettings

    b = broker_factory()  # down while the spool overflows
    p = pub_factory(b.port, spool=SpoolSettings(max_events=10))
    events = [ev("face_appeared", name=None, track=i) for i in range(25)]
    for e in events:
        p.publish_event(e)
    assert p.spool_depth == 10 and p.dropped == 15
    # the events wait in the spool on disk; the subscriber is in place before a publisher can
    # reach the broker (events are not retained: one sent before it subscribed would be missed)
    p.stop()
    b.start()
    sub = Subscriber(b.port, [f"{PREFIX}/events", f"{PREFIX}/status"])
    p2 = Publisher(settings(b.port, spool=SpoolSettings(max_events=10)), "testcam",
                   p.spool.path.parent, people=("alice", "bob"))
    p2.start()
    try:
        assert sub.wait_for(lambda s: len(s.json(f"{PREFIX}/events")) >= 10, 15)
        assert [d["id"] for d in sub.json(f"{PREFIX}/events")][:10] == [e.id for e in events[15:]]
        # the count of dropped events survives the restart
        assert sub.wait_for(lambda s: s.json(f"{PREFIX}/status")
                            and s.json(f"{PREFIX}/status")[-1]["spool"]["dropped"] == 15, 10)
    finally:
        p2.stop()
        sub.close()


@pytest.mark.parametrize("encoding", ["jpeg", "base64"])
def test_snapshots_only_when_configured(broker, pub_factory, public_photos, encoding):
    jpeg = (public_photos / "obama.jpg").read_bytes()
    sub = Subscriber(broker.port, f"{PREFIX}/#")
    off = pub_factory(broker.port)
    on = Publisher(settings(broker.port, snapshots=True, snapshot_encoding=encoding,
                            client_id="edged-testcam-2"), "testcam", off.spool.path.parent / "b")
    on.start()
    try:
        assert wait_until(lambda: off.connected and on.connected)
        off.publish_event(ev(snapshot=jpeg))
        e = ev(snapshot=jpeg)
        on.publish_event(e)
        topic = f"{PREFIX}/snapshot/door"
        assert sub.wait_for(lambda s: s.payloads(topic), 10)
        time.sleep(0.3)
        got = sub.payloads(topic)
        assert len(got) == 1
        if encoding == "jpeg":
            assert got[0] == jpeg
        else:
            doc = json.loads(got[0])
            assert doc["event_id"] == e.id and base64.b64decode(doc["jpeg"]) == jpeg
            assert doc["time"] == iso_utc(e.frame_time)  # when the image was taken
        for doc in sub.json(f"{PREFIX}/events"):
            assert "snapshot" not in doc and "embedding" not in doc
    finally:
        on.stop()
        sub.close()


def test_disabled_publisher_does_nothing(tmp_path):
    p = Publisher(MqttSettings(enabled=False), "x", tmp_path / "s")
    p.start()
    p.publish_event(ev())
    p.update_status(a=1)
    p.publish_stats({})
    p.stop()
    assert not os.path.exists(tmp_path / "s" / SPOOL_FILE) and p.spool_depth == 0


def test_person_removed_from_gallery_has_presence_cleared(broker, pub_factory):
    sub = Subscriber(broker.port, f"{PREFIX}/person/#")
    p = pub_factory(broker.port, presence_timeout_s=1.0)
    try:
        assert sub.wait_for(lambda s: s.json(f"{PREFIX}/person/bob"), 10)
        p.publish_event(ev("recognized", name="alice", track=3))
        assert sub.wait_for(lambda s: s.json(f"{PREFIX}/person/alice")[-1]["present"], 10)
        p.set_people([])  # both leave the gallery; alice is still in front of the camera
        assert sub.wait_for(lambda s: s.payloads(f"{PREFIX}/person/bob")[-1] == b"", 10)
        time.sleep(1.5)
        assert sub.json(f"{PREFIX}/person/alice")[-1]["present"]
        p.publish_event(ev("track_ended", name="alice", track=3))
        assert sub.wait_for(lambda s: s.payloads(f"{PREFIX}/person/alice")[-1] == b"", 10)
        assert not sub.json(f"{PREFIX}/person/alice")[-1]["present"]  # gone, then cleared
    finally:
        sub.close()


def test_availability_offline_after_keepalive_when_frozen(broker, tmp_path):
    """A board that loses power keeps no socket to close: the broker's keepalive timeout
    publishes the will.  A SIGSTOPped producer plays that board."""
    topic = f"{PREFIX}/availability"
    sub = Subscriber(broker.port, topic)
    prod = Producer(tmp_path, broker.port, "--count", "1", "--keepalive", "2")
    try:
        assert sub.wait_for(lambda s: s.payloads(topic)[-1:] == [b"online"], 15)
        t0 = time.monotonic()
        prod.proc.send_signal(signal.SIGSTOP)
        assert sub.wait_for(lambda s: s.payloads(topic)[-1:] == [b"offline"], 10)
        waited = time.monotonic() - t0
        assert 2.0 <= waited < 6.0, waited  # 1.5 x keepalive (2 s), not at once
    finally:
        prod.kill_quietly()
        sub.close()


def test_torn_spool_record_after_a_crash_is_skipped_with_a_log_line(broker_factory, tmp_path):
    b = broker_factory()
    prod, expected = spool_then_crash(tmp_path, b.port, 20)
    # a power cut tore one record: its payload is cut short
    db = sqlite3.connect(prod.state / SPOOL_FILE)
    torn_id = expected[7][0]
    db.execute("UPDATE events SET payload = substr(payload, 1, 40) WHERE event_id = ?",
               (torn_id,))
    db.commit()
    db.close()
    b.start()
    sub = Subscriber(b.port, f"{PREFIX}/events")
    again = None
    try:
        again = drain_after_restart(tmp_path, b.port)
        rest = [e for e in expected if e[0] != torn_id]
        assert sub.wait_for(lambda s: len(s.payloads(f"{PREFIX}/events")) >= 19, 10)
        check_delivery(sub.payloads(f"{PREFIX}/events"), rest)
        assert torn_id not in b"".join(sub.payloads(f"{PREFIX}/events")).decode()
    finally:
        if again is not None:
            again.kill_quietly()
        sub.close()
    log = again.logpath.read_text()
    assert f"(event {torn_id}) is torn or corrupt (payload is not JSON" in log
    assert "Traceback" not in log


def test_inflight_stays_within_the_brokers_receive_maximum(broker_factory, pub_factory):
    b = broker_factory("max_inflight_messages 3\n").start()  # CONNACK Receive Maximum 3
    sub = Subscriber(b.port, f"{PREFIX}/events")
    p = pub_factory(b.port, max_inflight=20)
    try:
        assert wait_until(lambda: p.connected)
        assert wait_until(lambda: p._budget == 3)
        events = [ev("face_appeared", name=None, camera=f"c{i % 2}", track=i) for i in range(200)]
        peak = 0
        for e in events:
            p.publish_event(e)
            peak = max(peak, len(p._inflight) + len(p._ctl_inflight))
        while p.spool_depth:
            peak = max(peak, len(p._inflight) + len(p._ctl_inflight))
            time.sleep(0.001)
        assert peak <= 3
        assert sub.wait_for(lambda s: len(s.payloads(f"{PREFIX}/events")) >= 200, 10)
        check_delivery(sub.payloads(f"{PREFIX}/events"), [(e.id, e.camera, e.track_id)
                                                          for e in events])
    finally:
        sub.close()


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_stop_not_clean_leaves_offline(broker, tmp_path, protocol):
    topic = f"{PREFIX}/availability"
    sub = Subscriber(broker.port, topic)
    p = Publisher(settings(broker.port, protocol=protocol), "testcam", tmp_path / "s")
    p.start()
    try:
        assert sub.wait_for(lambda s: s.payloads(topic)[-1:] == [b"online"], 10)
        p.stop(clean=False)
        assert sub.wait_for(lambda s: s.payloads(topic)[-1:] == [b"offline"], 10)
    finally:
        p.stop()
        sub.close()


def test_disk_refusing_writes_sends_from_memory_with_a_log_line(broker, pub_factory, caplog,
                                                                monkeypatch):
    sub = Subscriber(broker.port, f"{PREFIX}/events")
    p = pub_factory(broker.port)
    try:
        assert wait_until(lambda: p.connected)

        def full(*a):
            raise sqlite3.OperationalError("database or disk is full")

        monkeypatch.setattr(p.spool, "_put", full)
        e = ev()
        with caplog.at_level(logging.ERROR, "edged.spool"):
            p.publish_event(e)
        assert "the disk refuses writes (database or disk is full): new events are held in " \
            "memory" in caplog.text
        assert sub.wait_for(lambda s: [d["id"] for d in s.json(f"{PREFIX}/events")] == [e.id], 10)
    finally:
        sub.close()


def test_a_person_removed_and_back_keeps_the_retained_presence(tmp_path, caplog):
    """A gallery swap removes bob and a rollback brings him back before the sender ran: his
    retained presence is rewritten, not cleared.  Two names sharing one topic are logged."""
    from conftest import free_port

    p = Publisher(MqttSettings(port=free_port()), "testcam", tmp_path / "state",
                  people=["alice", "bob"])
    try:
        p.set_people(["alice"])
        p.set_people(["alice", "bob"])
        p._people["bob"].dirty = True
        p._collect_state()
        topic = "edged/testcam/person/bob"
        assert json.loads(p._ctl_pending[topic][0])["name"] == "bob"
        with caplog.at_level(logging.WARNING, logger="edged.publish"):
            p.set_people(["Bob Smith", "Bob_Smith"])
        assert "share the presence topic edged/testcam/person/Bob_Smith" in caplog.text
    finally:
        p.spool.close()


def test_non_finite_numbers_become_null_in_the_payload():
    """NaN and infinity are not JSON: a quality or box that somehow is not finite goes out as
    null, and the payload stays parseable by any subscriber."""
    e = ev()
    e.quality = float("nan")
    e.box = [1.0, float("nan"), 3.0, 4.0]
    e.score = float("inf")
    doc = event_payload(e, "testcam", time.time())
    text = json.dumps(doc, allow_nan=False)
    back = json.loads(text)
    assert back["quality"] is None and back["box"] is None and back["score"] is None
    assert back["margin"] == 0.2


def _thread_cpu_s(thread) -> float:
    """CPU seconds (user + system) one thread of this process has used, from /proc."""
    with open(f"/proc/self/task/{thread.native_id}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _sender_rounds_during(p: Publisher, failed_attempts: int = 3):
    """(sender rounds, sender CPU seconds, seconds) while paho fails ``failed_attempts``
    more connection attempts to the broker that is down."""
    rounds, cpu, t0 = p.loops, _thread_cpu_s(p._thread), time.monotonic()
    n = p.client.attempts
    assert wait_until(lambda: p.client.attempts >= n + failed_attempts, 20)
    return p.loops - rounds, _thread_cpu_s(p._thread) - cpu, time.monotonic() - t0


def test_the_sender_sleeps_while_the_broker_is_unreachable(broker_factory, pub_factory):
    """Presence is due (at boot for every enrolled person, and for alice seen during an
    outage) but cannot be sent: the sender waits for the broker instead of spinning, from
    boot with the broker down and during an outage, and sends what was due once it is back."""
    b = broker_factory()  # not started: the broker is down from boot
    p = pub_factory(b.port)
    rounds, cpu, secs = _sender_rounds_during(p)
    # a round per wake-up or per 0.5 s: a few per second, never thousands
    assert rounds <= 4 + 3 * secs and cpu < 0.25, (rounds, cpu, secs)
    b.start()
    topic = f"{PREFIX}/person/alice"
    sub = Subscriber(b.port, f"{PREFIX}/person/#")
    try:
        assert sub.wait_for(lambda s: s.json(topic) and not s.json(topic)[-1]["present"], 15)
        b.stop()
        assert wait_until(lambda: not p.connected, 10)
        p.publish_event(ev("recognized", track=5))  # alice seen while the broker is down
        rounds, cpu, secs = _sender_rounds_during(p)
        assert rounds <= 4 + 3 * secs and cpu < 0.25, (rounds, cpu, secs)
    finally:
        sub.close()
    b.start()
    sub = Subscriber(b.port, f"{PREFIX}/person/#")
    try:
        assert sub.wait_for(lambda s: s.json(topic) and s.json(topic)[-1]["present"], 15)
        assert wait_until(lambda: p.spool_depth == 0, 10)
    finally:
        sub.close()


def test_a_clean_stop_leaves_everyone_absent_and_the_status_stopped(broker, pub_factory):
    """Before the client says goodbye (availability "stopped", then DISCONNECT), the
    retained presence of everyone present goes absent and the retained status says stopped,
    with its cameras not connected."""
    sub = Subscriber(broker.port, f"{PREFIX}/#")
    p = pub_factory(broker.port)
    alice, status = f"{PREFIX}/person/alice", f"{PREFIX}/status"
    try:
        p.update_status(cameras={"door": {"connected": True, "fps": 14.9, "dropped": 2}})
        p.publish_event(ev("recognized", track=3))
        assert sub.wait_for(lambda s: s.json(alice) and s.json(alice)[-1]["present"], 10)
        assert sub.wait_for(lambda s: s.json(status) and s.json(status)[-1].get("cameras"), 10)
        p.stop(clean=True)
        assert sub.wait_for(lambda s: s.payloads(f"{PREFIX}/availability")[-1:] == [b"stopped"],
                            10)
        seq = [(t, pl) for t, pl, _ in sub.msgs]
        before = seq[:seq.index((f"{PREFIX}/availability", b"stopped"))]
        last = {t: json.loads(pl) for t, pl in before if pl and t != f"{PREFIX}/availability"}
        assert last[alice]["present"] is False and last[alice]["name"] == "alice"
        assert last[status]["state"] == "stopped"
        assert last[status]["cameras"]["door"] == {"connected": False, "dropped": 2}
    finally:
        sub.close()
    late = Subscriber(broker.port, [alice, status])  # what stays retained
    try:
        assert late.wait_for(lambda s: s.json(alice) and s.json(status), 5)
        assert not late.json(alice)[-1]["present"]
        assert late.json(status)[-1]["state"] == "stopped"
    finally:
        late.close()


def test_presence_timing_ignores_wall_clock_steps(broker, pub_factory):
    """NTP steps the clock of a board without a real-time clock: frame times jump a day
    forward, then an hour back. Presence still follows the tracks and the monotonic timeout;
    last_seen stays the frame's wall-clock time."""
    sub = Subscriber(broker.port, f"{PREFIX}/person/#")
    p = pub_factory(broker.port, presence_timeout_s=1.0)
    topic = f"{PREFIX}/person/alice"
    try:
        assert sub.wait_for(lambda s: s.json(topic), 10)
        now = time.time()
        first = ev("recognized", track=9)
        first.frame_time = now + 86400.0
        p.publish_event(first)
        assert sub.wait_for(lambda s: s.json(topic)[-1]["present"], 10)
        assert sub.json(topic)[-1]["last_seen"] == iso_utc(now + 86400.0)
        end = ev("track_ended", track=9, duration=2.0)
        end.frame_time = now - 3600.0
        t0 = time.monotonic()
        p.publish_event(end)
        assert sub.wait_for(lambda s: not s.json(topic)[-1]["present"], 10)
        assert time.monotonic() - t0 >= 0.9  # the timeout, on the monotonic clock
        assert sub.json(topic)[-1]["last_seen"] == iso_utc(now - 3600.0)
    finally:
        sub.close()


def test_spoof_suspected_is_published_with_liveness_and_changes_no_presence(broker, pub_factory):
    sub = Subscriber(broker.port, f"{PREFIX}/#")
    p = pub_factory(broker.port)
    topic = f"{PREFIX}/person/alice"
    try:
        assert sub.wait_for(lambda s: s.json(topic), 10)
        p.publish_event(ev("face_appeared", name=None, track=3))
        p.publish_event(ev("spoof_suspected", track=3, liveness={"score": 0.0123456, "live": False}))
        p.publish_event(ev("recognized", name="bob", track=4,
                           liveness={"score": 0.97, "live": True}))
        assert sub.wait_for(lambda s: len(s.json(f"{PREFIX}/events")) == 3, 10)
        docs = sub.json(f"{PREFIX}/events")
        assert docs[1]["type"] == "spoof_suspected" and docs[1]["name"] == "alice"
        assert docs[1]["liveness"] == {"score": 0.0123, "live": False}
        assert docs[2]["liveness"] == {"score": 0.97, "live": True}
        assert "liveness" not in docs[0]  # only the events that carry it
        # bob's recognition is published after alice's suspected spoof: by then alice's
        # presence would have been too, had the spoof set it
        assert sub.wait_for(lambda s: s.json(f"{PREFIX}/person/bob")[-1]["present"], 10)
        assert not any(d["present"] for d in sub.json(topic))
    finally:
        sub.close()
