"""Per-camera face tracking, evidence accumulation and the events of a track's life.

A :class:`Tracker` (one per camera) links the faces detected in successive frames by box
overlap (IoU, greedy, best pairs first).  It does not run models: ``update()`` says which
faces of which tracks are worth embedding (a track's best-quality faces, not every frame's:
the first good one, a clearly better one, then one every ``embed_every`` detections to keep
checking that the same person is still there); the daemon embeds and matches those and
hands the answers to ``observe()``.

Identity is decided by evidence, not by one frame.  Each matched embedding adds its face's
quality score to its identity's evidence; a track is *recognized* (one ``recognized`` event
per track) once an identity has at least ``recognize_evidence`` of it from at least
``min_matches`` embeddings, and at least ``min_agreement`` of all the track's evidence (near
misses included: a look-alike who scores just under the threshold for minutes is not named by
the two frames that happened to pass it).  Embeddings that match nobody by a clear distance
(best score below the match threshold minus ``unknown_margin``) add to the *unknown* evidence;
near misses add to neither, but weigh against both decisions.  An embedding compared with
nobody (a :class:`Match` without candidates: no gallery in service, or an empty one) is
evidence of an unknown face with no score: its events carry ``score``/``margin`` None.
``unknown_evidence`` of it from at least ``min_unknown`` embeddings, and at least
``min_agreement`` of all the track's evidence (near misses included), confirms the track as
``unknown`` (once).  Faces whose quality does not pass the minimums are tracked and
reported (``face_appeared``, ``track_ended``) but never embedded, so they can never be
recognized.

Boxes are not identity:

- a *scene cut* (a large change of the colour histogram or of the pixels between two frames)
  or a gap in the frames (a reconnected stream) ends every track: nothing is inherited;
- a track keeps the quality-weighted mean of its embeddings; ``split_after`` embeddings in a
  row that disagree with it (cosine below ``split_similarity``, a confident match to another
  identity, or, once recognized, a clear non-match) end the track and start a new one at the
  same place, with no name.

Liveness, when the stage is on (:mod:`edged.vision.liveness`), is evidence too: each embedded face
with a liveness score adds it, weighted by the face's quality, to the track's liveness (the
weighted mean; unknown while no face was scored).  ``recognized`` events carry it as
``liveness: {score, live}``.  With ``liveness.require`` a track whose identity evidence is
enough but whose liveness is below the threshold gets one ``spoof_suspected`` event (with the
best match, for the audit trail) and is never recognized; one whose liveness is unknown waits.

Events: ``face_appeared`` (once a track has been seen ``min_hits`` times), ``recognized``,
``unknown``, ``spoof_suspected``, ``track_ended`` (duration and best match score), all
:class:`edged.types.Event`.
"""
from __future__ import annotations

import itertools
import logging
import uuid
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import cv2
import numpy as np

from edged.daemon.evidence import TrackEvidence, rounded
from edged.vision.liveness import LivenessSettings
from edged.vision.motion import thumbnail
from edged.types import Event, Face, Frame

log = logging.getLogger("edged.track")


@dataclass
class TrackingSettings:
    detect_every: int = field(default=3, metadata={
        "min": 1, "max": 100, "help": "run the full detection (the P-Net pyramid) on every "
                                      "Nth frame; on the frames between, each live track is "
                                      "refined by R-Net and O-Net around its predicted box "
                                      "(new faces appear at the next full detection); 1 = "
                                      "full detection on every frame"})
    iou_threshold: float = field(default=0.3, metadata={
        "min": 0.01, "max": 0.99, "help": "least box overlap (IoU) for a detection to continue "
                                          "a track"})
    min_hits: int = field(default=2, metadata={
        "min": 1, "max": 100, "help": "detections before a track is reported (face_appeared)"})
    max_missed: int = field(default=8, metadata={
        "min": 0, "max": 1000, "help": "detection rounds a track may go unseen before it ends"})
    embed_every: int = field(default=5, metadata={
        "min": 1, "max": 1000, "help": "a decided track is re-embedded every N detections (to "
                                       "catch a new person stepping into its place); undecided "
                                       "tracks are embedded at every good detection"})
    quality_gain: float = field(default=0.05, metadata={
        "min": 0.0, "max": 1.0, "help": "re-embed a decided track sooner when its face quality "
                                        "beats its best embedded one by this much"})
    recognize_evidence: float = field(default=1.0, metadata={
        "min": 0.0, "max": 1000.0, "help": "quality-weighted matches an identity needs before "
                                           "the track is recognized"})
    min_matches: int = field(default=2, metadata={
        "min": 1, "max": 1000, "help": "matched embeddings needed to recognize"})
    min_agreement: float = field(default=0.6, metadata={
        "min": 0.0, "max": 1.0, "help": "share of the track's evidence that must be for the "
                                        "identity"})
    unknown_evidence: float = field(default=1.5, metadata={
        "min": 0.0, "max": 1000.0, "help": "quality-weighted non-matches before the track is "
                                           "confirmed unknown"})
    min_unknown: int = field(default=3, metadata={
        "min": 1, "max": 1000, "help": "non-matching embeddings needed to confirm unknown"})
    unknown_margin: float = field(default=0.15, metadata={
        "min": 0.0, "max": 2.0, "help": "an embedding counts as evidence of an unknown face only "
                                        "when its best score is below match.threshold minus "
                                        "this; nearer misses are ambiguous and count for nothing"})
    split_similarity: float = field(default=0.3, metadata={
        "min": -1.0, "max": 1.0, "help": "a new embedding whose cosine similarity to the track's "
                                         "mean is below this disagrees with the track"})
    split_after: int = field(default=2, metadata={
        "min": 1, "max": 100, "help": "disagreeing embeddings in a row that split the track"})
    scene_cut_correlation: float = field(default=0.8, metadata={
        "min": 0.0, "max": 1.0, "help": "a colour-histogram correlation between two frames below "
                                        "this is a scene cut (ends all tracks); 0 = off"})
    scene_cut_difference: float = field(default=40.0, metadata={
        "min": 0.0, "max": 255.0, "help": "a mean absolute grey-level change above this is a "
                                          "scene cut; 0 = off"})
    max_gap: float = field(default=10.0, metadata={
        "min": 0.0, "max": 3600.0, "help": "seconds between two processed frames of a camera "
                                           "(monotonic clock) above which all its tracks end, "
                                           "also while the camera sends nothing; 0 = off (a "
                                           "reconnected source always ends them)"})
    max_tracks: int = field(default=32, metadata={
        "min": 1, "max": 1000, "help": "most tracks per camera (the smallest faces are ignored "
                                       "beyond it)"})


class Refined(list):
    """Faces of the live tracks refined around their predicted boxes between two full
    detections (what :meth:`Tracker.update` takes with ``refined``)."""


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in ``a`` (N x 4) with every box in ``b`` (M x 4)."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)), np.float32)
    a = np.asarray(a, np.float32)[:, None, :]
    b = np.asarray(b, np.float32)[None, :, :]
    iw = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    ih = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = iw * ih
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    return inter / np.maximum(area_a + area_b - inter, 1e-6)


class SceneCutDetector:
    """Compares each frame with the previous one on a 64 x 36 thumbnail."""

    def __init__(self, correlation: float, difference: float):
        self.correlation = correlation
        self.difference = difference
        self._hist = None
        self._gray = None

    def reset(self) -> None:
        self._hist = self._gray = None

    def is_cut(self, image: np.ndarray) -> bool:
        if not self.correlation and not self.difference:
            return False
        small = thumbnail(image, 64, 36)
        hsv = cv2.cvtColor(small, cv2.COLOR_BGR2HSV)
        hist = cv2.calcHist([hsv], [0, 1], None, [16, 8], [0, 180, 0, 256])
        cv2.normalize(hist, hist)
        gray = cv2.cvtColor(small, cv2.COLOR_BGR2GRAY).astype(np.float32)
        cut = False
        if self._hist is not None:
            corr = cv2.compareHist(self._hist, hist, cv2.HISTCMP_CORREL)
            diff = float(np.mean(np.abs(gray - self._gray)))
            cut = ((self.correlation > 0 and corr < self.correlation)
                   or (self.difference > 0 and diff > self.difference))
        self._hist, self._gray = hist, gray
        return cut


@dataclass(eq=False)  # compared by identity
class Track:
    id: int
    box: np.ndarray
    first_time: float  # wall-clock time of the first and last sighting (event times)
    last_time: float
    face: Optional[Face] = None  # latest detection
    hits: int = 1
    missed: int = 0
    reported: bool = False  # face_appeared sent
    state: str = "pending"  # pending | recognized | unknown | spoof
    name: Optional[str] = None
    identity: Optional[str] = None
    evidence: Dict[str, float] = field(default_factory=dict)
    matches: Dict[str, int] = field(default_factory=dict)
    names: Dict[str, str] = field(default_factory=dict)
    best: Dict[str, Tuple[float, float]] = field(default_factory=dict)  # identity -> (score, margin)
    unknown_weight: float = 0.0
    unknown_count: int = 0
    unknown_sent: bool = False
    ambiguous_weight: float = 0.0
    embeds: int = 0
    since_embed: int = 0
    best_embedded_quality: float = -1.0
    mean: Optional[np.ndarray] = None  # quality-weighted sum of agreeing embeddings
    disagree: int = 0
    best_score: Optional[float] = None
    # the best match that named nobody, as (score, margin) of that one match: the unknown event's
    best_miss: Optional[tuple] = None
    best_quality: float = 0.0
    live_weight: float = 0.0  # quality weights of the faces with a liveness score
    live_sum: float = 0.0  # ... and the sum of weight * score
    velocity: Optional[np.ndarray] = None  # box change per second (constant-velocity prediction)
    # monotonic clock of the first and last sighting: durations and gaps, immune to clock steps
    first_mono: float = 0.0
    last_mono: float = 0.0
    # the best crops by quality, (quality, aligned, embedding, passed): enrolment.keep_faces
    crops: list = field(default_factory=list)

    @property
    def decided(self) -> bool:
        return (self.state in ("recognized", "spoof")
                or (self.state == "unknown" and self.embeds >= 1))

    @property
    def liveness(self) -> Optional[float]:
        """The quality-weighted mean liveness of its scored faces; None when none was."""
        return self.live_sum / self.live_weight if self.live_weight > 0 else None


class Tracker(TrackEvidence):
    """The tracks of one camera; see the module's documentation.

    This class follows the faces from frame to frame (:meth:`update`); what the gallery's
    answers mean for a track's identity (:meth:`observe`) is its mixin
    :class:`~edged.daemon.evidence.TrackEvidence`."""

    _ids = itertools.count(1)  # track ids are unique in the process, across cameras and cuts

    def __init__(self, camera: str, settings: Optional[TrackingSettings] = None,
                 match_threshold: Optional[float] = None,
                 liveness: Optional[LivenessSettings] = None, keep_faces: int = 0):
        self.camera = camera
        self.keep_faces = keep_faces  # crops kept per track for enrolment (0: none)
        self.s = settings or TrackingSettings()
        self.live = liveness if liveness is not None and liveness.enabled else None
        self.spoofs = 0
        # below this best score an unmatched embedding is evidence of a stranger
        self.unknown_below = (None if match_threshold is None
                              else match_threshold - self.s.unknown_margin)
        self.ambiguous = 0
        self.tracks: List[Track] = []
        self.cuts = SceneCutDetector(self.s.scene_cut_correlation, self.s.scene_cut_difference)
        self._frames = 0
        self._last_mono: Optional[float] = None  # monotonic time of the last frame
        self._mono = 0.0  # monotonic time of the frame being handled
        self.scene_cuts = 0
        self.splits = 0

    # -- helpers

    def _event(self, type_: str, track: Track, t: float, **kw) -> Event:
        face = track.face
        box = [round(float(v), 1) for v in track.box]
        q = kw.pop("quality", None)
        if q is None and face is not None and face.quality is not None:
            q = round(float(face.quality.score), 4)
        return Event(id=uuid.uuid4().hex, type=type_, camera=self.camera, track_id=track.id,
                     frame_time=t, box=box, quality=q, **kw)

    def _new_track(self, face: Face, t: float) -> Track:
        tr = Track(id=next(self._ids), box=np.asarray(face.box, np.float32).copy(), first_time=t,
                   last_time=t, face=face, first_mono=self._mono, last_mono=self._mono)
        if face.quality is not None:
            tr.best_quality = float(face.quality.score)
        return tr

    def _end(self, track: Track, t: float, why: str) -> List[Event]:
        if not track.reported:
            return []
        log.debug("camera %s: track %d ends (%s)", self.camera, track.id, why)
        return [self._event("track_ended", track, track.last_time,
                            name=track.name, identity=track.identity,
                            duration=round(max(0.0, track.last_mono - track.first_mono), 3),
                            best_score=rounded(track.best_score),
                            quality=round(track.best_quality, 4), kept=self._kept(track))]

    def _kept(self, track: Track) -> Optional[dict]:
        """What enrolment keeps of an ended track (None when off or nothing was embedded)."""
        if not self.keep_faces or not track.crops:
            return None
        return {"state": track.state, "started": track.first_time, "crops": list(track.crops)}

    def _appear(self, tr: Track, t: float) -> List[Event]:
        if tr.reported:
            return []
        tr.reported = True
        return [self._event("face_appeared", tr, t)]

    def predicted_boxes(self, mono: float) -> np.ndarray:
        """The live tracks' boxes (N x 4) extrapolated to monotonic time ``mono`` at their
        last velocity: where to refine them between full detections.  Safe to call from
        another thread than :meth:`update`'s (it reads a snapshot of the tracks)."""
        out = []
        for tr in list(self.tracks):
            box, v = tr.box, tr.velocity
            dt = min(max(0.0, mono - tr.last_mono), 1.0)
            out.append(box if v is None else box + v * dt)
        return np.array(out, np.float32).reshape(-1, 4)

    def is_detection_frame(self) -> bool:
        """Whether the next frame given to :meth:`update` should be run through detection."""
        return self._frames % self.s.detect_every == 0

    # -- the frame loop

    def end_all(self, t: Optional[float] = None, why: str = "stop") -> List[Event]:
        events = []
        for tr in self.tracks:
            events += self._end(tr, t if t is not None else tr.last_time, why)
        self.tracks = []
        return events

    def reset(self, why: str = "reset") -> List[Event]:
        """End every track and forget the previous frame (a reconnected or replaced source)."""
        events = self.end_all(why=why)
        self.cuts.reset()
        self._last_mono = None
        return events

    @property
    def last_frame_monotonic(self) -> Optional[float]:
        """The monotonic capture time of the last frame given to :meth:`update` (None before
        the first, and after a reset)."""
        return self._last_mono

    def expire(self, now: float) -> List[Event]:
        """End every track when no frame has come for ``max_gap`` seconds by ``now`` (monotonic).

        A frame gap is otherwise noticed only when the next frame arrives; the daemon calls
        this while a camera sends nothing, so that its tracks end on time.
        """
        last = self._last_mono
        if not self.tracks or last is None or not self.s.max_gap or now - last <= self.s.max_gap:
            return []
        return self.reset("no frames for %.1f s" % (now - last))

    @staticmethod
    def _monotonic(frame: Frame) -> float:
        # frames from edged's capture carry time.monotonic(); frames made elsewhere may not
        return frame.monotonic if frame.monotonic else frame.timestamp

    def update(self, frame: Frame, faces: Optional[List[Face]],
               refined: bool = False) -> Tuple[List[Event], List[Tuple[Track, Face]]]:
        """Take one frame's detections (``None`` when detection did not run on it).

        ``refined``: the faces are the live tracks refined around their predicted boxes
        (:meth:`predicted_boxes`), not a full detection: they only continue tracks, a track
        with no face there is not counted as missed (the next full detection decides), and a
        refined face is embedded only when it beats the track's best embedded quality by
        ``quality_gain`` (the evidence otherwise comes at the pace of full detections, so
        that a poor face, embedded at every frame, does not pile up chance matches).

        Returns the events it causes and the ``(track, face)`` pairs to embed and match.
        """
        t = frame.timestamp
        mono = self._mono = self._monotonic(frame)
        self._frames += 1
        events = self._check_gap(mono)
        events += self._check_cut(frame, t, detected=faces is not None)
        if faces is None:
            return events, []
        faces = sorted(faces, key=lambda f: -f.width * f.height)[: self.s.max_tracks]
        pairs = self._match(faces)
        events += self._drop_missed(pairs, t, refined)
        if not refined:
            pairs += self._start_tracks(faces, pairs, t)
        to_embed = []
        for tr, f in pairs:
            if tr.face is not f:  # an existing track seen again
                self._follow(tr, f, t, mono)
            events += self._count_face(tr, f, t)
            tr.since_embed += 1
            if self._worth_embedding(tr, f, refined):
                to_embed.append((tr, f))
        return events, to_embed

    def _check_gap(self, mono: float) -> List[Event]:
        """A gap of more than ``max_gap`` seconds since the last frame ends every track."""
        s = self.s
        events: List[Event] = []
        if self._last_mono is not None and s.max_gap and mono - self._last_mono > s.max_gap:
            events += self.reset("gap of %.1f s between frames" % (mono - self._last_mono))
        self._last_mono = mono
        return events

    def _check_cut(self, frame: Frame, t: float, detected: bool) -> List[Event]:
        """A scene cut since the previous frame ends every track."""
        if not detected and not self.tracks:
            # nothing a cut could end (a calm scene, motion gating): skip the check; the next
            # frame is not compared with this one
            self.cuts.reset()
        elif self.cuts.is_cut(frame.image):
            self.scene_cuts += 1
            if self.tracks:
                log.debug("camera %s: scene cut at frame %d: ending %d track(s)", self.camera,
                          frame.index, len(self.tracks))
            return self.end_all(t, "scene cut")
        return []

    def _match(self, faces: List[Face]) -> List[Tuple[Track, Face]]:
        """``(track, face)`` pairs by box overlap: greedy, best IoU first, at least
        ``iou_threshold``."""
        s = self.s
        boxes = np.array([np.asarray(f.box, np.float32) for f in faces]).reshape(-1, 4)
        iou = iou_matrix(np.array([tr.box for tr in self.tracks]).reshape(-1, 4), boxes)
        pairs = []
        if iou.size:
            order = np.dstack(np.unravel_index(np.argsort(-iou, axis=None), iou.shape))[0]
            used_t, used_f = set(), set()
            for ti, fi in order:
                if iou[ti, fi] < s.iou_threshold:
                    break
                if ti in used_t or fi in used_f:
                    continue
                used_t.add(ti)
                used_f.add(fi)
                pairs.append((self.tracks[ti], faces[fi]))
        return pairs

    def _drop_missed(self, pairs: List[Tuple[Track, Face]], t: float,
                     refined: bool) -> List[Event]:
        """Count a miss for each track without a face (not after a refinement); end the tracks
        missed more than ``max_missed`` times in a row."""
        s = self.s
        events: List[Event] = []
        matched_t = {id(tr) for tr, _ in pairs}
        survivors = []
        for tr in self.tracks:
            if id(tr) in matched_t or refined:
                survivors.append(tr)
                continue
            tr.missed += 1
            if tr.missed > s.max_missed:
                events += self._end(tr, t, "lost")
            else:
                survivors.append(tr)
        self.tracks = survivors
        return events

    def _start_tracks(self, faces: List[Face], pairs: List[Tuple[Track, Face]],
                      t: float) -> List[Tuple[Track, Face]]:
        """A new track for each face without one, up to ``max_tracks``; their pairs."""
        matched_f = {id(f) for _, f in pairs}
        new = []
        for f in faces:
            if id(f) not in matched_f and len(self.tracks) < self.s.max_tracks:
                tr = self._new_track(f, t)
                self.tracks.append(tr)
                new.append((tr, f))
        return new

    @staticmethod
    def _follow(tr: Track, f: Face, t: float, mono: float) -> None:
        """An existing track seen again: its new box, and its velocity (smoothed)."""
        tr.hits += 1
        tr.missed = 0
        tr.face = f
        box = np.asarray(f.box, np.float32).copy()
        if mono > tr.last_mono:
            v = (box - tr.box) / (mono - tr.last_mono)
            tr.velocity = v if tr.velocity is None else 0.5 * (v + tr.velocity)
        tr.box = box
        tr.last_time = t
        tr.last_mono = mono

    def _count_face(self, tr: Track, f: Face, t: float) -> List[Event]:
        """The track's best quality; ``face_appeared`` once it has been seen ``min_hits`` times."""
        q = f.quality
        if q is not None:
            tr.best_quality = max(tr.best_quality, float(q.score))
        if not tr.reported and tr.hits >= self.s.min_hits:
            tr.reported = True
            return [self._event("face_appeared", tr, t)]
        return []

    def _worth_embedding(self, tr: Track, f: Face, refined: bool) -> bool:
        """Whether to embed this face of the track (see :meth:`update`): it passes the quality
        minimums, and it beats the best embedded one by ``quality_gain``, or (a full
        detection) the track has no embedding yet, is undecided, or is due one."""
        s = self.s
        q = f.quality
        if q is None or not q.passed:
            return False
        qs = float(q.score)
        better = qs >= tr.best_embedded_quality + s.quality_gain
        return better or (not refined and (tr.embeds == 0 or not tr.decided
                                           or tr.since_embed >= s.embed_every))
