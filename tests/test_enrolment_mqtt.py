"""Enrolment from Home Assistant or any MQTT client (issue 19), through a real mosquitto and a
real ``edged run`` on the public clip (Obama, a cut, Biden), looped, with an empty gallery:
the discovery announces the last unknown face, the name and the button; the name set on the
text entity's command topic and the button pressed enrol the last unknown face; the running
daemon swaps the gallery and names that person; bad commands get a result that says why."""
from __future__ import annotations

import json

import numpy as np

from conftest import wait_for
from edged.enrolment.store import TrackStore
from edged.publish.hass import HassDiscovery
from edged_daemon_helpers import DaemonProcess, write_config
from mqtt_producer import Subscriber

PREFIX = "edged/door"
DISCOVERY = "homeassistant/device/edged_door/config"


def _daemon(tmp_path, clip, broker, commands=True):
    cfg = write_config(
        tmp_path / "edged.yaml", device={"name": "door"},
        cameras=[{"name": "door", "source": str(clip), "realtime": False, "loop": True}],
        paths={"gallery": str(tmp_path / "people.edgal"), "state_dir": str(tmp_path / "state")},
        mqtt={"host": "127.0.0.1", "port": broker.port, "snapshots": True,
              "reconnect_min_s": 0.1, "reconnect_max_s": 1},
        enrolment={"keep_faces": True, "mqtt_commands": commands},
        logging={"target": "stderr", "level": "info"})
    return DaemonProcess(cfg, tmp_path)


def _results(sub):
    return sub.json(f"{PREFIX}/command/result")


def test_the_discovery_announces_the_enrolment_entities(public_clip, broker, tmp_path):
    sub = Subscriber(broker.port, [DISCOVERY])
    d = _daemon(tmp_path, public_clip, broker)
    try:
        assert sub.wait_for(lambda s: s.json(DISCOVERY), 120), d.log()[-3000:]
        doc = sub.json(DISCOVERY)[-1]
        assert HassDiscovery.validate(doc) is None
        comps = doc["components"]
        image = comps["edged_door_last_unknown_face"]
        assert image["platform"] == "image" and image["content_type"] == "image/jpeg"
        assert image["image_topic"] == f"{PREFIX}/enrol/last_unknown"
        text = comps["edged_door_enrol_name"]
        assert text["platform"] == "text" and text["command_topic"] == f"{PREFIX}/command/enrol_name"
        assert text["state_topic"] == f"{PREFIX}/enrol/name"
        assert 0 <= text["min"] <= text["max"] <= 255  # Home Assistant's text limits
        button = comps["edged_door_enrol_last_unknown"]
        assert button["platform"] == "button" and button["command_topic"] == f"{PREFIX}/command/enrol"
        assert json.loads(button["payload_press"]) == {"track": "last_unknown"}
        for c in (image, text, button):  # what Home Assistant keys an entity by
            assert c["unique_id"] and c["name"]
    finally:
        d.kill()
        sub.close()


def test_the_button_enrols_the_last_unknown_face_and_bad_commands_say_why(
        public_clip, broker, tmp_path):
    sub = Subscriber(broker.port, [f"{PREFIX}/#"])
    d = _daemon(tmp_path, public_clip, broker)
    store = TrackStore.of_state_dir(tmp_path / "state")
    try:
        # the last unknown face, as Home Assistant's image entity gets it (a JPEG)
        assert sub.wait_for(lambda s: s.payloads(f"{PREFIX}/enrol/last_unknown"), 180), \
            d.log()[-3000:]
        assert sub.payloads(f"{PREFIX}/enrol/last_unknown")[-1][:2] == b"\xff\xd8"

        # bad commands: each answered with why
        sub.publish(f"{PREFIX}/command/enrol", "not json")
        sub.publish(f"{PREFIX}/command/enrol", json.dumps({"track": "ffff0000", "name": "X"}))
        sub.publish(f"{PREFIX}/command/enrol", json.dumps({"track": "last_unknown"}))  # no name
        assert sub.wait_for(lambda s: len(_results(s)) >= 3, 60), d.log()[-3000:]
        errors = [r["error"] for r in _results(sub)[:3]]
        assert not any(r["ok"] for r in _results(sub)[:3])
        assert "not JSON" in errors[0] and "no kept track" in errors[1], errors
        assert "no name" in errors[2], errors
        assert not (tmp_path / "people.edgal").exists()

        # the text entity's name, echoed retained, then the button
        sub.publish(f"{PREFIX}/command/enrol_name", "Visitor")
        assert sub.wait_for(lambda s: b"Visitor" in s.payloads(f"{PREFIX}/enrol/name"), 30)
        at = len(d.log())
        sub.publish(f"{PREFIX}/command/enrol", json.dumps({"track": "last_unknown"}))
        assert sub.wait_for(lambda s: len(_results(s)) >= 4, 60), d.log()[-3000:]
        ok = _results(sub)[3]
        assert ok["ok"] is True and ok["name"] == "Visitor" and ok["rows_added"] >= 1, ok
        d.wait_log("gallery swap:", 60, after=at)
        assert sub.wait_for(lambda s: any(e.get("name") == "Visitor" and e["type"] == "recognized"
                                          for e in s.json(f"{PREFIX}/events")), 180), \
            d.log()[-3000:]

        # another person's track under the same name: refused by the guard, with its code
        mine = store.find(ok["track"])
        mean = np.mean([f.embedding for f in mine.faces], axis=0)

        def likeness(t):
            return max(float(np.dot(f.embedding, mean)) for f in store.load(t.id).faces)

        assert wait_for(lambda: any(likeness(t) < 0.3 for t in store.list()), 120, step=0.5)
        other = min(store.list(), key=likeness)
        sub.publish(f"{PREFIX}/command/enrol", json.dumps({"track": other.id, "name": "Visitor"}))
        assert sub.wait_for(lambda s: len(_results(s)) >= 5, 60), d.log()[-3000:]
        refused = _results(sub)[4]
        assert refused["ok"] is False and refused["error"] == "refused", refused
        assert [r["code"] for r in refused["refused"]] == ["not_that_person"], refused
        assert "Traceback" not in d.log()
    finally:
        d.kill()
        sub.close()


def test_commands_are_ignored_unless_enabled(public_clip, broker, tmp_path):
    sub = Subscriber(broker.port, [f"{PREFIX}/#", DISCOVERY])
    d = _daemon(tmp_path, public_clip, broker, commands=False)
    try:
        assert sub.wait_for(lambda s: s.payloads(f"{PREFIX}/enrol/last_unknown"), 180), \
            d.log()[-3000:]
        comps = sub.json(DISCOVERY)[-1]["components"]
        assert "edged_door_last_unknown_face" in comps  # the image: keep_faces and snapshots
        assert "edged_door_enrol_last_unknown" not in comps and "edged_door_enrol_name" not in comps
        sub.publish(f"{PREFIX}/command/enrol_name", "Visitor")
        sub.publish(f"{PREFIX}/command/enrol", json.dumps({"track": "last_unknown"}))
        # a round trip of the daemon's own after the commands: they were not acted on
        n = len(sub.payloads(f"{PREFIX}/stats")) + len(sub.payloads(f"{PREFIX}/events"))
        assert sub.wait_for(lambda s: len(s.payloads(f"{PREFIX}/events")) + len(
            s.payloads(f"{PREFIX}/stats")) > n + 2, 60)
        assert not _results(sub) and not sub.payloads(f"{PREFIX}/enrol/name")
        assert not (tmp_path / "people.edgal").exists()
    finally:
        d.kill()
        sub.close()
