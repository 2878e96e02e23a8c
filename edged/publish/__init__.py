"""What leaves the daemon: events over MQTT, Home Assistant discovery, metrics and HTTP.

``spool`` keeps every event on disk until the broker has it, ``mqtt`` is the client,
``publisher`` sends events and status (``payloads``: the JSON documents, ``presence``: the
per-person topics, ``retained``: the retained status and discovery), ``hass`` writes the
discovery documents, ``metrics`` the Prometheus registry, and ``http`` serves ``/healthz`` and
``/metrics``.
"""
