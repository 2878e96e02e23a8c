"""The antispoof model is part of the set (issue 23): dropped over the air into a running
daemon with liveness on, it is self-tested, swapped in, confirmed, kept for the next start and
named in the events' versions; a broken one is refused by its self-test; with liveness off a
drop of it is refused with the reason (the daemon runs none)."""
from __future__ import annotations

import json

from edged.runtime import modelstore
from edged_daemon_helpers import DaemonProcess, build_gallery, write_config
from test_ota import StatusWatch, poison, reencode, write_drop

ANTISPOOF = "face_antispoofing.tflite"


def _device(tmp_path, models_dir, clip, enrol, broker, liveness: bool):
    mdir = tmp_path / "models"
    mdir.mkdir()
    for f in models_dir.iterdir():
        if f.suffix == ".tflite":
            (mdir / f.name).write_bytes(f.read_bytes())
    gallery = build_gallery(enrol, tmp_path / "people.edgal")
    cfg = write_config(
        tmp_path / "config.yaml", device={"name": "live"},
        cameras=[{"name": "door", "source": str(clip), "loop": True, "realtime": False,
                  "fps_limit": 20}],
        paths={"models_dir": str(mdir), "gallery": str(gallery),
               "state_dir": str(tmp_path / "state")},
        liveness={"enabled": liveness}, mqtt={"host": "127.0.0.1", "port": broker.port},
        logging={"target": "stderr", "level": "info"})
    return cfg, mdir


def test_an_antispoof_drop_goes_into_service_and_a_broken_one_is_refused(
        public_clip, public_enrol, models_dir, broker, tmp_path):
    cfg, mdir = _device(tmp_path, models_dir, public_clip, public_enrol, broker, liveness=True)
    original = (models_dir / ANTISPOOF).read_bytes()
    watch = StatusWatch(broker.port, "edged/live")
    d = DaemonProcess(cfg, tmp_path)
    try:
        d.wait_log("ready", 120)
        st = watch.wait(lambda s: s["versions"]["antispoof"], 60, "the antispoof in service")
        assert st["versions"]["antispoof"] == modelstore.sha256_bytes(original)

        # a broken model (NaN weights): refused by the self-test, nothing changes
        write_drop(mdir, [("antispoof", "antispoof-nan.tflite", poison(original))], "as-nan")
        st = watch.handled(1, 120)
        assert "self-test as antispoof" in st["last_rejected_drop"]["why"], st
        assert "non-finite" in st["last_rejected_drop"]["why"], st
        assert st["versions"]["antispoof"] == modelstore.sha256_bytes(original)

        # a good one: swapped in, confirmed, in the events' versions
        new = reencode(original, 11)
        sha = modelstore.sha256_bytes(new)
        write_drop(mdir, [("antispoof", "antispoof-v2.tflite", new)], "as-v2")
        st = watch.wait(lambda s: s["last_swap"]["new"].get("antispoof") == sha
                        and s["last_swap"]["confirmed"] is True, 180, "the new antispoof confirmed")
        assert st["versions"]["antispoof"] == sha
        at = len(d.events())
        assert watch.wait(lambda s: len(d.events()) > at + 2, 120, "events after the swap")
        assert [e["versions"]["antispoof"] for e in d.events()[-1:]] == [sha]
        assert "Traceback" not in d.log()
        d.terminate()

        # kept with the set: the next start runs it (checked by sha256)
        kept = json.loads((tmp_path / "state" / "models" / "in-service.json").read_text())
        assert sha in {m["sha256"] for m in kept["models"] if m["role"] == "antispoof"}
        again = tmp_path / "again"
        again.mkdir()
        d = DaemonProcess(cfg, again)
        d.wait_log("ready", 120)
        assert "the set last in service" in d.log()
        st = watch.wait(lambda s: s["versions"]["antispoof"] == sha and s.get("state") != "stopped",
                        60, "the kept antispoof after a restart")
    finally:
        d.kill()
        watch.close()


def test_an_antispoof_drop_with_liveness_off_is_refused_with_the_reason(
        public_clip, public_enrol, models_dir, broker, tmp_path):
    cfg, mdir = _device(tmp_path, models_dir, public_clip, public_enrol, broker, liveness=False)
    new = reencode((models_dir / ANTISPOOF).read_bytes(), 3)
    watch = StatusWatch(broker.port, "edged/live")
    d = DaemonProcess(cfg, tmp_path)
    try:
        d.wait_log("ready", 120)
        write_drop(mdir, [("antispoof", "antispoof-v2.tflite", new)], "as-v2")
        st = watch.handled(1, 120)
        why = st["last_rejected_drop"]["why"]
        assert "liveness.enabled is false" in why and "antispoof" in why, st
        assert "antispoof" not in st["versions"]
        assert "Traceback" not in d.log()
    finally:
        d.kill()
        watch.close()
