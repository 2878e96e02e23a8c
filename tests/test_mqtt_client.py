"""The paho client wrapper against a real mosquitto: protocols, TLS, passwords, broker down."""
from __future__ import annotations

import logging
import re
import subprocess
import threading
from pathlib import Path

import pytest

from edged.publish.mqtt import (MqttClient, MqttConfigError, MqttSettings, TlsSettings,
                        resolve_password)
from mqtt_producer import Subscriber, make_ca, wait_until


def fast(**kw) -> MqttSettings:
    kw.setdefault("reconnect_min_s", 0.2)
    kw.setdefault("reconnect_max_s", 0.5)
    kw.setdefault("keepalive", 5)
    return MqttSettings(**kw)


def client(settings, device="dev1") -> MqttClient:
    got = []
    c = MqttClient(settings, device, "edged/dev1/availability",
                   on_puback=lambda mid, ok, reason: got.append((mid, ok)))
    c.acks = got
    return c


def close(c: MqttClient):
    c.disconnect()
    c.stop()


DOC = Path(__file__).resolve().parents[1] / "docs" / "mqtt.md"


def documented(message: str) -> bool:
    """Whether a log line of edged.mqtt is one of docs/mqtt.md's Troubleshooting rows (H:P a
    host and port, N a number, … anything)."""
    rows = DOC.read_text().split("## Troubleshooting", 1)[1].splitlines()
    for row in rows:
        m = re.match(r"\| `([^`]+)`", row)
        if not m:
            continue
        pattern = re.escape(m.group(1)).replace("H:P", r"[\w.]+:\d+").replace("…", ".*")
        if re.match(re.sub(r"\bN\b", r"\\d+", pattern), message):
            return True
    return False


def mqtt_log_lines(caplog) -> list:
    return [r.getMessage() for r in caplog.records
            if r.name == "edged.mqtt" and r.levelno >= logging.WARNING]


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_protocols_publish_qos1_with_puback(broker, protocol):
    sub = Subscriber(broker.port, "t/#")
    c = client(fast(port=broker.port, protocol=protocol))
    c.start()
    try:
        assert wait_until(lambda: c.connected)
        assert threading.current_thread().name not in [t.name for t in threading.enumerate()
                                                       if t.name.startswith("paho-mqtt-client-edged-dev1")]
        assert any(t.name == "paho-mqtt-client-edged-dev1" for t in threading.enumerate())
        mid = c.publish("t/x", b"hello", qos=1)
        assert wait_until(lambda: (mid, True) in c.acks)
        assert sub.wait_for(lambda s: s.payloads("t/x") == [b"hello"])
    finally:
        close(c)
        sub.close()


def test_broker_down_at_start_is_not_a_failure(broker_factory, caplog):
    b = broker_factory()
    c = client(fast(port=b.port))
    with caplog.at_level(logging.WARNING, "edged.mqtt"):
        c.start()  # nothing listens yet
        try:
            assert wait_until(lambda: c.attempts >= 2, 10)
            assert not c.connected
            assert f"broker 127.0.0.1:{b.port} refused the connection (not running?)" in caplog.text
            b.start()
            assert wait_until(lambda: c.connected, 10)
            assert "connected to" in caplog.text and "failed attempt(s)" in caplog.text
        finally:
            close(c)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    return make_ca(d / "good", "ca"), make_ca(d / "other", "other")


def tls_broker(broker_factory, pki, require_cert=False):
    good, _ = pki
    conf = (f"cafile {good['ca']}\ncertfile {good['server_cert']}\nkeyfile {good['server_key']}\n"
            "user root\n")
    if require_cert:
        conf += "require_certificate true\n"
    return broker_factory(conf).start()


def test_tls_with_a_ca_made_here(broker_factory, pki):
    good, _ = pki
    b = tls_broker(broker_factory, pki)
    c = client(fast(port=b.port, tls=TlsSettings(enabled=True, ca_file=str(good["ca"]))))
    c.start()
    try:
        assert wait_until(lambda: c.connected, 10), c.last_error
        mid = c.publish("t/tls", b"x", qos=1)
        assert wait_until(lambda: (mid, True) in c.acks)
    finally:
        close(c)


def test_tls_client_certificate(broker_factory, pki):
    good, _ = pki
    b = tls_broker(broker_factory, pki, require_cert=True)
    no_cert = client(fast(port=b.port, tls=TlsSettings(enabled=True, ca_file=str(good["ca"]))))
    with_cert = client(fast(port=b.port, tls=TlsSettings(
        enabled=True, ca_file=str(good["ca"]), cert_file=str(good["client_cert"]),
        key_file=str(good["client_key"]))), device="dev2")
    no_cert.start()
    with_cert.start()
    try:
        assert wait_until(lambda: with_cert.connected, 10), with_cert.last_error
        assert wait_until(lambda: no_cert.attempts >= 2, 10)
        assert not no_cert.connected
        assert documented("MQTT: " + no_cert.last_error), no_cert.last_error
    finally:
        close(no_cert)
        close(with_cert)


def test_tls_wrong_ca_is_refused_with_a_clear_log_line(broker_factory, pki, caplog):
    _, other = pki
    b = tls_broker(broker_factory, pki)
    c = client(fast(port=b.port, tls=TlsSettings(enabled=True, ca_file=str(other["ca"]))))
    with caplog.at_level(logging.WARNING, "edged.mqtt"):
        c.start()
        try:
            assert wait_until(lambda: c.attempts >= 2, 10)  # and it keeps trying
            assert not c.connected
        finally:
            close(c)
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert errors, caplog.text
    msg = errors[0].getMessage()
    assert f"TLS: certificate verify failed for broker 127.0.0.1:{b.port}: " in msg
    assert "self-signed certificate" in msg or "unable to get local issuer" in msg
    assert "check mqtt.tls.ca_file" in msg
    assert all(documented(m) for m in mqtt_log_lines(caplog)), mqtt_log_lines(caplog)


def test_tls_hostname_check(broker_factory, pki, caplog):
    """The certificate names 127.0.0.1 and localhost: 127.0.0.2 is refused unless unchecked."""
    from conftest import free_port, wait_port

    good, _ = pki
    port = free_port()
    broker_factory(f"listener {port} 127.0.0.2\ncafile {good['ca']}\n"
                   f"certfile {good['server_cert']}\nkeyfile {good['server_key']}\n"
                   "user root\n").start()
    wait_port(port, host="127.0.0.2")
    tls = dict(enabled=True, ca_file=str(good["ca"]))
    strict = client(fast(host="127.0.0.2", port=port, tls=TlsSettings(**tls)))
    loose = client(fast(host="127.0.0.2", port=port,
                        tls=TlsSettings(check_hostname=False, **tls)), device="dev2")
    with caplog.at_level(logging.WARNING, "edged.mqtt"):
        strict.start()
        loose.start()
        try:
            assert wait_until(lambda: loose.connected, 10), loose.last_error
            assert wait_until(lambda: strict.attempts >= 1, 10)
            assert not strict.connected
        finally:
            close(strict)
            close(loose)
    assert "mismatch" in caplog.text and "mqtt.tls.check_hostname" in caplog.text
    assert all(documented(m) for m in mqtt_log_lines(caplog)), mqtt_log_lines(caplog)


def test_tls_to_a_plain_port_and_plain_to_a_tls_port_are_logged_as_documented(
        broker_factory, pki, caplog):
    good, _ = pki
    plain = broker_factory().start()
    tls = tls_broker(broker_factory, pki)
    tls_to_plain = client(fast(port=plain.port, tls=TlsSettings(enabled=True,
                                                                ca_file=str(good["ca"]))))
    plain_to_tls = client(fast(port=tls.port), device="dev2")
    with caplog.at_level(logging.WARNING, "edged.mqtt"):
        tls_to_plain.start()
        plain_to_tls.start()
        try:
            assert wait_until(lambda: tls_to_plain.attempts >= 2 and plain_to_tls.attempts >= 2)
        finally:
            close(tls_to_plain)
            close(plain_to_tls)
    assert tls_to_plain.last_error.startswith(f"TLS handshake with 127.0.0.1:{plain.port} "
                                              f"failed: ")
    assert tls_to_plain.last_error.endswith("(is the port TLS?)")
    assert plain_to_tls.last_error.startswith(f"broker 127.0.0.1:{tls.port} closed the "
                                              f"connection before accepting it")
    assert plain_to_tls.last_error.endswith("; is the port TLS (mqtt.tls.enabled)?")
    lines = mqtt_log_lines(caplog)
    assert len(lines) >= 4 and all(documented(m) for m in lines), lines


@pytest.fixture
def pw_broker(broker_factory, tmp_path):
    pw = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(pw), "edged", "s3cret"], check=True)
    return broker_factory(f"allow_anonymous false\npassword_file {pw}\nuser root\n").start()


def test_password_from_file_and_env(pw_broker, tmp_path, monkeypatch):
    f = tmp_path / "mqtt.pass"
    f.write_text("s3cret\n")
    monkeypatch.setenv("EDGED_TEST_MQTT_PW", "s3cret")
    a = client(fast(port=pw_broker.port, username="edged", password_file=str(f)))
    e = client(fast(port=pw_broker.port, username="edged", password_env="EDGED_TEST_MQTT_PW",
                    protocol="3.1.1"), device="dev2")
    a.start()
    e.start()
    try:
        assert wait_until(lambda: a.connected and e.connected, 10), (a.last_error, e.last_error)
    finally:
        close(a)
        close(e)


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_wrong_password_is_reported_and_retried(pw_broker, tmp_path, caplog, protocol):
    f = tmp_path / "mqtt.pass"
    f.write_text("wrong\n")
    c = client(fast(port=pw_broker.port, username="edged", password_file=str(f),
                    protocol=protocol))
    with caplog.at_level(logging.WARNING, "edged.mqtt"):
        c.start()
        try:
            assert wait_until(lambda: c.attempts >= 3, 15), caplog.text  # keeps retrying
            assert not c.connected
        finally:
            close(c)
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors
    assert f"broker 127.0.0.1:{pw_broker.port} refused the connection" in errors[0]
    assert ("user 'edged'; check mqtt.username and mqtt.password_file" in errors[0]), errors[0]
    assert "retrying (attempt 3)" in caplog.text


def test_bad_credentials_settings_fail_clearly(tmp_path, monkeypatch):
    with pytest.raises(MqttConfigError, match=r"mqtt\.password_file: cannot read '.*nope'"):
        resolve_password(MqttSettings(username="u", password_file=str(tmp_path / "nope")))
    (tmp_path / "empty").write_text("")
    with pytest.raises(MqttConfigError, match=r"mqtt\.password_file: '.*empty' is empty"):
        resolve_password(MqttSettings(username="u", password_file=str(tmp_path / "empty")))
    monkeypatch.delenv("EDGED_NO_SUCH_VAR", raising=False)
    with pytest.raises(MqttConfigError, match=r"mqtt\.password_env: environment variable "
                                              r"'EDGED_NO_SUCH_VAR' is not set"):
        resolve_password(MqttSettings(username="u", password_env="EDGED_NO_SUCH_VAR"))
    with pytest.raises(MqttConfigError, match="both set"):
        resolve_password(MqttSettings(username="u", password_env="X", password_file="y"))
    monkeypatch.setenv("EDGED_TEST_PW", "p")
    with pytest.raises(MqttConfigError, match="mqtt.username: a password is configured"):
        MqttClient(MqttSettings(password_env="EDGED_TEST_PW"), "d", "t")


def test_a_missing_tls_file_is_a_configuration_error_worded_as_documented(tmp_path):
    """check-config and the daemon's start both load the configuration: a CA file that does
    not exist is refused there, with the line docs/mqtt.md shows."""
    from edged import config

    def load(tls: str):
        with pytest.raises(config.ConfigError) as e:
            config.loads("cameras:\n  - name: door\n    source: /dev/video0\n"
                         f"mqtt:\n  tls:\n{tls}", source="c.yaml")
        return e.value.errors

    assert "mqtt.tls.ca_file: no such file '/etc/edged/ca.pem'" in DOC.read_text()
    errors = load("    enabled: true\n    ca_file: /etc/edged/ca.pem\n")
    assert errors == ["c.yaml:7: mqtt.tls.ca_file: no such file '/etc/edged/ca.pem'"]
    errors = load(f"    enabled: true\n    ca_file: {tmp_path}\n")
    assert errors == [f"c.yaml:7: mqtt.tls.ca_file: '{tmp_path}' is not a file"]
    # TLS off: the files are not used, so not checked
    assert not config.loads("cameras:\n  - name: door\n    source: /dev/video0\n"
                            "mqtt:\n  tls:\n    ca_file: /etc/edged/ca.pem\n").mqtt.tls.enabled


def test_bad_tls_settings_fail_clearly(tmp_path):
    with pytest.raises(MqttConfigError, match=r"mqtt\.tls\.ca_file: no such file"):
        MqttClient(MqttSettings(tls=TlsSettings(enabled=True, ca_file=str(tmp_path / "x.pem"))),
                   "d", "t")
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(MqttConfigError, match=r"mqtt\.tls\.ca_file: '.*junk.pem' is not a PEM"):
        MqttClient(MqttSettings(tls=TlsSettings(enabled=True, ca_file=str(junk))), "d", "t")
    with pytest.raises(MqttConfigError, match="cert_file and mqtt.tls.key_file go together"):
        MqttClient(MqttSettings(tls=TlsSettings(enabled=True, cert_file=str(junk))), "d", "t")


def test_config_tree_checks_mqtt_settings():
    """Through the generic loader: types, ranges, choices and the cross-field checks."""
    from edged import config

    def errors(data):
        with pytest.raises(config.ConfigError) as e:
            config.build(MqttSettings, data, source="c.yaml")
        return "\n".join(e.value.errors)

    assert config.build(MqttSettings, {"protocol": "3.1.1", "spool": {"fsync": "full"}}
                        ).spool.fsync == "full"
    assert "port: expected an integer in [1, 65535], got 0" in errors({"port": 0})
    assert "protocol: expected a string, got 5" in errors({"protocol": 5})
    assert "spool.fsync: expected one of off, normal, full; got 'sometimes'" in errors(
        {"spool": {"fsync": "sometimes"}})
    assert "snapshot_encoding" in errors({"snapshot_encoding": "png"})
    assert "reconnect_min_s: 90.0 is more than reconnect_max_s (60.0)" in errors(
        {"reconnect_min_s": 90})
    assert "username: a password is configured but no username" in errors(
        {"password_env": "X"})
    assert "password_env: password_file is set too" in errors(
        {"username": "u", "password_env": "X", "password_file": "/f"})
    assert "tls.key_file: cert_file and key_file go together" in errors(
        {"tls": {"cert_file": "/c"}})


def test_docs_config_block_is_the_defaults():
    """docs/mqtt.md shows the mqtt: defaults; keep it in step with the dataclasses."""
    import re
    from pathlib import Path

    from edged import config

    text = (Path(__file__).resolve().parents[1] / "docs" / "mqtt.md").read_text()
    block = re.search(r"```yaml\n(device:.*?)```", text, re.S).group(1)
    cfg = config.loads(block + "cameras:\n  - name: door\n    source: /dev/video0\n")
    assert cfg.mqtt == MqttSettings()
