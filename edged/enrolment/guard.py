"""The enrolment quality guard: the reasons to refuse enrolling a kept track (docs/enrolment.md).

Bad enrolment crops are a main cause of strangers being named as known people, so a track is
refused, each time with a sentence saying what and why, when

- it holds no crop that meets the quality minimums (``KeptFace.passed``);
- its crops disagree with each other (their lowest pairwise cosine is below the embedder's
  verification threshold, the one ``edged compare`` decides "same person" by: more than one
  person was followed as one track);
- they already match ANOTHER enrolled person at or above the threshold (a look-alike enrolled
  under a new name poisons both: each would be named as the other);
- they are to be added to an EXISTING person and do not match that person (the best score of
  any crop against that person's rows is below the threshold);
- the track's embedder is not the one that made the gallery (its embeddings cannot be
  compared with the gallery's rows at all).

The scores are those of the crops that would be enrolled: the passing ones, or all of them
when none passes (``--force``).  The threshold is the embedder's own identification
threshold (its manifest entry), else :data:`edged.gallery.FALLBACK_THRESHOLD`, unless one is
given.  Each reason is a :class:`Reason`: a ``str`` with a ``code`` for programs and
``forceable`` (False for what ``--force`` cannot override: no crops, another embedder, an
identity id taken by someone else).
"""
from __future__ import annotations

import re
from typing import List, Optional, Sequence, Tuple

import numpy as np

from edged.enrolment.store import KeptTrack

#: look-alikes named in one reason at most
MAX_NAMED = 3


class Reason(str):
    """One reason to refuse: the sentence itself, with ``code`` and ``forceable``."""

    code: str
    forceable: bool

    def __new__(cls, code: str, text: str, forceable: bool = True) -> "Reason":
        r = super().__new__(cls, text)
        r.code = code
        r.forceable = forceable
        return r


def identification_threshold(embedder_sha256: Optional[str],
                             override: Optional[float] = None) -> float:
    """``override`` when given, else the identification threshold of the embedder whose file
    has ``embedder_sha256`` (its manifest entry), else the fallback of :class:`MatchSettings`."""
    if override is not None:
        return float(override)
    from edged.gallery import MatchSettings

    return MatchSettings().for_embedder(_spec(embedder_sha256)).cutoff


def _spec(embedder_sha256: Optional[str]):
    """The manifest's spec of the embedder whose file has ``embedder_sha256``; None when the
    manifest does not name it (or its entry has no usable embedding block)."""
    from edged.vision.embed import EmbedderSpec

    if not embedder_sha256:
        return None
    try:
        return EmbedderSpec.of_model(embedder_sha256)
    except ValueError:  # a manifest entry without a usable embedding block
        return None


def verification_threshold(embedder_sha256: Optional[str]) -> float:
    """The pair threshold of the embedder whose file has ``embedder_sha256`` (``edged
    compare``: two faces of one person score at least this), else the default of the pipeline."""
    from edged.vision.pipeline import DEFAULT_MATCH_THRESHOLD

    spec = _spec(embedder_sha256)
    if spec is not None and spec.verification is not None:
        return float(spec.verification)
    return DEFAULT_MATCH_THRESHOLD


def ident_from_name(name: str) -> str:
    """A new person's identity id: the name with its runs of white space as ``_`` (as
    ``edged gallery add``; kept here so that this package never imports the CLI)."""
    return re.sub(r"\s+", "_", name.strip())


def target_of(identities: Sequence[Tuple[str, str]], name: str,
              ident: Optional[str] = None) -> Tuple[Optional[int], str, str]:
    """``(index or None, identity id, display name)`` of the person ``name`` is: an enrolled
    identity whose id, else display name, is ``name`` (as ``edged gallery add``), else a new
    person with id ``ident`` or :func:`ident_from_name` of ``name``."""
    for key in (0, 1):
        for j, entry in enumerate(identities):
            if entry[key] == name:
                return j, entry[0], entry[1]
    return None, (ident or ident_from_name(name)), name


def enrolled_indices(track: KeptTrack, force: bool = False) -> List[int]:
    """The indices of the crops that would be enrolled: those that passed the quality
    minimums; with ``force``, all of them (also when none passed)."""
    passing = [k for k, f in enumerate(track.faces) if f.passed]
    return list(range(len(track.faces))) if force or not passing else passing


def enrolled_faces(track: KeptTrack, force: bool = False):
    """The crops that would be enrolled (:func:`enrolled_indices`)."""
    return [track.faces[k] for k in enrolled_indices(track, force)]


def check_track(track: KeptTrack, gallery, name: str, ident: Optional[str] = None,
                threshold: Optional[float] = None) -> List[Reason]:
    """The reasons to refuse enrolling ``track`` as ``name`` (``ident``: the id for a new
    person) into ``gallery`` (an open :class:`edged.gallery.Gallery`, or None when the file
    does not exist yet); ``[]`` when it may be enrolled.  ``threshold``: the identification
    threshold (None: the embedder's own, :func:`identification_threshold`)."""
    thr = identification_threshold(track.embedder, threshold)
    if not (name or "").strip():
        return [Reason("no_name", "No name was given to enrol the track under.",
                       forceable=False)]
    if not track.faces:
        return [Reason("no_crops", f"Track {track.id} holds no face crops, so there is nothing "
                                   f"to enrol.", forceable=False)]
    reasons = _quality(track)
    used = enrolled_indices(track)
    emb = np.stack([np.asarray(track.faces[k].embedding, np.float32) for k in used])
    reasons += _disagreement(track, used, emb, verification_threshold(track.embedder))
    if gallery is None:
        return reasons
    if gallery.embedder_sha256 != track.embedder:
        from edged.gallery import embedder_label

        return reasons + [Reason(
            "embedder", f"Track {track.id} was embedded by {embedder_label(track.embedder)} "
                        f"but the gallery {gallery.path} was made by "
                        f"{embedder_label(gallery.embedder_sha256)}: their embeddings cannot "
                        f"be compared, so its crops cannot be added to this gallery.",
            forceable=False)]
    j, ident, shown = target_of(gallery.identities, name, ident)
    if j is None and any(i == ident for i, _ in gallery.identities):
        reasons.append(Reason(
            "id_taken", f"The identity id {ident!r} is already enrolled under another name "
                        f"({gallery.identities[gallery.find(ident)][1]!r}); enrol under that "
                        f"name to add to that person, or give another id.", forceable=False))
        return reasons
    if gallery.n_identities:
        scores = gallery.identity_scores(emb)  # (crops, identities): each one's best row
        reasons += _look_alikes(track, gallery.identities, scores, j, shown, thr)
        if j is not None:
            reasons += _not_that_person(track, gallery.identities[j], scores[:, j], thr)
    return reasons


def _quality(track: KeptTrack) -> List[Reason]:
    if any(f.passed for f in track.faces):
        return []
    best = max(f.quality for f in track.faces)
    return [Reason("low_quality",
                   f"None of the {len(track.faces)} crops of track {track.id} meets the quality "
                   f"minimums (the best has quality {best:.2f}): a small, blurred or turned face "
                   f"makes a poor enrolment that names strangers; enrol a track where the "
                   f"face is large, sharp and frontal.")]


def _disagreement(track: KeptTrack, used: List[int], emb: np.ndarray,
                  thr: float) -> List[Reason]:
    if len(emb) < 2:
        return []
    sim = emb @ emb.T
    iu = np.triu_indices(len(emb), 1)
    k = int(np.argmin(sim[iu]))
    low = float(sim[iu][k])
    if low >= thr:
        return []
    a, b = used[int(iu[0][k])] + 1, used[int(iu[1][k])] + 1  # (numbered as edged tracks show)
    return [Reason("mixed",
                   f"The crops of track {track.id} disagree with each other: crops {a} and "
                   f"{b} score {low:.3f}, below {thr:.3f}, the score two faces of one person "
                   f"reach (the embedder's verification threshold), so the track most likely "
                   f"follows more than one person; enrolling it would teach the gallery a mix "
                   f"of faces.")]


def _look_alikes(track: KeptTrack, identities, scores: np.ndarray, target: Optional[int],
                 shown: str, thr: float) -> List[Reason]:
    best = scores.max(axis=0)
    hits = [j for j in np.argsort(-best).tolist() if j != target and best[j] >= thr]
    if not hits:
        return []
    named = ", ".join(f"{identities[j][1]} ({identities[j][0]}) at {float(best[j]):.3f}"
                      for j in hits[:MAX_NAMED])
    more = f" and {len(hits) - MAX_NAMED} more" if len(hits) > MAX_NAMED else ""
    first = identities[hits[0]]
    hint = (f" If this is {first[1]}, enrol the track under that name instead."
            if target is None else "")
    return [Reason("look_alike",
                   f"The crops of track {track.id} already match another enrolled person: "
                   f"{named}{more} (identification threshold {thr:.3f}); enrolled as "
                   f"{shown}, each of the two would be named as the other.{hint}")]


def _not_that_person(track: KeptTrack, identity, col: np.ndarray, thr: float) -> List[Reason]:
    best = float(col.max())
    if best >= thr:
        return []
    return [Reason("not_that_person",
                   f"The crops of track {track.id} do not match {identity[1]} ({identity[0]}), "
                   f"to whom they were to be added: their best score against that person's "
                   f"rows is {best:.3f}, below the identification threshold {thr:.3f}; adding "
                   f"another person's face would make strangers be named {identity[1]}.")]
