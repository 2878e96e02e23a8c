"""Home Assistant device discovery: schema keys, birth-message republish, people changes."""
from __future__ import annotations

import json
import time

from edged.publish.hass import HassDiscovery, build_discovery, discovery_topic
from edged.publish.mqtt import HassSettings, MqttSettings
from edged.publish.publisher import Publisher
from mqtt_producer import Subscriber, wait_until

PREFIX = "edged/testcam"
DISCOVERY = "homeassistant/device/edged_testcam/config"


def validate(doc: dict) -> None:
    """The documented schema (docs/mqtt.md, "Home Assistant")."""
    assert set(doc) >= {"device", "origin", "availability", "components"}
    assert doc["device"]["identifiers"] == ["edged_testcam"]
    assert doc["device"]["name"] == "testcam"
    assert doc["availability"] == [{
        "topic": f"{PREFIX}/availability",
        "value_template": "{{ 'online' if value == 'online' else 'offline' }}"}]
    seen = set()
    for cid, comp in doc["components"].items():
        assert comp["platform"] in ("binary_sensor", "sensor", "event"), cid
        if set(comp) == {"platform"}:
            continue  # removal
        for key in ("unique_id", "state_topic", "name"):
            assert key in comp, f"{cid} has no {key}"
        assert comp["unique_id"] == cid and cid not in seen
        seen.add(cid)
        assert comp["state_topic"].startswith(PREFIX + "/")
    assert HassDiscovery.validate(doc) is None


def test_payload_schema_offline():
    doc = build_discovery("testcam", PREFIX, ["alice", "Bob Smith"], ["door", "yard"])
    validate(doc)
    comps = doc["components"]
    alice = comps["edged_testcam_person_alice"]
    assert alice["device_class"] == "presence" and alice["state_topic"] == f"{PREFIX}/person/alice"
    assert comps["edged_testcam_person_bob_smith"]["state_topic"] == f"{PREFIX}/person/Bob_Smith"
    event = comps["edged_testcam_recognition"]
    assert event["platform"] == "event" and "recognized" in event["event_types"]
    assert event["state_topic"] == f"{PREFIX}/events"
    fps = comps["edged_testcam_fps_door"]
    assert fps["state_topic"] == f"{PREFIX}/stats" and fps["unit_of_measurement"] == "fps"
    assert "cameras['door'].fps" in fps["value_template"]
    assert discovery_topic("homeassistant", "testcam") == DISCOVERY
    assert HassDiscovery.validate({"device": {}}) == "missing root key 'origin'"


def test_each_camera_has_its_connectivity_event_rate_and_last_event():
    """Camera health from the retained status (cameras.<camera>: connected, events_per_min,
    last_event, as the daemon's camera_status() writes them)."""
    comps = build_discovery("testcam", PREFIX, [], ["door", "yard"])["components"]
    for cam in ("door", "yard"):
        up = comps[f"edged_testcam_camera_{cam}"]
        assert up["platform"] == "binary_sensor" and up["device_class"] == "connectivity"
        assert up["state_topic"] == up["json_attributes_topic"] == f"{PREFIX}/status"
        assert up["value_template"] == (f"{{{{ 'ON' if value_json.cameras['{cam}'].connected "
                                        f"| default(false) else 'OFF' }}}}")
        assert f"value_json.cameras['{cam}'] | default({{}}) | to_json" in \
            up["json_attributes_template"]
        rate = comps[f"edged_testcam_event_rate_{cam}"]
        assert rate["platform"] == "sensor" and rate["state_topic"] == f"{PREFIX}/status"
        assert rate["unit_of_measurement"] == "events/min" and rate["state_class"] == "measurement"
        assert f"cameras['{cam}'].events_per_min" in rate["value_template"]
        last = comps[f"edged_testcam_last_event_{cam}"]
        assert last["device_class"] == "timestamp" and last["state_topic"] == f"{PREFIX}/status"
        # no event yet: null, which Home Assistant shows as unknown (not an invalid timestamp)
        assert "last_event | default(None)" in last["value_template"]
        assert "unit_of_measurement" not in last and "state_class" not in last
    assert len({c["name"] for c in comps.values()}) == len(comps)  # no two entities alike


def test_discovery_published_and_republished_on_birth(broker, tmp_path):
    sub = Subscriber(broker.port, ["homeassistant/#"])
    p = Publisher(MqttSettings(port=broker.port, reconnect_min_s=0.2, reconnect_max_s=1.0),
                  "testcam", tmp_path / "state", people=["alice", "bob"])
    p.start()
    try:
        p.update_status(cameras={"door": {"connected": True}})
        assert sub.wait_for(lambda s: any("edged_testcam_fps_door" in d["components"]
                                          for d in s.json(DISCOVERY)), 10)
        doc = sub.json(DISCOVERY)[-1]
        validate(doc)
        assert {"edged_testcam_person_alice", "edged_testcam_person_bob",
                "edged_testcam_recognition", "edged_testcam_fps_door",
                "edged_testcam_spool_depth", "edged_testcam_camera_door",
                "edged_testcam_event_rate_door", "edged_testcam_last_event_door"} \
            <= set(doc["components"])
        n = len(sub.payloads(DISCOVERY))
        time.sleep(0.5)
        assert len(sub.payloads(DISCOVERY)) == n  # nothing more unless asked

        # Home Assistant restarts: its birth message makes edged announce itself again
        sub.publish("homeassistant/status", "online")
        assert sub.wait_for(lambda s: len(s.payloads(DISCOVERY)) == n + 1, 10)
        validate(sub.json(DISCOVERY)[-1])
        sub.publish("homeassistant/status", "offline")  # HA's last will: nothing to do
        time.sleep(0.5)
        assert len(sub.payloads(DISCOVERY)) == n + 1

        # bob leaves the gallery: his entity is removed (platform only), alice stays
        p.set_people(["alice"])
        assert sub.wait_for(lambda s: len(s.payloads(DISCOVERY)) == n + 2, 10)
        doc = sub.json(DISCOVERY)[-1]
        validate(doc)
        assert doc["components"]["edged_testcam_person_bob"] == {"platform": "binary_sensor"}
        assert "unique_id" in doc["components"]["edged_testcam_person_alice"]
    finally:
        p.stop()
        sub.close()
    # retained: a Home Assistant that starts later finds it
    late = Subscriber(broker.port, DISCOVERY)
    try:
        assert late.wait_for(lambda s: s.json(DISCOVERY), 5)
        assert late.msgs[0][2] is True
        comps = late.json(DISCOVERY)[0]["components"]
        assert comps.get("edged_testcam_person_bob", {"platform": "x"}).keys() == {"platform"}
    finally:
        late.close()


def test_discovery_off_and_custom_prefix(broker, tmp_path):
    sub = Subscriber(broker.port, ["homeassistant/#", "ha/#"])
    off = Publisher(MqttSettings(port=broker.port, homeassistant=HassSettings(enabled=False)),
                    "testcam", tmp_path / "a")
    custom = Publisher(MqttSettings(port=broker.port, client_id="other",
                                    homeassistant=HassSettings(discovery_prefix="ha")),
                       "cam2", tmp_path / "b", people=["alice"])
    off.start()
    custom.start()
    try:
        assert wait_until(lambda: off.connected and custom.connected)
        assert sub.wait_for(lambda s: s.json("ha/device/edged_cam2/config"), 10)
        time.sleep(0.5)
        assert not [t for t, _, _ in sub.msgs if t.startswith("homeassistant/")]
        doc = sub.json("ha/device/edged_cam2/config")[0]
        assert json.dumps(doc).count("edged/cam2/") >= 3
    finally:
        off.stop()
        custom.stop()
        sub.close()


def test_names_in_other_scripts_keep_topics_and_entities_of_their_own():
    """Names that differ only in characters outside ASCII get distinct topics (UTF-8 levels)
    and distinct Home Assistant ids (a short hash of the name)."""
    people = ["王伟", "李娜", "Σοφία", "Ελένη", "alice"]
    doc = build_discovery("testcam", PREFIX, people, ["door"])
    validate(doc)
    persons = {c["name"]: (cid, c["state_topic"]) for cid, c in doc["components"].items()
               if c.get("device_class") == "presence"}
    assert len(persons) == 5
    assert len({cid for cid, _ in persons.values()}) == 5
    assert len({t for _, t in persons.values()}) == 5
    assert persons["王伟 present"][1] == f"{PREFIX}/person/王伟"
    assert persons["alice present"][0] == "edged_testcam_person_alice"  # ASCII names as before
    for cid, _ in persons.values():
        assert cid.isascii() and all(ch.isalnum() or ch in "_-" for ch in cid), cid


def test_a_person_removed_while_edged_was_stopped_is_removed_in_home_assistant(tmp_path,
                                                                                caplog):
    """What was announced is kept in the state directory: after a restart with bob gone from
    the gallery, the discovery payload removes his entity instead of leaving an orphan."""
    import logging

    state = tmp_path / "hass-discovery.json"
    first = HassDiscovery("testcam", PREFIX, "homeassistant", state_file=state)
    first.payload(["alice", "bob"], ["door"])
    assert "edged_testcam_person_bob" in json.loads(state.read_text())["components"]
    again = HassDiscovery("testcam", PREFIX, "homeassistant", state_file=state)  # a restart
    doc = again.payload(["alice"], ["door"])
    validate(doc)
    assert doc["components"]["edged_testcam_person_bob"] == {"platform": "binary_sensor"}
    assert "edged_testcam_person_bob" not in json.loads(state.read_text())["components"]
    state.write_text("{broken")
    with caplog.at_level(logging.WARNING, logger="edged.hass"):
        third = HassDiscovery("testcam", PREFIX, "homeassistant", state_file=state)
    assert f"cannot read {state}" in caplog.text
    validate(third.payload(["alice"], ["door"]))
    assert json.loads(state.read_text())["components"]["edged_testcam_person_alice"] == \
        "binary_sensor"


def ha_template_errors(msgs) -> list:
    """Replay what a Home Assistant subscribed to everything receives, in order: every
    message on the state topic of a live presence entity (announced, not removed) must be a
    JSON object with ``present``, else its value_template fails (``'value_json' is undefined``)."""
    live, errors = {}, []  # state topic -> component id
    for topic, payload, _ in msgs:
        if topic == DISCOVERY and payload:
            live = {c["state_topic"]: cid for cid, c in json.loads(payload)["components"].items()
                    if c.get("device_class") == "presence"}
        elif topic in live:
            try:
                ok = "present" in json.loads(payload)
            except ValueError:
                ok = False
            if not ok:
                errors.append(f"{live[topic]} got {payload!r} on {topic}")
    return errors


def test_a_removed_person_is_removed_in_home_assistant_before_the_presence_is_cleared(
        broker, tmp_path):
    sub = Subscriber(broker.port, ["homeassistant/#", f"{PREFIX}/person/#"])
    p = Publisher(MqttSettings(port=broker.port, reconnect_min_s=0.2, reconnect_max_s=1.0),
                  "testcam", tmp_path / "state", people=["alice", "bob", "carol"])
    p.start()
    try:
        assert sub.wait_for(lambda s: s.json(f"{PREFIX}/person/bob") and any(
            "edged_testcam_person_bob" in d["components"] for d in s.json(DISCOVERY)), 10)
        p.set_people(["alice"])  # bob and carol leave the gallery

        def removed(s):
            return [i for i, (t, pl, _) in enumerate(s.msgs) if t == DISCOVERY and json.loads(
                pl)["components"].get("edged_testcam_person_bob") == {"platform": "binary_sensor"}]

        assert sub.wait_for(lambda s: removed(s) and all(
            s.payloads(f"{PREFIX}/person/{n}")[-1:] == [b""] for n in ("bob", "carol")), 10)
        cleared = [t for t, pl, _ in sub.msgs[removed(sub)[0]:] if pl == b""]
        assert sorted(cleared) == [f"{PREFIX}/person/bob", f"{PREFIX}/person/carol"]
        assert ha_template_errors(sub.msgs) == []
    finally:
        p.stop()
        sub.close()
