"""``edged tracks list | show | enrol | forget``: the kept track faces, and enrolling them.

With ``enrolment.keep_faces`` on, the daemon keeps the best aligned crops of each ended track
under ``<state_dir>/tracks`` (:mod:`edged.enrolment.store`, docs/enrolment.md).  These commands
list them, write a track's crops as PNG files, enrol a track under a name into the gallery file
(checked by the enrolment guard; the running daemon hot-swaps the new file) and delete one.

The state directory is ``--state-dir``, else the ``paths.state_dir`` of ``--config``, else of
/etc/edged/config.yaml when it exists, else the default (as ``edged status``); the gallery is
``--gallery``, else that configuration's ``paths.gallery``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from edged.commands import (DEFAULT_CONFIG, EXIT_ERROR, EXIT_OK, config_given_or_default,
                            exit_status_epilog, similarity)

DESCRIPTION = """\
With enrolment.keep_faces on, the daemon keeps the best aligned face crops of each ended
track under <state_dir>/tracks (on the board only, files 0600; docs/enrolment.md). These
commands list them, write a track's crops as PNG files, enrol a track under a name into the
gallery file (checked by the enrolment guard; a running daemon hot-swaps the new file) and
delete one.

The state directory is --state-dir, else the paths.state_dir of --config, else of
/etc/edged/config.yaml when it exists, else /var/lib/edged/state (as edged status); the
gallery is --gallery, else that configuration's paths.gallery."""
EXIT_NOT_FOUND = 1  # no kept track with that id (as grep: nothing found)
PNG_MODE = 0o600
OUT_DIR_MODE = 0o700


class Fail(Exception):
    """A user-facing error: printed as ``edged tracks <action>: <message>``."""

    def __init__(self, msg: str, code: int = EXIT_ERROR):
        super().__init__(msg)
        self.code = code


def register(sub, common):
    fmt = argparse.RawDescriptionHelpFormatter
    epilog = exit_status_epilog(
        (EXIT_OK, "done"),
        (EXIT_NOT_FOUND, "no kept track with that id (it may have expired)"),
        (EXIT_ERROR, "bad usage, an enrolment refused by the guard (the reasons on stderr, one "
                     "a line), or a configuration, state directory or gallery that cannot be "
                     "read or written"))
    p = sub.add_parser("tracks", help="list the kept faces of ended tracks and enrol them",
                       description=DESCRIPTION, formatter_class=fmt,
                       epilog=epilog)
    where = argparse.ArgumentParser(add_help=False)
    g = where.add_mutually_exclusive_group()
    g.add_argument("--config", metavar="FILE", default=None,
                   help=f"the daemon's configuration (its paths.state_dir and paths.gallery; "
                        f"default {DEFAULT_CONFIG} when it exists)")
    g.add_argument("--state-dir", metavar="DIR", default=None,
                   help="the daemon's state directory (paths.state_dir)")
    tsub = p.add_subparsers(dest="tracks_command", metavar="ACTION")
    tsub.required = True
    parents = [common, where]

    ls = tsub.add_parser("list", parents=parents, epilog=epilog, formatter_class=fmt,
                         help="the kept tracks, newest first")
    ls.add_argument("--unknown", action="store_true", help="only the tracks nobody was named in")
    ls.add_argument("--json", action="store_true",
                    help="print a JSON list of the tracks (no crops, no embeddings)")
    ls.set_defaults(func=_run(cmd_list))

    sh = tsub.add_parser("show", parents=parents, epilog=epilog, formatter_class=fmt,
                         help="describe a kept track and write its crops as PNG files")
    sh.add_argument("id", metavar="ID", help="the track's id (or its first 4+ digits)")
    sh.add_argument("--out", metavar="DIR", default=None,
                    help="write the crops as DIR/<id>-<n>.png (mode 0600: they are biometric) "
                         "and print their paths")
    sh.set_defaults(func=_run(cmd_show))

    en = tsub.add_parser(
        "enrol", parents=parents, epilog=epilog, formatter_class=fmt,
        help="add a kept track's crops to a person in the gallery",
        description="Add the crops of track ID that meet the quality minimums to NAME (an "
                    "enrolled identity's id or display name, or a new person) in the gallery "
                    "file, atomically; a running daemon hot-swaps the new file. The guard "
                    "refuses a track of low quality, of more than one person, that matches "
                    "another enrolled person, or that does not match the person it is added "
                    "to (docs/enrolment.md); --force enrols it anyway, with a warning.")
    en.add_argument("id", metavar="ID", help="the track's id (or its first 4+ digits)")
    en.add_argument("name", metavar="NAME")
    en.add_argument("--gallery", metavar="FILE", default=None,
                    help="the gallery file (default: the configuration's paths.gallery)")
    en.add_argument("--id", dest="ident", metavar="ID", default=None,
                    help="identity id for a new person (default: NAME with spaces as "
                         "underscores)")
    en.add_argument("--force", action="store_true",
                    help="enrol even what the guard refuses (all crops, its reasons as "
                         "warnings); never past another embedder or an id already taken")
    en.add_argument("--threshold", type=similarity, default=None,
                    help="identification threshold for the guard (default: the "
                         "configuration's match.threshold, else the embedder's own)")
    en.set_defaults(func=_run(cmd_enrol))

    fg = tsub.add_parser("forget", parents=parents, epilog=epilog, formatter_class=fmt,
                         help="delete a kept track (its crops and embeddings)")
    fg.add_argument("id", metavar="ID", help="the track's id (or its first 4+ digits)")
    fg.set_defaults(func=_run(cmd_forget))


def _run(fn):
    """``fn`` with its failures as lines on stderr and an exit status, never a traceback."""
    from edged.enrolment.store import TrackNotFound
    from edged.gallery import GalleryError

    def handler(args) -> int:
        where = f"edged tracks {args.tracks_command}"
        try:
            return int(fn(args) or 0)
        except Fail as exc:
            print(f"{where}: {exc}", file=sys.stderr)
            return exc.code
        except TrackNotFound as exc:
            print(f"{where}: {exc}", file=sys.stderr)
            return EXIT_NOT_FOUND
        except GalleryError as exc:
            print(f"{where}: {exc}", file=sys.stderr)
            return EXIT_ERROR
        except OSError as exc:
            print(f"{where}: {exc.filename or ''}{': ' if exc.filename else ''}"
                  f"{exc.strerror or exc}", file=sys.stderr)
            return EXIT_ERROR
    return handler


# ---------------------------------------------------------------------------- where things are


@dataclass
class Place:
    state_dir: Path
    gallery: Optional[Path]  # None: no configuration says which
    threshold: Optional[float]  # the configuration's match.threshold
    settings: object  # EnrolmentSettings (keep_days for listing)

    def store(self):
        from edged.enrolment.store import TrackStore

        return TrackStore.of_state_dir(self.state_dir, self.settings)


def place_of(args) -> Place:
    """Where the state directory and the gallery are (see the module's docstring)."""
    from edged import config as configmod
    from edged.enrolment.store import EnrolmentSettings

    path = config_given_or_default(args.config)
    if path is None:
        paths = configmod.PathsSettings()
        return Place(Path(args.state_dir or paths.state_dir),
                     None if args.state_dir else Path(paths.gallery), None, EnrolmentSettings())
    try:
        cfg = configmod.load(path)
        configmod.resolve_paths(cfg)
    except Exception as exc:  # ConfigError and friends: they say what and where
        raise Fail(str(exc)) from None
    settings = getattr(cfg, "enrolment", None) or EnrolmentSettings()
    return Place(Path(args.state_dir or cfg.paths.state_dir), Path(cfg.paths.gallery),
                 cfg.match.threshold, settings)


# ---------------------------------------------------------------------------- the actions


def _when(t: float) -> str:
    return datetime.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S")


def _iso(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat(
        timespec="seconds").replace("+00:00", "Z")


def _score(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def cmd_list(args) -> int:
    place = place_of(args)
    tracks = place.store().list(unknown_only=args.unknown)
    if args.json:
        print(json.dumps([dict(t.summary(), ended_at=_iso(t.ended)) for t in tracks], indent=2,
                         ensure_ascii=False))
        return EXIT_OK
    if not tracks:
        which = "unknown tracks" if args.unknown else "tracks"
        print(f"no kept {which} in {place.store().root} (enrolment.keep_faces is off, or none "
              f"has ended since)", file=sys.stderr)
        return EXIT_OK
    rows = [(t.id, t.camera, _when(t.ended), t.outcome, t.name or "-",
             f"{t.best_quality:.2f}", _score(t.best_score), str(t.n_faces)) for t in tracks]
    head = ("ID", "CAMERA", "ENDED", "OUTCOME", "NAME", "QUALITY", "SCORE", "CROPS")
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    for r in [head] + rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    which = "unknown " if args.unknown else ""
    print(f"{len(rows)} kept {which}track(s) in {place.store().root}", file=sys.stderr)
    return EXIT_OK


def _describe(t) -> str:
    who = f" as {t.name} ({t.identity})" if t.name else ""
    return (f"track {t.id}: camera {t.camera}, {_when(t.started)} to {_when(t.ended)}, "
            f"{t.outcome}{who}, best score {_score(t.best_score)}, {len(t.faces)} crop(s)")


def cmd_show(args) -> int:
    track = place_of(args).store().find(args.id)
    print(_describe(track), file=sys.stderr)
    for k, f in enumerate(track.faces, 1):
        print(f"  crop {k}: quality {f.quality:.2f}"
              f"{'' if f.passed else ' (below the quality minimums)'}", file=sys.stderr)
    if args.out is None:
        return EXIT_OK
    for path in write_crops(track, Path(args.out)):
        print(path)
    return EXIT_OK


def write_crops(track, out: Path) -> list:
    """Write ``track``'s crops as ``out/<id>-<n>.png`` (0600; ``out`` made 0700 if missing)."""
    import cv2

    from edged.runtime.modelstore import atomic_write

    if out.exists() and not out.is_dir():
        raise Fail(f"--out {out}: not a directory")
    out.mkdir(parents=True, exist_ok=True, mode=OUT_DIR_MODE)
    paths = []
    for k, f in enumerate(track.faces, 1):
        ok, png = cv2.imencode(".png", f.image)
        if not ok:
            raise Fail(f"crop {k} of track {track.id} cannot be encoded as PNG")
        path = out / f"{track.id}-{k}.png"
        atomic_write(path, png.tobytes(), mode=PNG_MODE)
        os.chmod(path, PNG_MODE)  # (an existing file of the same name keeps no other mode)
        paths.append(path)
    return paths


def cmd_enrol(args) -> int:
    from edged.enrolment.enrol import EnrolmentRefused, enrol_track

    place = place_of(args)
    gallery = Path(args.gallery) if args.gallery else place.gallery
    if gallery is None:
        raise Fail("which gallery? pass --gallery FILE, or --config FILE for its paths.gallery")
    _check_owner(gallery)
    track = place.store().find(args.id)
    threshold = args.threshold if args.threshold is not None else place.threshold
    try:
        res = enrol_track(track, gallery, args.name, ident=args.ident, force=args.force,
                          threshold=threshold)
    except EnrolmentRefused as exc:
        for reason in exc.reasons:
            print(f"edged tracks enrol: refused: {reason}", file=sys.stderr)
        if exc.forceable:
            print("edged tracks enrol: --force enrols it anyway", file=sys.stderr)
        return EXIT_ERROR
    for w in res["warnings"]:
        print(f"edged tracks enrol: warning: {w}", file=sys.stderr)
    print(f"{'enrolled' if res['new'] else 'added to'} {res['name']} ({res['identity']}): "
          f"{res['rows_added']} crop(s) of track {track.id}; {gallery} now has {res['people']} "
          f"people, {res['rows']} rows; checksum {res['checksum']}")
    return EXIT_OK


def _check_owner(gallery: Path) -> None:
    """Refuse root writing a gallery another user owns: the new file would be root's, and a
    daemon running as that user (systemd/edged.service: edged) could not read it."""
    if os.geteuid() != 0:
        return
    try:
        st = os.stat(gallery)
    except FileNotFoundError:
        return
    if st.st_uid != 0:
        import pwd

        try:
            user = pwd.getpwuid(st.st_uid).pw_name
        except KeyError:
            user = str(st.st_uid)
        raise Fail(f"{gallery} belongs to {user}; run this as that user (sudo -u {user} edged "
                   f"tracks enrol ...) so that the daemon can read the new file")


def cmd_forget(args) -> int:
    track = place_of(args).store().forget(args.id)
    print(f"forgot track {track.id} (camera {track.camera}, ended {_when(track.ended)}, "
          f"{len(track.faces)} crop(s))")
    return EXIT_OK
