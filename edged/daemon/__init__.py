"""The long-running service: frames in, events out.

``capture`` reads the cameras, ``track`` follows faces between frames and decides when an
event is due, ``health`` is the one notion of health (watchdog, MQTT status, ``edged status``,
``/healthz``), ``sdnotify`` speaks to systemd, and ``service`` wires them with the vision
stages, the gallery, the publisher and the OTA watcher. Nothing outside this package imports
it, except the ``edged run``/``status`` commands.
"""
