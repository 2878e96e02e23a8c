"""MQTT settings and a thin wrapper around the paho-mqtt 2 client.

The settings are plain dataclasses (the ``mqtt:`` part of the config tree); the loader in
:mod:`edged.config` checks their types and the ``min``/``max``/``choices`` metadata.

:class:`MqttClient` owns one ``paho.mqtt.client.Client`` (callback API version 2, MQTT 3.1.1
or 5) running in paho's own network thread (``loop_start()``).  A broker that is down, refuses
the password or fails the TLS handshake is *not* an error here: the failure is logged with its
cause and paho keeps reconnecting with exponential backoff between ``reconnect_min_s`` and
``reconnect_max_s``.  Settings that can never work (a password file that cannot be read, a
CA file that does not exist) raise :class:`MqttConfigError` naming the key.

The store-and-forward logic, the topics and the payloads live in :mod:`edged.publish`.
"""
import hashlib
import logging
import os
import re
import ssl
import sys
from dataclasses import dataclass, field
from typing import Callable, Optional

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

log = logging.getLogger("edged.mqtt")

MiB = 1024 * 1024
DAY = 86400.0


@dataclass
class TlsSettings:
    enabled: bool = field(default=False, metadata={
        "help": "connect with TLS (usually port 8883)"})
    ca_file: Optional[str] = field(default=None, metadata={
        "help": "PEM file of the CA(s) that signed the broker's certificate; "
                "unset: the system's trusted CAs"})
    cert_file: Optional[str] = field(default=None, metadata={
        "help": "PEM client certificate, for brokers that require one (needs key_file)"})
    key_file: Optional[str] = field(default=None, metadata={
        "help": "PEM private key of cert_file (unencrypted)"})
    check_hostname: bool = field(default=True, metadata={
        "help": "check that the broker's certificate names `host`; turn off only for a "
                "broker reached by an address its certificate does not list"})


@dataclass
class SpoolSettings:
    max_events: int = field(default=100000, metadata={
        "min": 10, "help": "most events kept while the broker is unreachable; beyond it the "
                           "oldest are dropped and counted"})
    max_bytes: int = field(default=64 * MiB, metadata={
        "min": 65536, "help": "most bytes of event payloads kept in the spool"})
    max_age_s: float = field(default=7 * DAY, metadata={
        "min": 60, "help": "events older than this are dropped from the spool (seconds)"})
    fsync: str = field(default="normal", metadata={
        "choices": ["off", "normal", "full"],
        "help": "SQLite WAL synchronous level. off: an event survives an edged crash but not a "
                "power cut; normal (default): survives a crash, a power cut may lose the "
                "events of the last moments but never corrupts the spool; full: every event "
                "is on disk (fsync) before publish_event returns"})


@dataclass
class HassSettings:
    enabled: bool = field(default=True, metadata={
        "help": "publish Home Assistant MQTT discovery (device-based)"})
    discovery_prefix: str = field(default="homeassistant", metadata={
        "help": "Home Assistant's discovery prefix; its birth message is expected on "
                "<prefix>/status"})


@dataclass
class MqttSettings:
    enabled: bool = field(default=True, metadata={"help": "publish over MQTT"})
    host: str = field(default="127.0.0.1", metadata={"help": "broker host name or address"})
    port: int = field(default=1883, metadata={
        "min": 1, "max": 65535, "help": "broker port (1883 plain, 8883 usual for TLS)"})
    protocol: str = field(default="5", metadata={
        "choices": ["3.1.1", "5"], "help": "MQTT protocol version"})
    client_id: Optional[str] = field(default=None, metadata={
        "help": "MQTT client id, unique per device (default: edged-<device>)"})
    username: Optional[str] = field(default=None, metadata={"help": "broker user name"})
    password_file: Optional[str] = field(default=None, metadata={
        "help": "file holding the broker password (first line); keeps it out of the YAML"})
    password_env: Optional[str] = field(default=None, metadata={
        "help": "name of an environment variable holding the broker password"})
    tls: TlsSettings = field(default_factory=TlsSettings, metadata={"help": "TLS settings"})
    keepalive: int = field(default=30, metadata={
        "min": 2, "max": 65535, "help": "keepalive (seconds); the broker publishes the "
                                       "'offline' last will about 1.5x this after edged dies"})
    reconnect_min_s: float = field(default=1.0, metadata={
        "min": 0.1, "help": "first reconnect delay (seconds); doubles on each failure"})
    reconnect_max_s: float = field(default=60.0, metadata={
        "min": 0.1, "help": "longest reconnect delay (seconds)"})
    max_inflight: int = field(default=20, metadata={
        "min": 1, "max": 1000, "help": "QoS 1 messages sent and not yet acknowledged (PUBACK); "
                                     "also capped by the broker's Receive Maximum (MQTT 5)"})
    topic_prefix: Optional[str] = field(default=None, metadata={
        "help": "prefix of every topic (default: edged/<device>)"})
    stats_interval_s: float = field(default=30.0, metadata={
        "min": 1, "help": "seconds between two messages on <prefix>/stats"})
    presence_timeout_s: float = field(default=60.0, metadata={
        "min": 1, "help": "a person is reported gone this many seconds after their last "
                          "track ended"})
    snapshots: bool = field(default=False, metadata={
        "help": "publish a JPEG of the face of each recognized and unknown event on "
                "<prefix>/snapshot/<camera>"})
    snapshot_encoding: str = field(default="jpeg", metadata={
        "choices": ["jpeg", "base64"],
        "help": "jpeg: raw JPEG bytes; base64: a JSON object with the JPEG in base64"})
    homeassistant: HassSettings = field(default_factory=HassSettings, metadata={
        "help": "Home Assistant discovery"})
    spool: SpoolSettings = field(default_factory=SpoolSettings, metadata={
        "help": "on-disk store-and-forward spool of events"})

    def config_errors(self):
        """Checks across fields, for edged.config (subkey relative to mqtt, message)."""
        errors = []
        if not self.host.strip():
            if self.enabled:
                errors.append(("host", "must not be empty"))
        else:
            try:  # what the socket layer does with a name; an error there would end paho's thread
                self.host.encode("idna")
            except UnicodeError as exc:
                errors.append(("host", f"{self.host!r} is not a valid host name ({exc})"))
        if self.reconnect_min_s > self.reconnect_max_s:
            errors.append(("reconnect_min_s", f"{self.reconnect_min_s} is more than "
                                              f"reconnect_max_s ({self.reconnect_max_s})"))
        if self.password_file and self.password_env:
            errors.append(("password_env", "password_file is set too; use one of them"))
        if (self.password_file or self.password_env) and not self.username:
            errors.append(("username", "a password is configured but no username"))
        if bool(self.tls.cert_file) != bool(self.tls.key_file):
            errors.append(("tls.cert_file" if not self.tls.cert_file else "tls.key_file",
                           "cert_file and key_file go together; set both"))
        if self.tls.enabled:
            errors += [(f"tls.{key}", why) for key, why in tls_file_errors(self.tls)]
        return errors


class MqttConfigError(ValueError):
    """A setting that can never work (names the key)."""


_SEGMENT_BAD = re.compile(r"[^\w.\-]")  # \w: letters and digits of any script (and _)


def topic_segment(name: str) -> str:
    """``name`` made safe as one topic level (no ``/``, ``+``, ``#``, spaces): letters and
    digits of any script, ``_ . -`` are kept, anything else becomes ``_``."""
    s = _SEGMENT_BAD.sub("_", str(name).strip())
    return s or "_"


def ascii_id(name: str) -> str:
    """``name`` as an id of ``a-z 0-9 _ - .`` only (Home Assistant's ids); a name with other
    characters than ASCII gets a short hash of itself, so that ``王伟`` and ``李娜`` stay apart."""
    text = str(name).strip()
    s = re.sub(r"[^a-z0-9_.\-]", "_", text.lower())
    if not text.isascii():
        s += "_" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:8]
    return s or "_"


def resolve_password(settings: MqttSettings) -> Optional[str]:
    """The password from ``password_file`` or ``password_env`` (never from the YAML)."""
    if settings.password_file and settings.password_env:
        raise MqttConfigError("mqtt.password_file and mqtt.password_env are both set; use one")
    if settings.password_file:
        try:
            with open(settings.password_file, "r", encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise MqttConfigError(
                f"mqtt.password_file: cannot read {settings.password_file!r}: {e.strerror}") from e
        lines = text.splitlines()
        if not lines or not lines[0]:
            raise MqttConfigError(f"mqtt.password_file: {settings.password_file!r} is empty")
        return lines[0]
    if settings.password_env:
        value = os.environ.get(settings.password_env)
        if value is None:
            raise MqttConfigError(
                f"mqtt.password_env: environment variable {settings.password_env!r} is not set")
        return value
    return None


def tls_file_errors(tls: TlsSettings):
    """``[(key, why)]`` for the TLS files that are set but are not readable files."""
    errors = []
    for key in ("ca_file", "cert_file", "key_file"):
        path = getattr(tls, key)
        if not path:
            continue
        if not os.path.exists(path):
            errors.append((key, f"no such file {path!r}"))
        elif not os.path.isfile(path):
            errors.append((key, f"{path!r} is not a file"))
        elif not os.access(path, os.R_OK):
            errors.append((key, f"cannot read {path!r}: Permission denied"))
    return errors


def build_ssl_context(tls: TlsSettings) -> ssl.SSLContext:
    """A client TLS context: CA file (or system CAs), optional client cert/key, hostname check."""
    for key, why in tls_file_errors(tls):
        raise MqttConfigError(f"mqtt.tls.{key}: {why}")
    if bool(tls.cert_file) != bool(tls.key_file):
        raise MqttConfigError("mqtt.tls.cert_file and mqtt.tls.key_file go together; set both")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        if tls.ca_file:
            ctx.load_verify_locations(cafile=tls.ca_file)
        else:
            ctx.load_default_certs()
    except ssl.SSLError as e:
        raise MqttConfigError(f"mqtt.tls.ca_file: {tls.ca_file!r} is not a PEM CA file: {e}") from e
    if tls.cert_file:
        try:
            ctx.load_cert_chain(tls.cert_file, tls.key_file)
        except ssl.SSLError as e:
            raise MqttConfigError(
                f"mqtt.tls.cert_file/key_file: cannot load {tls.cert_file!r} with "
                f"{tls.key_file!r}: {e}") from e
    ctx.check_hostname = bool(tls.check_hostname)
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def describe_connect_error(exc: BaseException, settings: MqttSettings) -> str:
    """A one-line, actionable reason for a failed connection attempt."""
    where = f"{settings.host}:{settings.port}"
    if isinstance(exc, ssl.SSLCertVerificationError):
        msg = str(exc.verify_message or exc).rstrip(".")
        hint = ("check mqtt.tls.ca_file" if "mismatch" not in msg
                else "the broker's certificate does not name this host; fix mqtt.host or "
                     "set mqtt.tls.check_hostname: false")
        return f"TLS: certificate verify failed for broker {where}: {msg} ({hint})"
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake with {where} failed: {exc.reason or exc} (is the port TLS?)"
    if settings.tls.enabled and isinstance(exc, (ConnectionResetError, BrokenPipeError)):
        # a plain MQTT port drops the ClientHello: the handshake fails with a reset
        return f"TLS handshake with {where} failed: connection reset by the broker " \
               f"(is the port TLS?)"
    if isinstance(exc, ConnectionRefusedError):
        return f"broker {where} refused the connection (not running?)"
    if isinstance(exc, TimeoutError) or "timed out" in str(exc):
        return f"broker {where} did not answer (timeout)"
    return f"cannot reach broker {where}: {exc.__class__.__name__}: {exc}"


class MqttClient:
    """One paho client with will, TLS, credentials, backoff and a named network thread.

    Callbacks are called on paho's network thread and must not block:

    - ``on_connected()`` after each successful CONNACK,
    - ``on_disconnected(reason: str)`` when an established connection is lost,
    - ``on_puback(mid: int, ok: bool, reason: str)`` for each acknowledged QoS 1 publish,
    - ``on_message(topic: str, payload: bytes)``.
    """

    def __init__(self, settings: MqttSettings, device: str, will_topic: str,
                 on_connected: Optional[Callable[[], None]] = None,
                 on_disconnected: Optional[Callable[[str], None]] = None,
                 on_puback: Optional[Callable[[int, bool, str], None]] = None,
                 on_message: Optional[Callable[[str, bytes], None]] = None,
                 extra_inflight: int = 20):
        self.settings = settings
        self.device = device
        self.client_id = settings.client_id or f"edged-{topic_segment(device)}"
        self.will_topic = will_topic
        self._on_connected = on_connected
        self._on_disconnected = on_disconnected
        self._on_puback = on_puback
        self._on_message = on_message
        self.connected = False
        self.attempts = 0  # connection attempts that failed since the last success
        self.connects = 0
        self.last_error: Optional[str] = None
        self.receive_maximum: Optional[int] = None  # from the broker's CONNACK (MQTT 5)
        self._started = False
        self._closing = False
        self._refused = False
        self._last_logged: Optional[str] = None

        self.v5 = settings.protocol == "5"
        password = resolve_password(settings)
        if password is not None and not settings.username:
            raise MqttConfigError("mqtt.username: a password is configured but no username")
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=self.client_id,
            protocol=paho.MQTTv5 if self.v5 else paho.MQTTv311,
            clean_session=None if self.v5 else True)
        if settings.username:
            self.client.username_pw_set(settings.username, password)
        if settings.tls.enabled:
            self.client.tls_set_context(build_ssl_context(settings.tls))
            if not settings.tls.check_hostname:
                self.client.tls_insecure_set(True)
        self.client.will_set(will_topic, "offline", qos=1, retain=True)
        self.client.reconnect_delay_set(settings.reconnect_min_s, settings.reconnect_max_s)
        self.client.max_inflight_messages_set(settings.max_inflight + extra_inflight)
        self.client.on_connect = self._cb_connect
        self.client.on_connect_fail = self._cb_connect_fail
        self.client.on_disconnect = self._cb_disconnect
        self.client.on_publish = self._cb_publish
        self.client.on_message = self._cb_message

    # -- life cycle -------------------------------------------------------------------------
    def start(self) -> None:
        """Start the network thread; never fails because the broker is down."""
        if self._started:
            return
        self._started = True
        props = None
        if self.v5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 0
        self.client.connect_async(self.settings.host, self.settings.port,
                                  keepalive=self.settings.keepalive,
                                  clean_start=True if self.v5 else paho.MQTT_CLEAN_START_FIRST_ONLY,
                                  properties=props)
        self.client.loop_start()
        log.info("MQTT client %s connecting to %s:%d (MQTT %s%s)", self.client_id,
                 self.settings.host, self.settings.port, self.settings.protocol,
                 ", TLS" if self.settings.tls.enabled else "")

    def disconnect(self, with_will: bool = False) -> None:
        """Close the connection; ``with_will`` asks the broker to publish the last will (v5)."""
        if not self._started:
            return
        self._closing = True
        try:
            if with_will and self.v5:
                self.client.disconnect(reasoncode=ReasonCode(PacketTypes.DISCONNECT,
                                                             "Disconnect with will message"))
            else:
                self.client.disconnect()
        except Exception as e:  # a half-open socket: nothing more to do
            log.debug("disconnect: %s", e)

    def stop(self) -> None:
        """Stop the network thread (after :meth:`disconnect`)."""
        if not self._started:
            return
        self.client.loop_stop()
        self._started = False
        self.connected = False

    # -- operations -------------------------------------------------------------------------
    def publish(self, topic: str, payload, qos: int = 1, retain: bool = False) -> Optional[int]:
        """Hand a message to paho; returns its mid (QoS > 0), or None when paho refused it.

        QoS 1 messages handed over while disconnected stay in paho's memory and are sent on
        reconnect (paho resends the unacknowledged ones too).
        """
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN):
            log.warning("publish to %s refused by the client: %s", topic, paho.error_string(info.rc))
            return None
        return info.mid

    def subscribe(self, topic: str, qos: int = 1) -> None:
        self.client.subscribe(topic, qos)

    # -- paho callbacks (network thread) ----------------------------------------------------
    def _cb_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self.attempts += 1
            why = str(reason_code)
            if why in ("Bad user name or password", "Not authorized"):
                why += (f" (user {self.settings.username!r}; check mqtt.username and "
                        f"mqtt.password_file / mqtt.password_env)")
            self.last_error = f"broker {self.settings.host}:{self.settings.port} refused the " \
                              f"connection: {why}"
            self._report(logging.ERROR)
            self._refused = True
            return
        self._refused = False
        self.connects += 1
        # the broker's Receive Maximum (MQTT 5): the most QoS 1 messages it takes in flight
        rm = getattr(properties, "ReceiveMaximum", None) if self.v5 else None
        self.receive_maximum = int(rm) if rm else None
        if self.attempts or self.connects > 1:
            log.warning("MQTT: connected to %s:%d after %d failed attempt(s)",
                        self.settings.host, self.settings.port, self.attempts)
        else:
            log.info("MQTT: connected to %s:%d", self.settings.host, self.settings.port)
        self.attempts = 0
        self.last_error = None
        if self._on_connected:
            self._on_connected()  # before `connected` turns true: readers see the new connection
        self.connected = True

    def _cb_connect_fail(self, client, userdata) -> None:
        # Called by paho inside its `except OSError:` block: sys.exc_info() is the cause.
        exc = sys.exc_info()[1]
        self.attempts += 1
        self.last_error = describe_connect_error(exc, self.settings) if exc else "connect failed"
        self._report(logging.ERROR if self.last_error.startswith("TLS") else logging.WARNING)

    def _report(self, level: int) -> None:
        """Log a failed attempt: the first three, any new cause, then every tenth."""
        if (self.attempts <= 3 or self.last_error != self._last_logged
                or self.attempts % 10 == 0):
            log.log(level, "MQTT: %s; retrying (attempt %d)", self.last_error, self.attempts)
        else:
            log.debug("MQTT: %s; retrying (attempt %d)", self.last_error, self.attempts)
        self._last_logged = self.last_error

    def _cb_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        was = self.connected
        self.connected = False
        if not was and not self._closing:
            if self._refused:  # already reported by _cb_connect
                self._refused = False
                return
            # closed before CONNACK: e.g. a TLS broker that wants a client certificate
            self.attempts += 1
            self.last_error = (f"broker {self.settings.host}:{self.settings.port} closed the "
                               f"connection before accepting it ({reason_code})")
            if not self.settings.tls.enabled:
                self.last_error += "; is the port TLS (mqtt.tls.enabled)?"
            elif not self.settings.tls.cert_file:
                self.last_error += "; does it require a client certificate (mqtt.tls.cert_file)?"
            self._report(logging.ERROR)
            return
        if was and self._closing:
            log.info("MQTT: disconnected from %s:%d", self.settings.host, self.settings.port)
        elif was:
            reason = str(reason_code)
            log.warning("MQTT: connection to %s:%d lost (%s); reconnecting",
                        self.settings.host, self.settings.port, reason)
            if self._on_disconnected:
                self._on_disconnected(reason)

    def _cb_publish(self, client, userdata, mid, reason_code, properties) -> None:
        if self._on_puback:
            ok = not getattr(reason_code, "is_failure", False)
            self._on_puback(mid, ok, str(reason_code))

    def _cb_message(self, client, userdata, message) -> None:
        if self._on_message:
            self._on_message(message.topic, message.payload)
