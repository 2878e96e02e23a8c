"""Sub-commands of the ``edged`` CLI; every module here is picked up by :mod:`edged.cli`."""

import argparse as _argparse
import math as _math


def similarity(text: str) -> float:
    """An argparse type: a cosine-similarity threshold, a finite number in [-1, 1]."""
    try:
        v = float(text)
    except ValueError:
        raise _argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (_math.isfinite(v) and -1.0 <= v <= 1.0):
        raise _argparse.ArgumentTypeError(f"must be a cosine similarity in [-1, 1], got {text}")
    return v


def margin(text: str) -> float:
    """An argparse type: a margin between two cosine similarities, a finite number in [0, 2]."""
    try:
        v = float(text)
    except ValueError:
        raise _argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (_math.isfinite(v) and 0.0 <= v <= 2.0):
        raise _argparse.ArgumentTypeError(f"must be in [0, 2], got {text}")
    return v
