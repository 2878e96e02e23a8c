"""A track's identity: the gallery's answers as evidence, and the decisions they lead to.

The rules are in :mod:`edged.daemon.track`'s documentation: each embedding of a track's face
adds its quality to the evidence for the identity it matched, for an unknown face, or to
neither (a near miss); disagreeing embeddings split the track; enough evidence (and liveness,
when it is required) gives one ``recognized``, ``unknown`` or ``spoof_suspected`` event.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, List, Optional, Tuple

import numpy as np

from edged.vision.liveness import verdict
from edged.types import Event, Face, Frame, Match

if TYPE_CHECKING:
    from edged.daemon.track import Track

log = logging.getLogger("edged.track")


def rounded(v: Optional[float]) -> Optional[float]:
    """A score for an event: 4 decimals, or None."""
    return None if v is None else round(float(v), 4)


class TrackEvidence:
    """The identity part of :class:`edged.daemon.track.Tracker` (a mixin: it shares the
    tracker's settings ``s``, ``live``, ``unknown_below``, ``keep_faces``, its tracks and its counters
    ``ambiguous``, ``splits`` and ``spoofs``, and makes events with the tracker's
    ``_event``, ``_end``, ``_new_track`` and ``_appear``)."""

    def observe(self, frame: Frame, pairs: List[Tuple[Track, Face]], matches: List[Match]) -> List[Event]:
        """Take the gallery's answers for the faces :meth:`update` asked to embed."""
        events = []
        t = frame.timestamp
        self._mono = self._monotonic(frame)
        for (tr, face), m in zip(pairs, matches):
            if tr not in self.tracks or face.embedding is None:
                continue
            events += self._observe_one(tr, face, m, t)
        return events

    def _observe_one(self, tr: Track, face: Face, m: Match, t: float) -> List[Event]:
        e = np.asarray(face.embedding, np.float32)
        q = float(face.quality.score) if face.quality is not None else 1.0
        w = max(q, 1e-3)
        tr.embeds += 1
        tr.since_embed = 0
        tr.best_embedded_quality = max(tr.best_embedded_quality, q)
        if self._disagrees(tr, e, m):
            tr.disagree += 1
            if tr.disagree < self.s.split_after:
                return []
            return self._split(tr, face, m, t)
        tr.disagree = 0
        tr.mean = e * w if tr.mean is None else tr.mean + e * w
        if self.keep_faces and face.aligned is not None:
            self._keep_crop(tr, face, e, q)
        if face.liveness is not None:
            tr.live_weight += w
            tr.live_sum += w * float(face.liveness)
        self._add_evidence(tr, m, w)
        return self._decide(tr, t)

    def _keep_crop(self, tr: Track, face: Face, e: np.ndarray, q: float) -> None:
        """Keep the face among the track's best ``keep_faces`` crops by quality (only faces
        that agree with the track: a split's faces go with the new track)."""
        passed = bool(face.quality.passed) if face.quality is not None else True
        tr.crops.append((q, face.aligned.copy(), e.copy(), passed))
        tr.crops.sort(key=lambda c: -c[0])
        del tr.crops[self.keep_faces:]

    def _disagrees(self, tr: Track, e: np.ndarray, m: Match) -> bool:
        """Whether embedding ``e`` (and its match ``m``) disagrees with the track so far: far
        from its mean, or, once recognized, someone else or clearly nobody enrolled."""
        s = self.s
        disagrees = False
        if tr.mean is not None:
            mean = tr.mean / max(float(np.linalg.norm(tr.mean)), 1e-9)
            sim = float(np.dot(mean, e))
            if sim < s.split_similarity:
                disagrees = True
            if tr.state == "recognized" and (
                    (m.identity is not None and m.identity != tr.identity)
                    or (m.identity is None and m.candidates and self.unknown_below is not None
                        and m.score < self.unknown_below)):
                disagrees = True  # someone else, or clearly nobody enrolled, in its place
        return disagrees

    def _split(self, tr: Track, face: Face, m: Match, t: float) -> List[Event]:
        """A new person in the old one's place: end the track, start a fresh one here."""
        self.splits += 1
        log.debug("camera %s: track %d split (its new faces disagree with its identity)",
                  self.camera, tr.id)
        events = self._end(tr, tr.last_time, "split")
        new = self._new_track(face, t)
        new.hits = tr.hits
        new.reported = True
        self.tracks[self.tracks.index(tr)] = new
        events.append(self._event("face_appeared", new, t))
        return events + self._observe_one(new, face, m, t)

    def _add_evidence(self, tr: Track, m: Match, w: float) -> None:
        """Add the match ``m`` of a face of quality weight ``w`` to the track's evidence: for
        its identity, for an unknown face, or (a near miss) ambiguous."""
        if m.identity is None and not m.candidates:
            # compared with nobody (no gallery in service, or an empty one): a stranger by
            # definition, with no score to report (null, not 0.0)
            tr.unknown_weight += w
            tr.unknown_count += 1
            return
        if tr.best_score is None or m.score > tr.best_score:
            tr.best_score = float(m.score)
        if m.identity is not None:
            tr.evidence[m.identity] = tr.evidence.get(m.identity, 0.0) + w
            tr.matches[m.identity] = tr.matches.get(m.identity, 0) + 1
            tr.names[m.identity] = m.name
            best = tr.best.get(m.identity)
            if best is None or m.score > best[0]:
                tr.best[m.identity] = (float(m.score), float(m.margin))
        else:
            if tr.best_miss is None or m.score > tr.best_miss[0]:
                tr.best_miss = (float(m.score), None if m.margin is None else float(m.margin))
            if self.unknown_below is not None and m.score >= self.unknown_below:
                # a near miss: neither this person nor surely a stranger; it holds back "unknown"
                self.ambiguous += 1
                tr.ambiguous_weight += w
            else:
                tr.unknown_weight += w
                tr.unknown_count += 1

    def _liveness(self, tr: Track) -> Optional[dict]:
        """``{"score", "live"}`` of the track when the stage is on, else None."""
        if self.live is None:
            return None
        score = tr.liveness
        return {"score": rounded(score), "live": verdict(score, self.live.threshold)}

    def _recognize(self, tr: Track, ident: str, t: float) -> List[Event]:
        """The identity evidence is enough: ``recognized`` unless liveness forbids it."""
        live = self._liveness(tr)
        score, margin = tr.best[ident]
        kw = dict(name=tr.names[ident], identity=ident, score=round(score, 4),
                  margin=round(margin, 4), liveness=live)
        if live is not None and self.live.require and live["live"] is not True:
            if live["live"] is None:
                return []  # not scored yet (faces too small): wait for a face that can be
            tr.state = "spoof"  # never recognized; its track_ended names nobody
            self.spoofs += 1
            log.debug("camera %s: track %d: liveness %.3f below %.3f: spoof suspected",
                      self.camera, tr.id, live["score"], self.live.threshold)
            return self._appear(tr, t) + [self._event("spoof_suspected", tr, t, **kw)]
        tr.state = "recognized"
        tr.identity, tr.name = ident, tr.names[ident]
        return self._appear(tr, t) + [self._event("recognized", tr, t, **kw)]

    def _decide(self, tr: Track, t: float) -> List[Event]:
        s = self.s
        if tr.state in ("recognized", "spoof"):
            return []
        total = sum(tr.evidence.values()) + tr.unknown_weight + tr.ambiguous_weight
        if tr.evidence:
            ident = max(tr.evidence, key=tr.evidence.get)
            ev = tr.evidence[ident]
            if (ev >= s.recognize_evidence and tr.matches[ident] >= s.min_matches
                    and ev >= s.min_agreement * total):
                return self._recognize(tr, ident, t)
        if (not tr.unknown_sent and tr.unknown_weight >= s.unknown_evidence
                and tr.unknown_count >= s.min_unknown
                and tr.unknown_weight >= s.min_agreement * total):
            tr.state = "unknown"
            tr.unknown_sent = True
            pre = self._appear(tr, t)
            # the score and margin of the same match: the best of those that named nobody
            # (none when the track was compared with nobody)
            score, margin = tr.best_miss or (None, None)
            return pre + [self._event("unknown", tr, t, score=rounded(score),
                                      margin=rounded(margin))]
        return []
