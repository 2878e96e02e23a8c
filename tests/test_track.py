"""Tracking: one recognition per track, evidence, unknowns, scene cuts, splits, track ends."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from edged.daemon.track import SceneCutDetector, Tracker, TrackingSettings, iou_matrix
from edged.types import Face, Frame, Match, Quality

RNG = np.random.default_rng(5)


def unit(v):
    v = np.asarray(v, np.float32)
    return v / np.linalg.norm(v)


ALICE = unit(RNG.normal(size=192))
BOB = unit(RNG.normal(size=192))
GALLERY = {"alice": ALICE, "bob": BOB}
THRESHOLD = 0.36


def near(base, noise=0.3):
    return unit(base + noise * unit(RNG.normal(size=192)))


def face(box, quality=0.9, passed=True):
    box = np.asarray(box, np.float32)
    return Face(box=box, score=0.99, landmarks=np.zeros((5, 2), np.float32),
                quality=Quality(size_px=float(box[2] - box[0]), sharpness=200.0, frontal=0.9,
                                score=quality, passed=passed))


def match(e):
    scores = {k: float(np.dot(v, e)) for k, v in GALLERY.items()}
    best = sorted(scores.items(), key=lambda kv: -kv[1])
    (n1, s1), (_, s2) = best[0], best[1]
    ok = s1 >= THRESHOLD
    return Match(name=n1 if ok else None, identity=n1 if ok else None, score=s1, margin=s1 - s2,
                 candidates=best)


def miss(score, margin):
    """A match that named nobody, from a gallery that holds alice (a candidate)."""
    return Match(name=None, identity=None, score=score, margin=margin,
                 candidates=[("alice", score)])


class Scene:
    """Drives a Tracker the way the daemon does, with an embedding per face given by ``who``."""

    def __init__(self, settings=None, image=None):
        self.t = Tracker("cam", settings or TrackingSettings())
        self.i = 0
        self.image = image if image is not None else np.full((90, 160, 3), 120, np.uint8)
        self.events = []
        self.embedded = 0

    def step(self, faces_who, image=None):
        fr = Frame(camera="cam", index=self.i, timestamp=1000.0 + self.i / 30.0,
                   image=self.image if image is None else image)
        self.i += 1
        faces = None
        if faces_who is not None:
            faces = [f for f, _ in faces_who]
            who = {id(f): w for f, w in faces_who}
        evs, todo = self.t.update(fr, faces)
        for _, f in todo:
            f.embedding = who[id(f)]()
        self.embedded += len(todo)
        evs += self.t.observe(fr, todo, [match(f.embedding) for _, f in todo])
        self.events += evs
        return evs

    def types(self):
        return [(e.type, e.track_id, e.name) for e in self.events]

    def finish(self):
        self.events += self.t.end_all()


def test_iou_matrix():
    a = np.array([[0, 0, 10, 10], [20, 20, 30, 30]], np.float32)
    b = np.array([[0, 0, 10, 10], [5, 0, 15, 10]], np.float32)
    m = iou_matrix(a, b)
    assert m[0, 0] == pytest.approx(1.0)
    assert m[0, 1] == pytest.approx(50 / 150)
    assert m[1].max() == 0
    assert iou_matrix(np.zeros((0, 4)), b).shape == (0, 2)


def test_one_person_for_30_seconds_is_one_recognition():
    s = Scene()
    for k in range(900):  # 30 s at 30 fps, standing still with a little jitter
        j = (k % 3) - 1
        s.step([(face([50 + j, 20, 90 + j, 60]), lambda: near(ALICE))])
    s.finish()
    types = [e.type for e in s.events]
    assert types.count("recognized") == 1
    assert types == ["face_appeared", "recognized", "track_ended"]
    rec = s.events[1]
    assert rec.name == "alice" and rec.score >= THRESHOLD and rec.margin > 0
    end = s.events[-1]
    assert end.duration == pytest.approx(899 / 30, abs=1e-3)
    assert end.best_score >= rec.score and end.name == "alice"
    # the best-quality faces, not every frame's: first ones until decided, then 1 in 5
    assert s.embedded < 900 / 5 + 10


def test_evidence_needs_several_matches():
    s = Scene(TrackingSettings(min_matches=3, recognize_evidence=2.0))
    evs = []
    for _ in range(2):
        evs += s.step([(face([10, 10, 50, 50]), lambda: near(ALICE))])
    assert [e.type for e in evs] == ["face_appeared"]  # 2 matches: not enough yet
    evs = s.step([(face([10, 10, 50, 50]), lambda: near(ALICE))])
    assert [e.type for e in evs] == ["recognized"]


def test_quality_weighting():
    # at quality 0.3 each match adds 0.3 of evidence: 1.0 needs 4 of them
    s = Scene(TrackingSettings(recognize_evidence=1.0, min_matches=1, min_hits=1))
    n = 0
    while not any(e.type == "recognized" for e in s.events):
        s.step([(face([10, 10, 50, 50], quality=0.3), lambda: near(ALICE))])
        n += 1
    assert n == 4


def test_low_quality_faces_are_never_embedded_or_named():
    s = Scene()
    for _ in range(60):
        s.step([(face([10, 10, 30, 30], quality=0.2, passed=False), lambda: near(ALICE))])
    s.finish()
    assert s.embedded == 0
    assert [e.type for e in s.events] == ["face_appeared", "track_ended"]
    assert s.events[-1].name is None and s.events[-1].best_score is None


def test_stranger_is_confirmed_unknown_once():
    stranger = unit(RNG.normal(size=192))
    s = Scene()
    for _ in range(100):
        s.step([(face([10, 10, 50, 50]), lambda: near(stranger, 0.2))])
    s.finish()
    types = [e.type for e in s.events]
    assert types == ["face_appeared", "unknown", "track_ended"]
    assert s.events[1].name is None and s.events[1].score < THRESHOLD


def test_scene_cut_ends_tracks_and_nothing_is_inherited():
    a = np.full((90, 160, 3), 40, np.uint8)
    b = np.zeros((90, 160, 3), np.uint8)
    b[:, :, 2] = 220  # a different shot: other colours
    s = Scene(image=a)
    box = [50, 20, 90, 60]
    for _ in range(10):
        s.step([(face(box), lambda: near(ALICE))])
    assert [e.type for e in s.events] == ["face_appeared", "recognized"]
    # the cut: a stranger at exactly the same place
    stranger = unit(RNG.normal(size=192))
    for _ in range(10):
        s.step([(face(box), lambda: near(stranger, 0.2))], image=b)
    s.finish()
    t = s.types()
    first = s.events[0].track_id
    assert t[2] == ("track_ended", first, "alice")  # ended at the cut
    later = [e for e in s.events[3:]]
    assert all(e.track_id != first for e in later)
    assert all(e.name is None for e in later)
    assert "unknown" in [e.type for e in later]
    assert s.t.scene_cuts == 1


def test_new_person_in_the_same_place_splits_the_track():
    s = Scene()
    box = [50, 20, 90, 60]
    for _ in range(20):
        s.step([(face(box), lambda: near(ALICE))])
    # no cut (same image): Bob steps into Alice's place
    for _ in range(30):
        s.step([(face(box), lambda: near(BOB))])
    s.finish()
    rec = [e for e in s.events if e.type == "recognized"]
    assert [e.name for e in rec] == ["alice", "bob"]
    assert rec[0].track_id != rec[1].track_id
    ended = [e for e in s.events if e.type == "track_ended"]
    assert [e.name for e in ended] == ["alice", "bob"]
    assert s.t.splits == 1


def test_lost_track_ends_after_max_missed():
    s = Scene(TrackingSettings(max_missed=3))
    for _ in range(5):
        s.step([(face([10, 10, 50, 50]), lambda: near(ALICE))])
    for _ in range(3):
        s.step([])
    assert "track_ended" not in [e.type for e in s.events]
    s.step([])
    assert [e.type for e in s.events][-1] == "track_ended"


def test_detect_every_nth_frame_keeps_tracks():
    s = Scene(TrackingSettings(detect_every=3))
    for k in range(30):
        if s.t.is_detection_frame():
            s.step([(face([10, 10, 50, 50]), lambda: near(ALICE))])
        else:
            s.step(None)
    assert [e.type for e in s.events] == ["face_appeared", "recognized"]


def test_two_people_two_tracks():
    s = Scene()
    for _ in range(10):
        s.step([(face([10, 10, 50, 50]), lambda: near(ALICE)),
                (face([100, 10, 140, 50]), lambda: near(BOB))])
    names = sorted(e.name for e in s.events if e.type == "recognized")
    assert names == ["alice", "bob"]


def test_scene_cuts_of_the_real_clip(shared_dir):
    """The Hamilton clip has three cuts (frames 20, 82 and 211); nothing else is a cut."""
    det = SceneCutDetector(TrackingSettings().scene_cut_correlation,
                           TrackingSettings().scene_cut_difference)
    cap = cv2.VideoCapture(str(shared_dir / "videos/facerec_short_hamilton_clip.mp4"))
    cuts, i = [], 0
    while True:
        ok, img = cap.read()
        if not ok:
            break
        if det.is_cut(img):
            cuts.append(i)
        i += 1
    assert cuts == [20, 82, 211]


def test_near_misses_are_neither_a_name_nor_unknown():
    """With the match threshold known, embeddings just below it (a small or blurred face of an
    enrolled person) hold back "unknown"; clear misses (a stranger) confirm it."""
    t = Tracker("cam", TrackingSettings(), match_threshold=0.58)
    img = np.full((90, 160, 3), 120, np.uint8)
    events = []
    box = [10, 10, 50, 50]
    for i in range(30):
        fr = Frame(camera="cam", index=i, timestamp=float(i), image=img)
        evs, todo = t.update(fr, [face(box)])
        for _, f in todo:
            f.embedding = ALICE
        # alternate a near miss (0.50) and a clear miss (0.30): the near misses weigh against
        # "unknown", so it is never confirmed
        score = 0.50 if i % 3 else 0.30
        evs += t.observe(fr, todo, [miss(score, score) for _ in todo])
        events += evs
    assert [e.type for e in events] == ["face_appeared"]
    assert t.ambiguous > 0
    # the same clear misses alone confirm a stranger
    t2 = Tracker("cam", TrackingSettings(), match_threshold=0.58)
    events = []
    for i in range(10):
        fr = Frame(camera="cam", index=i, timestamp=float(i), image=img)
        evs, todo = t2.update(fr, [face(box)])
        for _, f in todo:
            f.embedding = ALICE
        evs += t2.observe(fr, todo, [miss(0.30, 0.30) for _ in todo])
        events += evs
    assert [e.type for e in events] == ["face_appeared", "unknown"]


def _drive(tracker, n, embed_and_match, start=0):
    """Run ``n`` frames of one face in one place; ``embed_and_match(i)`` -> (embedding, Match)."""
    events = []
    img = np.full((90, 160, 3), 120, np.uint8)
    for i in range(start, start + n):
        fr = Frame(camera="cam", index=i, timestamp=1000.0 + i / 30.0, image=img)
        evs, todo = tracker.update(fr, [face([10, 10, 50, 50], quality=0.7)])
        answers = []
        for _, f in todo:
            f.embedding, m = embed_and_match(i)
            answers.append(m)
        events += evs + tracker.observe(fr, todo, answers)
    return events


def _at_cosine(base, c, other):
    """A unit vector whose cosine with ``base`` is exactly ``c`` (``other``: any direction)."""
    r = unit(other - np.dot(other, base) * base)
    return unit(c * base + np.sqrt(1 - c * c) * r)


def test_a_look_alike_is_not_named_by_two_lucky_frames():
    """Scores just under the threshold for 10 s, twice just over it: near misses weigh against
    a name, so the two lucky frames are not enough."""
    t = Tracker("cam", TrackingSettings(), match_threshold=0.58)
    other = unit(RNG.normal(size=192))

    def lookalike(i):
        c = 0.60 if i in (100, 200) else 0.50
        e = _at_cosine(ALICE, c, other)
        ok = c >= 0.58
        return e, Match(name="alice" if ok else None, identity="alice" if ok else None,
                        score=c, margin=0.2, candidates=[("alice", c)])

    events = _drive(t, 300, lookalike) + t.end_all()
    assert not [e for e in events if e.type == "recognized"], [(e.type, e.name) for e in events]
    assert all(e.name is None for e in events)


def test_a_clear_stranger_in_a_recognized_persons_place_is_split_off():
    """Alice is recognized; then someone who clearly matches nobody (score 0.35, under the
    threshold minus the unknown margin, yet 0.35 from her track's mean: no cosine split) stands
    in the same box. Her name must not cover the stranger's 9 seconds."""
    t = Tracker("cam", TrackingSettings(), match_threshold=0.58)
    other = unit(RNG.normal(size=192))

    def scene(i):
        if i < 30:
            return near(ALICE, 0.2), Match(name="alice", identity="alice", score=0.8, margin=0.3)
        e = _at_cosine(ALICE, 0.35, unit(other + 0.05 * RNG.normal(size=192)))
        return e, miss(0.35, 0.05)

    events = _drive(t, 300, scene) + t.end_all()
    assert t.splits == 1
    ended = [e for e in events if e.type == "track_ended"]
    assert [e.name for e in ended] == ["alice", None]
    assert ended[0].duration < 2.0, "alice's track must end when the stranger takes her place"
    assert [e.name for e in events if e.type == "recognized"] == ["alice"]
    assert [e.type for e in events if e.type == "unknown"] == ["unknown"]


def test_tracks_end_while_the_camera_sends_nothing():
    s = Scene(TrackingSettings(max_gap=5.0))
    for _ in range(10):
        s.step([(face([50, 20, 90, 60]), lambda: near(ALICE))])
    last = s.t.last_frame_monotonic
    assert last == pytest.approx(1000.0 + 9 / 30.0)
    assert s.t.expire(last + 4.9) == []  # not yet: within max_gap
    assert s.t.tracks
    ended = s.t.expire(last + 5.1)
    assert [e.type for e in ended] == ["track_ended"] and not s.t.tracks
    assert s.t.expire(last + 60) == []  # nothing left to end
    assert Tracker("cam", TrackingSettings(max_gap=0)).expire(1e9) == []  # 0 = off


def test_wall_clock_steps_neither_end_tracks_nor_give_negative_durations():
    # A Pi without a real-time clock: NTP sets the clock back an hour, then forward a day,
    # while the monotonic clock runs on at 30 fps.
    t = Tracker("cam", TrackingSettings(max_gap=2.0))
    events = []
    wall = [1000.0 + i / 30 for i in range(30)] + [-2600.0 + i / 30 for i in range(30)] \
        + [90000.0 + i / 30 for i in range(30)]
    for i, w in enumerate(wall):
        fr = Frame(camera="cam", index=i, timestamp=w, image=np.full((90, 160, 3), 120, np.uint8),
                   monotonic=50.0 + i / 30)
        evs, todo = t.update(fr, [face([50, 20, 90, 60])])
        for _, f in todo:
            f.embedding = near(ALICE)
        events += evs + t.observe(fr, todo, [match(f.embedding) for _, f in todo])
    events += t.end_all()
    assert [e.type for e in events].count("track_ended") == 1  # one track throughout
    end = events[-1]
    assert end.duration == pytest.approx(89 / 30, abs=1e-3)
    assert end.frame_time == wall[-1]  # event times stay wall-clock


def _one_face_frames(t, n, embedding, answer):
    """Feed ``t`` n frames (30 fps) of one still face whose embedding is ``embedding``,
    matched by ``answer(embedding)``; the events."""
    events = []
    for i in range(n):
        fr = Frame(camera="cam", index=i, timestamp=1000.0 + i / 30, image=np.full(
            (90, 160, 3), 120, np.uint8), monotonic=50.0 + i / 30)
        evs, todo = t.update(fr, [face([10, 10, 50, 50])])
        for _, f in todo:
            f.embedding = embedding
        events += evs + t.observe(fr, todo, [answer(f.embedding) for _, f in todo])
    return events


def test_unknown_reports_the_score_and_margin_of_one_match_that_named_nobody():
    """One frame scored 0.70 for Alice, the next ones clear misses: the track ends up unknown,
    and its event reports the best of the misses with that same match's margin, not the
    0.70 of a match that did name somebody beside the margin of another."""
    t = Tracker("cam", TrackingSettings(), match_threshold=0.58)
    seq = iter([Match("Alice", "alice", 0.70, 0.30)] + [miss(0.20, 0.02), miss(0.25, 0.05),
                                                          miss(0.10, 0.01)] * 3)
    events = _one_face_frames(t, 10, unit(np.ones(192)), lambda e: next(seq))
    unknown = [e for e in events if e.type == "unknown"]
    assert len(unknown) == 1 and (unknown[0].score, unknown[0].margin) == (0.25, 0.05)


def test_unknown_with_no_gallery_reports_null_score_and_margin(tmp_path):
    """No gallery in service (or an empty one): the holder answers every face with a match
    that compared with nobody. The unknown event and the track's end say null, not 0.0."""
    from edged.gallery import MatchSettings, decide
    from edged.ota.galleryholder import GalleryHolder

    holder = GalleryHolder(tmp_path / "none.edgal", "ab" * 32, watch=False,
                           snapshot_dir=tmp_path)
    assert holder.start() is None
    for answer in (lambda e: holder.match(e)[0], lambda e: decide([], MatchSettings())):
        t = Tracker("cam", TrackingSettings(), match_threshold=0.58)
        events = _one_face_frames(t, 10, ALICE, answer) + t.end_all()
        unknown = [e for e in events if e.type == "unknown"]
        assert len(unknown) == 1 and (unknown[0].score, unknown[0].margin) == (None, None)
        assert events[-1].type == "track_ended" and events[-1].best_score is None
    holder.stop()


# ---------------------------------------------------------------------------- liveness evidence


def _live_scene(live, scores, qualities=None):
    """alice at one place, each detection's face with the next liveness score of ``scores``."""
    from edged.vision.liveness import LivenessSettings

    s = Scene()
    s.t = Tracker("cam", TrackingSettings(), liveness=LivenessSettings(**live))
    for k, score in enumerate(scores):
        f = face([50, 20, 90, 60], quality=(qualities or [0.9] * len(scores))[k])
        f.liveness = score
        s.step([(f, lambda: near(ALICE))])
    s.finish()
    return s


def test_liveness_evidence_is_quality_weighted_like_identity():
    # 0.9 at quality 0.9 and 0.1 at quality 0.3: (0.81 + 0.03) / 1.2 = 0.7
    s = _live_scene({"enabled": True, "threshold": 0.75}, [0.9, 0.1], [0.9, 0.3])
    rec = [e for e in s.events if e.type == "recognized"]
    assert rec[0].liveness == {"score": 0.7, "live": False}  # reported, not enforced
    s = _live_scene({"enabled": True, "threshold": 0.65}, [0.9, 0.1], [0.9, 0.3])
    assert [e for e in s.events if e.type == "recognized"][0].liveness["live"] is True


def test_require_reports_spoof_evidence_as_spoof_suspected_never_recognized():
    s = _live_scene({"enabled": True, "threshold": 0.5, "require": True}, [0.1] * 60)
    types = [e.type for e in s.events]
    assert types == ["face_appeared", "spoof_suspected", "track_ended"]
    sus = s.events[1]
    assert sus.name == "alice" and sus.identity == "alice" and sus.score >= THRESHOLD
    assert sus.liveness == {"score": 0.1, "live": False}
    assert s.events[-1].name is None and s.events[-1].identity is None
    # a live track under the same settings is recognized, with its liveness
    s = _live_scene({"enabled": True, "threshold": 0.5, "require": True}, [0.9] * 10)
    assert [e.type for e in s.events] == ["face_appeared", "recognized", "track_ended"]
    assert s.events[1].liveness == {"score": 0.9, "live": True}


def test_require_waits_for_a_scored_face_then_decides():
    s = _live_scene({"enabled": True, "threshold": 0.5, "require": True},
                    [None] * 5 + [0.9] + [None] * 4)
    types = [e.type for e in s.events]
    assert types == ["face_appeared", "recognized", "track_ended"]
    assert s.events[1].liveness == {"score": 0.9, "live": True}


def test_liveness_off_leaves_events_as_they_were():
    s = _live_scene({"enabled": False, "require": True}, [0.0] * 5)
    assert [e.type for e in s.events] == ["face_appeared", "recognized", "track_ended"]
    assert all(e.liveness is None for e in s.events)


def test_refined_faces_continue_tracks_and_count_no_miss():
    """Between full detections the daemon refines the live tracks around their predicted
    boxes: those faces continue their tracks; a face refined nowhere near a track starts
    none, and a track not refined is not missed (the next full detection decides)."""
    s = Scene(TrackingSettings(max_missed=0, min_hits=1))
    s.step([(face([10, 10, 50, 50]), lambda: near(ALICE))])
    (tr,) = s.t.tracks
    evs, todo = s.t.update(Frame("cam", 1, 1000.1, s.image), [face([12, 10, 52, 50])], refined=True)
    assert s.t.tracks == [tr] and tr.hits == 2
    assert todo == []  # undecided, but no better than its embedded face: not embedded
    evs, todo = s.t.update(Frame("cam", 1, 1000.1, s.image), [face([12, 10, 52, 50], 0.97)],
                           refined=True)
    assert [t for t, _ in todo] == [tr]  # a clearly better face is
    s.t.update(Frame("cam", 2, 1000.2, s.image), [face([100, 10, 140, 50])], refined=True)
    assert s.t.tracks == [tr] and tr.missed == 0
    evs, _ = s.t.update(Frame("cam", 3, 1000.3, s.image), [])  # a full detection: lost
    assert s.t.tracks == [] and [e.type for e in evs] == ["track_ended"]


def test_predicted_boxes_extrapolate_the_velocity():
    s = Scene(TrackingSettings(min_hits=1))
    s.step([(face([10, 10, 50, 50]), lambda: near(ALICE))])  # t = 1000
    assert np.allclose(s.t.predicted_boxes(1000.5), [[10, 10, 50, 50]])  # no velocity yet
    s.t.update(Frame("cam", 1, 1000.1, s.image), [face([20, 10, 60, 50])])  # 100 px/s along x
    assert np.allclose(s.t.predicted_boxes(1000.2), [[30, 10, 70, 50]], atol=1e-3)
    assert np.allclose(s.t.predicted_boxes(1000.1), [[20, 10, 60, 50]])
    assert s.t.predicted_boxes(1000.2).shape == (1, 4)
    assert Tracker("x").predicted_boxes(5.0).shape == (0, 4)


def _hamilton_events(shared_dir, gallery, state, extra):
    from edged import config as configmod
    from edged.daemon.service import Daemon
    from edged.daemon.sdnotify import Notifier

    data = {"cameras": [{"name": "stage", "realtime": False,
                         "source": str(shared_dir / "videos" / "facerec_short_hamilton_clip.mp4")}],
            "match": {"threshold": 0.58},
            "paths": {"state_dir": str(state), "gallery": str(gallery)},
            "mqtt": {"enabled": False}, "logging": {"target": "stderr"}}
    cfg = configmod.build(configmod.Config, dict(data, **extra))
    d = Daemon(cfg, notifier=Notifier(address=""), exit_when_done=True)
    events = []
    d.events.hooks.append(lambda ev, lat: events.append(ev))
    d.start(camera_wait=30)
    assert d.run() == 0
    assert d.counters.frames_done_total == 275
    return events, d


def test_the_hamilton_clip_is_recognised_as_with_the_old_behaviour(shared_dir, tmp_path):
    """The defaults (detection at 640 px, motion gating, full detection every 3rd frame and
    the tracks refined between) against the old behaviour (``detect_width: 0``,
    ``motion.enabled: false``, ``tracking.detect_every: 1``) on the real clip: the same people
    recognised in the same number of events (exactly Lin-Manuel Miranda, once: see
    test_daemon_e2e), nobody else named, and no more tracks."""
    from edged_daemon_helpers import build_gallery

    gallery = build_gallery(shared_dir / "videos" / "hamilton_enrol", tmp_path / "h.edgal")
    old, _ = _hamilton_events(shared_dir, gallery, tmp_path / "s1", {
        "pipeline": {"detect_width": 0}, "motion": {"enabled": False},
        "tracking": {"detect_every": 1}})
    new, d = _hamilton_events(shared_dir, gallery, tmp_path / "s2", {})
    assert d.cfg.tracking.detect_every > 1 and d.cfg.motion.enabled
    assert d.cfg.pipeline.detect_width == 640

    def recognised(events):
        return [e.identity for e in events if e.type == "recognized"]

    def tracks(events):
        return {e.track_id for e in events if e.type == "face_appeared"}

    assert recognised(old) == recognised(new) == ["Lin-Manuel_Miranda"]
    for e in new:
        assert e.identity in (None, "Lin-Manuel_Miranda"), e
        assert e.name in (None, "Lin-Manuel Miranda"), e
    assert len(tracks(new)) <= len(tracks(old)), (len(tracks(new)), len(tracks(old)))
    assert d.counters.faces_embedded > 0


def test_no_scene_cut_check_without_tracks_or_detection():
    """A calm scene with nobody tracked (motion gating: no detection) costs no scene-cut
    check, and a frame after such a gap is not compared across it."""
    dark = np.full((90, 160, 3), 20, np.uint8)
    bright = np.full((90, 160, 3), 230, np.uint8)
    s = Scene(TrackingSettings(min_hits=1))
    s.step(None, image=dark)
    s.step(None, image=bright)  # a cut, but nothing to end and no detection: not checked
    assert s.t.scene_cuts == 0 and s.t.cuts._gray is None
    s.step([(face([10, 10, 50, 50]), lambda: near(ALICE))], image=bright)
    assert s.t.scene_cuts == 0 and len(s.t.tracks) == 1
    s.step(None, image=dark)  # with a live track the check runs, detection or not
    assert s.t.scene_cuts == 1 and s.t.tracks == []
