"""The ``edged`` command line: one sub-command module per topic in :mod:`edged.commands`.

Each module in ``edged/commands/`` defines ``register(subparsers, common)``, which adds its
sub-commands; ``common`` is a parent parser with the options every sub-command takes
(``--models DIR``, ``-v``).  A handler returns the process exit status.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import pkgutil
import sys

from edged import __version__


def common_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--models", metavar="DIR", default=None,
                   help="models directory (default: $EDGED_MODELS_DIR, /var/lib/edged/models "
                        "for root, else ~/.local/share/edged/models)")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    return p


def build_parser() -> argparse.ArgumentParser:
    from edged import commands

    parser = argparse.ArgumentParser(
        prog="edged", description="On-device face recognition: detect, recognise, publish over MQTT.")
    parser.add_argument("--version", action="version", version=f"edged {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    common = common_parser()
    for mod in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        importlib.import_module(f"{commands.__name__}.{mod.name}").register(sub, common)
    return parser


def setup_logging(verbose: int) -> None:
    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING
    level = getattr(logging, os.environ.get("EDGED_LOG_LEVEL", "").upper(), level)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(getattr(args, "verbose", 0))
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
