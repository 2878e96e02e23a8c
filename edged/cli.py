"""The ``edged`` command line: one sub-command module per topic in :mod:`edged.commands`.

Each module in ``edged/commands/`` defines ``register(subparsers, common)``, which adds its
sub-commands; ``common`` is a parent parser with the options every sub-command takes
(``--models DIR``, ``-v``).  A handler returns the process exit status: the statuses common
to the commands are listed in ``edged --help`` (:func:`exit_epilog`), each command's own in
its ``--help``.
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


def exit_epilog() -> str:
    """The exit statuses the commands share (each command's --help lists its own)."""
    from edged.commands import EXIT_ERROR, EXIT_NO_FACE, EXIT_OK, exit_status_epilog
    from edged.commands.run import EX_CONFIG

    return exit_status_epilog(
        (EXIT_OK, "done"),
        (EXIT_NO_FACE, "faces, compare, embed, identify: some images had no face; the other "
                       "commands: failed (the error is on stderr)"),
        (EXIT_ERROR, "bad usage (any command); faces, compare, embed, identify: an image "
                     "that cannot be read, or nothing could run"),
        (EX_CONFIG, "run, check-config: the configuration is not valid (EX_CONFIG; systemd "
                    "does not restart the daemon on it)"),
        (130, "interrupted (Ctrl-C)")) + (
        "\n\nfaces, compare, embed and identify list theirs in their --help.")


def build_parser() -> argparse.ArgumentParser:
    from edged import commands

    parser = argparse.ArgumentParser(
        prog="edged", description="On-device face recognition: detect, recognise, publish over MQTT.",
        epilog=exit_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
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
