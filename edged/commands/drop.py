"""``edged drop PATH... --to DIR``: copy files into a drop directory the safe way.

Each file is copied to a hidden temporary name in the target directory, fsynced, then renamed
into place, so a watching daemon sees either nothing or the whole file, never half of it.
A manifest (``*.json``) is placed last, after the files it names.  ``--as NAME`` gives a single
file another name in the target directory (a new gallery dropped as the daemon's gallery file).
What the daemon does with each drop is in docs/ota.md; ``edged status`` shows the outcome.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from edged.runtime.modelstore import atomic_write


def register(sub, common):
    p = sub.add_parser("drop", parents=[common],
                       help="copy model or gallery files into a drop directory atomically")
    p.add_argument("paths", nargs="+", metavar="PATH", help="files to drop")
    p.add_argument("--to", metavar="DIR", required=True,
                   help="the device's drop directory (its models directory, or the directory of "
                        "its gallery file)")
    p.add_argument("--as", dest="as_name", metavar="NAME", default=None,
                   help="the name to give the (single) file in DIR, e.g. the gallery file's name")
    p.set_defaults(func=cmd_drop)


def drop_file(src: Path, dest_dir: Path, name: str = None) -> Path:
    """Copy ``src`` into ``dest_dir`` by temp file + fsync + rename; return the final path."""
    dest = dest_dir / (name or src.name)
    with open(src, "rb") as f:
        atomic_write(dest, iter(lambda: f.read(1 << 20), b""))
    return dest


def cmd_drop(args) -> int:
    dest_dir = Path(args.to)
    if not dest_dir.is_dir():
        print(f"edged drop: {dest_dir}: not a directory", file=sys.stderr)
        return 1
    paths = [Path(p) for p in args.paths]
    as_name = getattr(args, "as_name", None)
    if as_name is not None and (len(paths) != 1 or os.path.basename(as_name) != as_name
                                or as_name in ("", ".", "..")):
        print("edged drop: --as NAME takes one file and a plain file name", file=sys.stderr)
        return 2
    paths.sort(key=lambda p: p.suffix == ".json")  # manifests last
    status = 0
    for src in paths:
        if not src.is_file():
            print(f"edged drop: {src}: not a file, skipped", file=sys.stderr)
            status = 1
            continue
        try:
            print(f"dropped {src} -> {drop_file(src, dest_dir, as_name)}")
        except OSError as exc:
            print(f"edged drop: {src}: {exc}", file=sys.stderr)
            status = 1
    return status
