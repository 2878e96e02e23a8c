"""``edged run`` (the daemon) and ``edged check-config``."""
from __future__ import annotations

import logging
import os
import sys

from edged.commands import DEFAULT_CONFIG

#: exit status of every configuration error (sysexits.h); the unit's RestartPreventExitStatus
EX_CONFIG = 78


def register(sub, common):
    p = sub.add_parser("run", parents=[common], help="run the daemon (cameras in, events out)",
                       description="Run the face recognition daemon.  Under systemd "
                                   "(Type=notify) it reports READY, STATUS and WATCHDOG; "
                                   "SIGHUP reloads the configuration, gallery and models; "
                                   "SIGTERM stops it cleanly.")
    p.add_argument("--config", "-c", metavar="FILE",
                   default=os.environ.get("EDGED_CONFIG", DEFAULT_CONFIG),
                   help=f"configuration file (default: $EDGED_CONFIG, else {DEFAULT_CONFIG})")
    p.add_argument("--exit-when-done", action="store_true",
                   help="stop once every camera is a video file that has ended (batch runs)")
    p.add_argument("--events-out", metavar="FILE",
                   help="also append every event as one JSON line to FILE (debugging)")
    p.add_argument("--camera-wait", type=float, default=20.0, metavar="S",
                   help="seconds to wait for the cameras' first frames before READY (default 20)")
    p.set_defaults(func=cmd_run)

    c = sub.add_parser("check-config", help="check a configuration file, or print the defaults",
                       description="Check a configuration file: prints OK (exit 0), or every "
                                   "error with its key, the bad value and what is expected "
                                   "(exit 78, EX_CONFIG).  Warnings (valid settings that have "
                                   "no effect, or cannot work on this machine) and notes (the "
                                   "defaults an empty file runs on) go to stderr.")
    c.add_argument("file", nargs="?", metavar="FILE", help="configuration file to check")
    c.add_argument("--defaults", action="store_true",
                   help="print the full default configuration (commented YAML)")
    c.add_argument("--reference", action="store_true",
                   help="print the reference of every key (Markdown, as in docs/configuration.md)")
    c.add_argument("--update-doc", metavar="MD",
                   help="rewrite the reference between the markers of MD "
                        "(docs/configuration.md) from the settings classes")
    c.set_defaults(func=cmd_check)


def _report_errors(exc, file) -> int:
    for e in exc.errors:
        print(e, file=sys.stderr)
    n = len(exc.errors)
    print(f"{file}: {n} error{'s' if n != 1 else ''}", file=sys.stderr)
    return EX_CONFIG


def cmd_check(args) -> int:
    from edged import config

    if args.defaults:
        sys.stdout.write(config.defaults_yaml())
        return 0
    if args.reference:
        sys.stdout.write(config.reference_markdown())
        return 0
    if args.update_doc:
        try:
            changed = config.update_reference_doc(args.update_doc)
        except (OSError, ValueError) as exc:
            print(f"edged check-config: {exc}", file=sys.stderr)
            return 1
        print(f"{args.update_doc}: {'updated' if changed else 'already current'}")
        return 0
    if not args.file:
        print("edged check-config: give a FILE, --defaults or --reference", file=sys.stderr)
        return 2
    try:
        doc = config.read(args.file)
    except config.ConfigError as exc:
        return _report_errors(exc, args.file)
    print(f"{args.file}: OK")
    for w in doc.warnings:
        print(f"warning: {w}", file=sys.stderr)
    for note in config.default_notes(doc.data):
        print(f"note: {args.file}: {note}", file=sys.stderr)
    # Valid, but can it work on this machine?  (A GStreamer pipeline without GStreamer, a
    # missing video file.)  Warnings only: the file may be meant for another board.
    from edged.daemon.capture import preflight

    for i, cam in enumerate(doc.config.cameras):
        why = preflight(cam)
        if why:
            print(f"warning: cameras[{i}]: {why}", file=sys.stderr)
    return 0


def cmd_run(args) -> int:
    from edged import config, logs
    from edged.daemon.service import Daemon, StartupError
    from edged.daemon.sdnotify import Notifier

    log = logging.getLogger("edged")
    try:
        doc = config.read(args.config)
    except config.ConfigError as exc:
        logs.setup(None, args.verbose)
        for e in exc.errors:
            log.error("%s", e)
        log.error("edged run: the configuration %s is not valid; not starting", args.config)
        return EX_CONFIG
    cfg = doc.config
    config.resolve_paths(cfg)
    target = logs.setup(cfg.logging, args.verbose)
    log.debug("logging to %s", target)
    for w in doc.warnings:
        log.warning("%s", w)
    notifier = Notifier()
    daemon = Daemon(cfg, config_path=args.config, models_dir=args.models, notifier=notifier,
                    exit_when_done=args.exit_when_done, events_out=args.events_out)
    daemon.install_signals()
    try:
        daemon.start(camera_wait=args.camera_wait)
    except StartupError as exc:
        log.error("edged run: %s", exc)
        notifier.status(f"failed: {exc}")
        daemon.stop()
        return EX_CONFIG if exc.config else 1
    return daemon.run()
