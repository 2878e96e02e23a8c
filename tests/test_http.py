"""The HTTP endpoint (edged.publish.http): ``/metrics`` and ``/healthz`` of a real ``edged run``.

- On the public clip (in a loop), with a bearer token: two scrapes parse with
  prometheus_client's own parser and the counters grow; ``/healthz`` is 200 while frames flow;
  no token, a wrong one: 401.
- On a live stream (ffmpeg over loopback), with basic auth: ``/healthz`` 200, 503 naming the
  camera once the stream is frozen (SIGSTOP) past its stall timeout, 200 again once it is back.
- A public address without a token or a password: a configuration error (exit 78).
"""
from __future__ import annotations

import base64
import json
import re
import signal
import subprocess
import urllib.error
import urllib.request

import pytest

from conftest import free_port
from conftest import wait_for as _wait_for
from edged import config
from edged.health import Health, camera_down, stuck_after
from edged_daemon_helpers import EDGED, ROOT, DaemonProcess, build_gallery, write_config
from test_stream_reconnect import StreamServer

TOKEN = "s3cret-token-for-the-test"


def wait_for(cond, timeout: float) -> bool:
    """Poll ``cond`` every 0.1 s (each poll may be a request)."""
    return _wait_for(cond, timeout, step=0.1)


def get(port: int, path: str, auth: str = None):
    """(status, headers, body) of GET http://127.0.0.1:<port><path>; (None, {}, b"") when
    nothing answers yet."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if auth:
        req.add_header("Authorization", auth)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()
    except (urllib.error.URLError, ConnectionError):
        return None, {}, b""


def samples(text: str) -> dict:
    """{(sample name, sorted labels): value} of a scrape, parsed by prometheus_client."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(scrape: dict, name: str, **labels) -> float:
    return scrape.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(scope="module")
def gallery(public_enrol, tmp_path_factory):
    return build_gallery(public_enrol, tmp_path_factory.mktemp("httpgal") / "people.edgal")


def test_metrics_grow_and_healthz_says_healthy(public_clip, gallery, broker, tmp_path):
    port = free_port()
    (tmp_path / "token").write_text(TOKEN + "\n")
    cfg = write_config(
        tmp_path / "config.yaml", device={"name": "metrics"},
        cameras=[{"name": "door", "source": str(public_clip), "loop": True}],
        paths={"gallery": str(gallery), "state_dir": str(tmp_path / "state")},
        mqtt={"host": "127.0.0.1", "port": broker.port},
        http={"listen": f"127.0.0.1:{port}", "token_file": str(tmp_path / "token")},
        logging={"target": "stderr", "level": "info"})
    d = DaemonProcess(cfg, tmp_path)
    auth = f"Bearer {TOKEN}"
    try:
        def scrape():
            code, headers, body = get(port, "/metrics", auth)
            return samples(body.decode()) if code == 200 else {}

        assert wait_for(lambda: value(scrape(), "edged_recognitions_total", camera="door") >= 1,
                        180), d.log()[-3000:]
        code, headers, body = get(port, "/metrics", auth)
        assert code == 200 and headers["Content-Type"].startswith("text/plain"), headers
        first = samples(body.decode())
        assert wait_for(lambda: value(scrape(), "edged_frames_processed_total", camera="door")
                        > value(first, "edged_frames_processed_total", camera="door") + 5, 60)
        second = scrape()
        for name in ("edged_frames_total", "edged_frames_processed_total",
                     "edged_events_total"):
            grown = [k for k in first if k[0] == name and second.get(k, 0) < first[k]]
            assert not grown, grown  # counters never go back
        assert value(second, "edged_frames_total", camera="door") > \
            value(first, "edged_frames_total", camera="door")
        assert value(second, "edged_faces_detected_total", camera="door") > 0
        assert value(second, "edged_embeddings_total") > 0
        assert value(second, "edged_events_total", camera="door", type="face_appeared") >= 1
        assert value(second, "edged_camera_up", camera="door") == 1
        assert value(second, "edged_mqtt_connected") == 1
        assert value(second, "edged_gallery_identities") == 2
        assert value(second, "edged_health_state", state="healthy") == 1
        assert value(second, "process_resident_memory_bytes") > 10e6
        assert value(second, "edged_last_event_timestamp_seconds", camera="door") > 1.7e9
        models = {dict(k[1])["role"] for k in second if k[0] == "edged_model_info"}
        assert models == {"pnet", "rnet", "onet", "embedder"}, models
        for stage in ("capture", "detect", "embed", "match", "track", "publish"):
            n = value(second, "edged_stage_seconds_count", stage=stage)
            assert n > 0 and value(second, "edged_stage_seconds_bucket", stage=stage,
                                   le="+Inf") == n, stage
        assert value(second, "edged_capture_to_event_seconds_count") >= 1
        assert ("edged_spool_events", ()) in second
        # every metric edged exports is documented (docs/metrics.md names each family)
        doc_text = (ROOT / "docs" / "metrics.md").read_text()
        families = {re.sub(r"_(bucket|count|sum|created)$", "", k[0]) for k in second
                    if k[0].startswith("edged_")}
        undocumented = sorted(f for f in families if f"`{f}`" not in doc_text and
                              f"`{f}{{" not in doc_text)
        assert not undocumented, f"not in docs/metrics.md: {undocumented}"

        code, _, body = get(port, "/healthz", auth)
        doc = json.loads(body)
        assert code == 200 and doc["state"] == "healthy" and doc["problems"] == {}, doc
        assert doc["cameras"]["door"]["connected"] is True
        # the status says each camera's event rate and last event (Home Assistant's sensors)
        def door():
            return json.loads((tmp_path / "state" / "status.json").read_text())["cameras"]["door"]

        assert wait_for(lambda: door().get("last_event") and door()["events_per_min"] > 0, 30), \
            door()
        assert door()["last_event"].endswith("Z")

        # a token is required on every path
        assert get(port, "/metrics")[0] == 401
        code, headers, _ = get(port, "/healthz", "Bearer wrong")
        assert code == 401 and headers["WWW-Authenticate"].startswith("Bearer")
        assert get(port, "/nothing", auth)[0] == 404

        # a reload keeps the listener as it is (a restart moves it), and says so
        text = cfg.read_text().replace(f"127.0.0.1:{port}", f"127.0.0.1:{free_port()}")
        cfg.write_text(text)
        mark = len(d.log())
        d.proc.send_signal(signal.SIGHUP)
        d.wait_log("reload: http settings changed; they take effect at the next restart", 120,
                   after=mark)
        d.wait_log("reloaded:", 120, after=mark)
        assert get(port, "/healthz", auth)[0] == 200
        d.terminate(timeout=20)
        assert d.proc.returncode == 0
    finally:
        d.kill()
    log = d.log()
    assert f"http: /metrics and /healthz on 127.0.0.1:{port}" in log and "Traceback" not in log


def test_healthz_names_a_stalled_camera_and_recovers(public_head_clip, tmp_path):
    stream_port, port = free_port(), free_port()
    (tmp_path / "password").write_text("pa55\n")
    servers = [StreamServer(public_head_clip, stream_port, tmp_path / "ffmpeg.log").start()]
    cfg = write_config(
        tmp_path / "config.yaml", device={"name": "live"},
        cameras=[{"name": "net", "source": f"tcp://127.0.0.1:{stream_port}", "stall_timeout": 2,
                  "reconnect_min": 0.2, "reconnect_max": 1.0}],
        paths={"gallery": str(tmp_path / "no-gallery.edgal"), "state_dir": str(tmp_path / "st")},
        mqtt={"enabled": False},
        http={"listen": f"127.0.0.1:{port}", "username": "prom",
              "password_file": str(tmp_path / "password")},
        logging={"target": "stderr"})
    d = DaemonProcess(cfg, tmp_path)
    auth = "Basic " + base64.b64encode(b"prom:pa55").decode()

    def health():
        code, _, body = get(port, "/healthz", auth)
        return code, (json.loads(body) if code in (200, 503) else {})

    try:
        # 503 while it starts (the listener is up before the models load), then 200
        assert wait_for(lambda: health()[0] is not None, 60), d.log()[-3000:]
        assert wait_for(lambda: health()[0] == 200, 120), (health(), d.log()[-3000:])
        assert get(port, "/healthz", "Basic " + base64.b64encode(b"prom:nope").decode())[0] == 401
        servers[0].signal(signal.SIGSTOP)  # frozen: the connection stays open, nothing comes
        assert wait_for(lambda: health()[0] == 503, 30), health()
        code, doc = health()
        assert doc["state"] == "degraded" and "camera:net" in doc["problems"], doc
        assert "camera:net: down: no frame for more than 2 s" in doc["reason"], doc
        assert doc["cameras"]["net"]["connected"] is False
        _, _, body = get(port, "/metrics", auth)
        scrape = samples(body.decode())
        assert value(scrape, "edged_camera_up", camera="net") == 0
        assert value(scrape, "edged_health_problem", problem="camera:net") == 1
        # every camera's series exist from 0: "faces but no recognition" alerts need them
        assert scrape[("edged_recognitions_total", (("camera", "net"),))] == 0
        assert scrape[("edged_events_total", (("camera", "net"), ("type", "recognized")))] == 0
        status = json.loads((tmp_path / "st" / "status.json").read_text())
        assert wait_for(lambda: "camera:net" in json.loads(
            (tmp_path / "st" / "status.json").read_text()).get("problems", {}), 10), status
        servers[0].kill()
        servers.append(StreamServer(public_head_clip, stream_port, tmp_path / "ffmpeg.log").start())
        assert wait_for(lambda: health()[0] == 200, 60), (health(), d.log()[-3000:])
        assert health()[1]["problems"] == {}
        d.terminate(timeout=20)
        assert d.proc.returncode == 0
    finally:
        d.kill()
        for s in servers:
            s.kill()
    log = d.log()
    assert "health: degraded (camera:net: down" in log and "Traceback" not in log


def test_a_public_address_needs_a_token_or_a_password(tmp_path, public_clip):
    port = free_port()
    cfg = write_config(
        tmp_path / "config.yaml",
        cameras=[{"name": "door", "source": str(public_clip)}],
        paths={"state_dir": str(tmp_path / "state")}, mqtt={"enabled": False},
        http={"listen": f"0.0.0.0:{port}"}, logging={"target": "stderr"})
    r = subprocess.run([EDGED, "run", "--config", str(cfg)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 78, r.stdout + r.stderr
    assert f"http.listen: '0.0.0.0:{port}' is not a loopback address" in r.stderr, r.stderr
    assert get(port, "/healthz")[0] is None  # nothing was bound


def _errors(text: str) -> str:
    try:
        config.loads("cameras: [{name: a, source: /dev/video0}]\n" + text)
    except config.ConfigError as exc:
        return str(exc)
    return ""


def test_http_settings_are_checked(tmp_path):
    assert _errors("") == ""  # off by default
    assert _errors("http: {listen: '127.0.0.1:9108'}\n") == ""
    assert _errors("http: {listen: '[::1]:9108'}\n") == ""
    assert _errors("http: {listen: 'localhost:9108'}\n") == ""
    assert _errors("http: {listen: ':9108', allow_unauthenticated: true}\n") == ""
    assert "not a loopback address" in _errors("http: {listen: ':9108'}\n")
    assert "not a loopback address" in _errors("http: {listen: 'board.lan:9108'}\n")
    assert "expected host:port" in _errors("http: {listen: '127.0.0.1'}\n")
    assert "expected host:port" in _errors("http: {listen: '127.0.0.1:0'}\n")
    missing = tmp_path / "nope"
    err = _errors(f"http: {{listen: '0.0.0.0:9108', token_file: '{missing}'}}\n")
    assert f"http.token_file: cannot read '{missing}'" in err, err
    (tmp_path / "empty").write_text("\n")
    err = _errors(f"http: {{listen: '0.0.0.0:9108', token_file: '{tmp_path / 'empty'}'}}\n")
    assert "is empty" in err, err
    (tmp_path / "t").write_text("x\n")
    err = _errors(f"http: {{listen: '0.0.0.0:9108', token_file: '{tmp_path / 't'}', "
                  f"username: u}}\n")
    assert "use one of them" in err and "username and password_file go together" in err, err
    assert _errors(f"http: {{listen: '0.0.0.0:9108', token_file: '{tmp_path / 't'}'}}\n") == ""


def test_the_health_names_a_camera_down_and_a_stuck_pipeline():
    # a camera is down once it is not connected and silent past its stall timeout
    assert camera_down(False, False, 5.1, 5.0) == "down: no frame for more than 5 s"
    assert camera_down(False, False, 4.9, 5.0) is None  # (reconnecting, within the timeout)
    assert camera_down(True, False, 60.0, 5.0) is None  # a file waiting for a slow pipeline
    assert camera_down(False, True, 60.0, 5.0) is None  # a file that ended
    h = Health()
    h.phase = "running"
    assert h.problems_under("camera:", {"a": "down", "b": None}) is True
    assert h.state == "degraded" and "camera:a: down" in h.describe()
    assert h.problems_under("camera:", {"a": "down"}) is False  # unchanged: no republishing
    assert h.problems_under("camera:", {}) is True and h.state == "healthy"  # camera removed
    # stuck: frames come in and none goes through for longer than stuck_after()
    after = stuck_after([2.0, 20.0])
    assert after == 60.0 and stuck_after([]) == 30.0
    assert h.pipeline_stuck(7, True, 100.0, after) is None
    assert h.pipeline_stuck(7, True, 160.0, after) is None
    assert "no frame through the pipeline" in h.pipeline_stuck(7, True, 160.5, after)
    assert h.pipeline_stuck(8, True, 161.0, after) is None  # a frame went through
    assert h.pipeline_stuck(8, False, 300.0, after) is None  # no camera connected: not stuck
