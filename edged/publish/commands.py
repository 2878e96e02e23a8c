"""The enrolment topics of the publisher (docs/enrolment.md, "From Home Assistant or MQTT").

- ``<prefix>/command/enrol``: a JSON ``{"track": ID, "name": NAME}`` (``"track":
  "last_unknown"`` and no name: the Home Assistant button, with the name of the text entity);
- ``<prefix>/command/enrol_name``: the name to enrol (Home Assistant's text entity), echoed
  retained on ``<prefix>/enrol/name``;
- ``<prefix>/command/result``: the outcome of each command (JSON, QoS 1, not retained);
- ``<prefix>/enrol/last_unknown``: the best crop of the last unknown kept track (JPEG; only
  with ``mqtt.snapshots``: it is biometric data).

Commands are subscribed to only when the daemon hands an ``on_command`` callback
(``enrolment.mqtt_commands``); the callback is called on paho's network thread and must not
block.
"""
from __future__ import annotations

import json
import logging
from typing import Callable, Optional

log = logging.getLogger("edged.publish")

COMMANDS = ("enrol", "enrol_name")


class CommandTopics:
    """A mixin of :class:`edged.publish.publisher.Publisher` (it uses ``prefix``, ``client``,
    ``enabled``, ``settings``, ``_lock``, ``_ctl_pending`` and ``_wake``)."""

    def _init_commands(self, on_command: Optional[Callable[[str, bytes], None]]) -> None:
        self.on_command = on_command
        self.t_command = f"{self.prefix}/command"
        self.t_result = f"{self.prefix}/command/result"
        self.t_enrol_name = f"{self.prefix}/enrol/name"
        self.t_last_unknown = f"{self.prefix}/enrol/last_unknown"

    def _subscribe_commands(self) -> None:
        """On each new connection: the command topics, when commands are on."""
        if self.on_command is not None:
            for kind in COMMANDS:
                self.client.subscribe(f"{self.t_command}/{kind}", qos=1)

    def _command_message(self, topic: str, payload: bytes) -> bool:
        """Hand a command to the daemon; whether ``topic`` was a command topic."""
        if self.on_command is None or not topic.startswith(self.t_command + "/"):
            return False
        kind = topic[len(self.t_command) + 1:]
        if kind in COMMANDS:
            try:
                self.on_command(kind, bytes(payload))
            except Exception:  # (never in paho's thread)
                log.exception("MQTT command on %s failed", topic)
        return True

    def publish_result(self, doc: dict) -> None:
        """The outcome of a command on ``<prefix>/command/result``."""
        if self.enabled:
            self.client.publish(self.t_result, json.dumps(doc, default=str), qos=1)

    def publish_enrol_name(self, name: str) -> None:
        """The name to enrol, retained (the state of Home Assistant's text entity)."""
        if not self.enabled:
            return
        with self._lock:
            self._ctl_pending[self.t_enrol_name] = (name.encode(), True)
        self._wake.set()

    def publish_last_unknown(self, jpeg: bytes) -> None:
        """The last unknown kept face (JPEG), only with ``mqtt.snapshots``."""
        if self.enabled and self.settings.snapshots and self.client.connected:
            self.client.publish(self.t_last_unknown, jpeg, qos=0)
