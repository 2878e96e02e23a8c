"""The long-running service: frames in, events out.

``service`` (the :class:`~edged.daemon.service.Daemon`) wires the parts and owns their
lifecycle: start, the main loop, SIGHUP (``reload``), stop and the systemd notifications
(``sdnotify``). The frames go:

``capture`` (one thread per camera; ``framehub``: the newest frame wins) -> ``flow`` (the
detection workers, then the track thread in capture order) -> ``recognize`` (``track``
follows the faces, ``evidence`` decides who they are; embed, match, make events) ->
``events`` (the events thread: the publisher, the journal, ``--events-out``).

``status`` is what the daemon says about itself (the status document and file, and the
health, :mod:`edged.health`: the one notion of health that the watchdog, MQTT, ``edged
status`` and ``/healthz`` read), ``stats`` the figures it keeps, and ``drops`` starts and moves the drop
manager (edged.ota). Nothing outside this package imports it, except the ``edged run`` command.
"""
