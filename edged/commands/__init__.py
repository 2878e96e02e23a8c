"""Sub-commands of the ``edged`` CLI; every module here is picked up by :mod:`edged.cli`."""

import argparse as _argparse
import math as _math


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
