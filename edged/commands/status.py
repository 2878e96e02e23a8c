"""``edged status [--config FILE | --state-dir DIR] [--json]``: what the daemon has in service.

Reads ``<state_dir>/status.json``, the status document the running daemon writes atomically
whenever its status changes (the same document it publishes retained on
``<prefix>/status``, see docs/mqtt.md), and prints it for a person, or as JSON.

The first line says whether the daemon runs and its health (:mod:`edged.health`: healthy,
degraded with the problems named, stopped).  A daemon that is not running (stopped cleanly,
or its pid gone) is said to be so, with no camera state or fps of its last run.  Exit status:
0 running, 3 not running (as ``systemctl status``), 1 no readable status file, 2 a bad
configuration.
"""
from __future__ import annotations

import json
import os
import sys
import time
from datetime import datetime
from pathlib import Path

from edged.commands import DEFAULT_CONFIG, config_given_or_default

STALE_S = 30.0  # the daemon rewrites the file at least every 5 s while it runs
NOT_RUNNING = 3
READ_TRIES = 3  # a status written in place (a full disk) may be read half written


def register(sub, common):
    p = sub.add_parser("status", parents=[common],
                       help="print what the running daemon has in service (models, gallery, "
                            "last swap, last refused drop)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--config", metavar="FILE", default=None,
                   help=f"the daemon's configuration (its paths.state_dir; default "
                        f"{DEFAULT_CONFIG} when it exists)")
    g.add_argument("--state-dir", metavar="DIR", default=None,
                   help="the daemon's state directory (paths.state_dir)")
    p.add_argument("--json", action="store_true", help="print the status document as JSON")
    p.set_defaults(func=cmd_status)


def _state_dir(args) -> Path:
    if args.state_dir:
        return Path(args.state_dir)
    from edged import config as configmod

    path = config_given_or_default(args.config)
    if path is None:
        return Path(configmod.PathsSettings().state_dir)
    cfg = configmod.load(path)
    return Path(cfg.paths.state_dir)


def _age(iso: str) -> float:
    try:
        t = datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()
    except (AttributeError, ValueError):
        return float("inf")
    return time.time() - t


def _short(v) -> str:
    return str(v)[:12] if v else "none"


def liveness(doc: dict) -> tuple:
    """``(running, text)`` for the daemon whose status document is ``doc``."""
    if doc.get("stopped"):
        return False, f"not running (stopped at {doc.get('stopped_at') or doc.get('time')})"
    pid = doc.get("pid")
    if pid:
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return False, f"not running (pid {pid} is gone: it did not stop cleanly)"
        except (PermissionError, ValueError, OSError):
            pass
    age = _age(doc.get("time", ""))
    if age > STALE_S:
        return True, f"no update for {age:.0f} s (is it running?)"
    return True, "running"


def _health(doc: dict, running: bool) -> str:
    from edged.health import state_of

    state = state_of(doc, running)
    problems = doc.get("problems") or {}
    if state != "degraded":
        return state
    return "degraded: " + "; ".join(f"{k}: {p.get('why')} (since {p.get('since')})"
                                    for k, p in sorted(problems.items()))


def render(doc: dict) -> str:
    running, text = liveness(doc)
    lines = [f"device {doc.get('device')}: edged {doc.get('edged_version')}, "
             f"{text}, started {doc.get('started')}, as of {doc.get('time')}",
             f"  health     {_health(doc, running)}"]
    v = doc.get("versions") or {}
    det = v.get("detector") or {}
    acc = doc.get("accelerators") or {}
    lines.append(f"  embedder   {v.get('embedder') or 'none'}  ({acc.get('embedder', '?')})")
    for role in ("pnet", "rnet", "onet"):
        lines.append(f"  {role:<10} {det.get(role) or 'none'}  ({acc.get('detector', '?')})")
    lines.append(f"  gallery    {v.get('gallery') or 'none'}  ({v.get('gallery_rows', 0)} rows)")
    held = doc.get("held_back") or {}
    if held.get("embedder"):
        lines.append(f"  held back: embedder {held['embedder']} ({held.get('file')}) since "
                     f"{held.get('since')}, waiting for {held.get('waiting_for')}")
    for name, cam in sorted((doc.get("cameras") or {}).items()):
        if not running:  # (what its last run saw is no camera's state now)
            lines.append(f"  camera {name}: not running")
            continue
        if cam.get("finished"):  # a video file read to its end (no --exit-when-done)
            lines.append(f"  camera {name}: finished (end of the file, "
                         f"{cam.get('frames_read')} frames)")
            continue
        state = "connected" if cam.get("connected") else "not connected"
        fps = cam.get("fps")
        lines.append(f"  camera {name}: {state}" + (f", {fps} fps" if fps is not None else ""))
    sw = doc.get("last_swap") or {}
    if sw:
        lines.append(f"  last swap: {sw.get('result')} {sw.get('kind')} "
                     f"{', '.join(sw.get('files') or [str(sw.get('file'))])} at {sw.get('time')}"
                     f" in {sw.get('seconds')} s"
                     + ("" if sw.get("confirmed", True) else ", on probation")
                     + (f" ({sw['why']})" if sw.get("why") else ""))
    rj = doc.get("last_rejected_drop") or {}
    if rj:
        lines.append(f"  last refused drop: {rj.get('file')} at {rj.get('time')}: {rj.get('why')}")
    dr = doc.get("drops") or {}
    if dr:
        lines.append("  drops: " + ", ".join(f"{k} {n}" for k, n in dr.items()))
    if doc.get("drop_dir"):
        lines.append(f"  drop directory: {doc['drop_dir']}")
    mq = doc.get("mqtt") or {}
    if mq and running:
        lines.append(f"  mqtt: {'connected' if mq.get('connected') else 'not connected'}"
                     + (f" ({mq['last_error']})" if mq.get("last_error") else ""))
    return "\n".join(lines)


def cmd_status(args) -> int:
    try:
        state = _state_dir(args)
    except Exception as exc:  # ConfigError and friends: they say what and where
        print(f"edged status: {exc}", file=sys.stderr)
        return 2
    path = state / "status.json"
    try:
        doc = read_status(path)
    except FileNotFoundError:
        print(f"edged status: {path}: no status file (the daemon has not run with this "
              f"state directory, or cannot write it)", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"edged status: {path}: cannot read: {exc}", file=sys.stderr)
        return 1
    if not isinstance(doc, dict):
        print(f"edged status: {path}: not a status document", file=sys.stderr)
        return 1
    print(json.dumps(doc, indent=2) if args.json else render(doc))
    return 0 if liveness(doc)[0] else NOT_RUNNING


def read_status(path: Path):
    """The status document in ``path``; read again when caught half written."""
    for attempt in range(READ_TRIES):
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            if attempt == READ_TRIES - 1:
                raise
            time.sleep(0.05)
