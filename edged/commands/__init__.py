"""Sub-commands of the ``edged`` CLI; every module here is picked up by :mod:`edged.cli`."""

import argparse as _argparse
import math as _math
import os as _os

#: the daemon's configuration file, where the commands look when none is given
DEFAULT_CONFIG = "/etc/edged/config.yaml"


def config_given_or_default(config):
    """``config`` (``--config``), else :data:`DEFAULT_CONFIG` when it exists, else None."""
    return config or (DEFAULT_CONFIG if _os.path.exists(DEFAULT_CONFIG) else None)


def _finite_in(lo: float, hi: float, what: str):
    """An argparse type: a finite number in [lo, hi] (``what`` says which, in the error)."""
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise _argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not (_math.isfinite(v) and lo <= v <= hi):
            raise _argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return v
    return parse


#: a cosine-similarity threshold
similarity = _finite_in(-1.0, 1.0, "a cosine similarity in [-1, 1]")
#: a margin between two cosine similarities
margin = _finite_in(0.0, 2.0, "in [0, 2]")


#: exit statuses of the commands that read images (faces, compare, embed, identify), as grep
#: and diff have theirs: a script tells "no face in one photo" from "could not run"
EXIT_OK = 0
EXIT_NO_FACE = 1
EXIT_ERROR = 2


def exit_status_epilog(*rows) -> str:
    """An argparse epilog (for RawDescriptionHelpFormatter) listing ``(status, meaning)`` rows."""
    import textwrap

    width = max(len(str(code)) for code, _ in rows) + 2
    lines = ["exit status:"]
    for code, meaning in rows:
        lines.extend(textwrap.wrap(meaning, 79, initial_indent=f"  {code:<{width}}",
                                   subsequent_indent=" " * (width + 2)))
    return "\n".join(lines)


def image_exit_rows(ok: str) -> tuple:
    """The exit statuses of a command that reads images; ``ok`` says what 0 means."""
    return ((EXIT_OK, ok),
            (EXIT_NO_FACE, "some images had no face (the others were processed)"),
            (EXIT_ERROR, "bad usage, an image that cannot be read (the others are still "
                         "processed), an output that cannot be written, or nothing could run "
                         "(models or gallery unusable)"))
