"""The match settings (``match:`` in the configuration) and the decision that turns a face's
best candidates into a :class:`edged.types.Match`."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional, Sequence

from edged.types import Match

#: the identification threshold when the embedder is not known (MobileFaceNet's, the default
#: embedder's: models/manifest.json); the daemon and ``edged identify`` use the embedder's own
FALLBACK_THRESHOLD = 0.58


@dataclass
class MatchSettings:
    threshold: Optional[float] = field(default=None, metadata={
        "min": -1.0, "max": 1.0,
        "help": "identification threshold: cosine similarity the best enrolled identity must reach "
                "to be named; null (the default) = the threshold of the embedder in service, from "
                "its manifest entry: 0.58 for mobilefacenet, 0.456 for sface (each chosen on "
                "faces/dev so that about 1 % of strangers are accepted against a gallery of a few "
                "hundred people; docs/accuracy.md); a number here applies whichever embedder runs"})
    min_margin: float = field(default=0.0, metadata={
        "min": 0.0, "max": 2.0,
        "help": "also require the best identity to beat the second best by this much (0 = off)"})
    top_k: int = field(default=5, metadata={
        "min": 1, "max": 100, "help": "candidates kept per face (Match.candidates)"})
    threads: int = field(default=2, metadata={
        "min": 1, "max": 64,
        "help": "threads splitting each gallery scan of 64k rows or more (smaller galleries "
                "are scanned by one); best with OPENBLAS_NUM_THREADS=1 (docs/benchmarks.md)"})

    def for_embedder(self, spec) -> "MatchSettings":
        """These settings with ``threshold`` decided: the configured one, else ``spec``'s (an
        :class:`edged.vision.embed.EmbedderSpec`, or None) identification threshold, else
        :data:`FALLBACK_THRESHOLD`."""
        if self.threshold is not None:
            return self
        own = getattr(spec, "identification", None)
        return replace(self, threshold=FALLBACK_THRESHOLD if own is None else own)

    @property
    def cutoff(self) -> float:
        """The threshold applied: the decided one, else :data:`FALLBACK_THRESHOLD`."""
        return FALLBACK_THRESHOLD if self.threshold is None else self.threshold


def decide(candidates: Sequence[tuple], settings: MatchSettings) -> Match:
    """Turn ``[(id, name, score)]`` (best first) into a :class:`Match` under ``settings``.

    The margin is the best score minus the second identity's; with a single enrolled
    identity there is no second and the margin equals the score.  The margin is checked only
    when ``min_margin`` > 0.
    """
    if not candidates:
        return Match(name=None, identity=None, score=0.0, margin=0.0, candidates=[])
    ident, name, score = candidates[0]
    second = candidates[1][2] if len(candidates) > 1 else 0.0
    margin = score - second
    cands = [(n, s) for _, n, s in candidates[:settings.top_k]]
    if score >= settings.cutoff and (settings.min_margin <= 0 or margin >= settings.min_margin):
        return Match(name=name, identity=ident, score=score, margin=margin, candidates=cands)
    return Match(name=None, identity=None, score=score, margin=margin, candidates=cands)
