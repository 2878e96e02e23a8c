#!/usr/bin/env python3
"""Open-set identification accuracy of edged on a folder of people (default: the dev set).

Protocol (issue 4): every person folder with at least 3 photos is *enrolled* with 2 photos
(the first two, in file-name order, that give a face; with ``--enrol quality`` the two with
the best face quality score) and *probed* with the rest; the
*strangers* are every photo in ``unknown/`` plus every photo of people with fewer than 3.
Each image goes through the pipeline with its default settings; the face nearest the image
centre is embedded (quality minimums are not applied: the gallery is what is measured here;
how many faces fall below them is reported).  The enrolled embeddings are written to a real
gallery file (:func:`edged.gallery.write_gallery`) and searched with :class:`Gallery`.

Reported (markdown, for docs/accuracy.md):

- rank-1 accuracy: probes whose best identity is the right one;
- for each threshold: the share of strangers accepted (their best score >= threshold) and
  the correct-identification rate (probes whose best identity is right AND scores >= it);
- the threshold that lets through 1 % of strangers (the smallest one accepting at most 1 %,
  i.e. just above the ceil(1 %)-th highest stranger score) and the rate there (target
  >= 98.5 %);
- the chosen open-set default (``--default``, shown with what it gives).

Embeddings are cached (``--cache``, default a file in the temp directory, valid for the
embedder's sha256 and the pipeline settings), so a second run takes seconds; use
``--no-cache`` after changing pipeline code.

    .venv/bin/python tools/eval_identification.py [--dev ../shared/faces/dev] [--models DIR]
        [--threads N] [--flip] [--enrol first|quality] [--cache FILE | --no-cache]
        [--embedder mobilefacenet|sface] [--default T] [--json FILE]

``--embedder`` picks the embedder (default: the manifest's, MobileFaceNet); ``--default``
defaults to that embedder's identification threshold in the manifest.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edged.vision.detect import MtcnnDetector  # noqa: E402
from edged.vision.embed import Embedder, EmbedderSpec  # noqa: E402
from edged.gallery import Gallery, MatchSettings, write_gallery  # noqa: E402
from edged.vision.imageio import ImageError, load_image  # noqa: E402
from edged.runtime.modelstore import Manifest  # noqa: E402
from edged.vision.pipeline import FacePipeline, PipelineSettings, central_face  # noqa: E402

IMAGE_EXT = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def list_people(dev: Path) -> dict:
    people = {}
    for d in sorted(p for p in dev.iterdir() if p.is_dir()):
        imgs = sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_EXT)
        if imgs:
            people[d.name] = imgs
    return people


def make_pipeline(models_dir, flip: bool = False, embedder: str = None) -> FacePipeline:
    """The default pipeline with the embedder ``embedder`` (None: the manifest's default)."""
    settings = PipelineSettings(flip=flip)
    return FacePipeline(MtcnnDetector.from_models(models_dir, settings.detection),
                        Embedder.from_models(models_dir, name=embedder), settings)


def embed_all(paths, models_dir, threads: int, cache: Path = None, flip: bool = False,
              embedder: str = None) -> dict:
    """{path: {"emb": vector or None, "faces": n, "passed": bool}} for every path."""
    local = threading.local()
    pipes = []
    sha = [None]

    def pipe() -> FacePipeline:
        if not hasattr(local, "p"):
            local.p = make_pipeline(models_dir, flip, embedder)
            pipes.append(local.p)
        return local.p

    sha[0] = pipe().embedder_sha256
    # the cache is valid for this embedder and these pipeline settings only
    key = "v2 " + sha[0] + " " + repr(pipe().settings)
    cached = {}
    if cache is not None and cache.is_file():
        try:
            data = np.load(cache, allow_pickle=False)
            if str(data["embedder"]) == key:
                for p, e, n, q, qs in zip(data["paths"], data["emb"], data["faces"],
                                          data["passed"], data["quality"]):
                    cached[str(p)] = {"emb": None if n == 0 else e.astype(np.float32),
                                      "faces": int(n), "passed": bool(q), "quality": float(qs)}
        except Exception as exc:  # a stale or foreign cache: recompute
            print(f"ignoring cache {cache}: {exc}", file=sys.stderr)
    todo = [p for p in paths if str(p) not in cached]
    done = [0]
    lock = threading.Lock()
    t0 = time.monotonic()

    def one(path):
        try:
            img = load_image(path)
        except ImageError as exc:
            print(f"{path}: {exc}", file=sys.stderr)
            return str(path), {"emb": None, "faces": 0, "passed": False}
        p = pipe()
        faces = p.detect(img)
        face = central_face(faces, img.shape)
        r = {"emb": None, "faces": len(faces), "passed": False, "quality": 0.0}
        if face is not None:
            p.embed_faces([face], only_passing=False)
            r["emb"] = face.embedding
            r["passed"] = bool(face.quality is None or face.quality.passed)
            r["quality"] = float(face.quality.score) if face.quality is not None else 0.0
        with lock:
            done[0] += 1
            if done[0] % 50 == 0 or done[0] == len(todo):
                rate = done[0] / max(time.monotonic() - t0, 1e-9)
                print(f"\rembedded {done[0]}/{len(todo)} ({rate:.1f}/s)", end="", file=sys.stderr)
        return str(path), r

    if todo:
        with ThreadPoolExecutor(max(1, threads)) as ex:
            for n, (k, v) in enumerate(ex.map(one, todo), 1):
                cached[k] = v
                if cache is not None and n % 250 == 0:  # keep what is done if interrupted
                    save_cache(cache, cached, key)
        print(file=sys.stderr)
        if cache is not None:
            save_cache(cache, cached, key)
    return {str(p): cached[str(p)] for p in paths}, sha[0]


def save_cache(cache: Path, cached: dict, sha: str) -> None:
    keys = sorted(cached)
    dim = next((len(v["emb"]) for v in cached.values() if v["emb"] is not None), 1)
    emb = np.stack([cached[k]["emb"] if cached[k]["emb"] is not None
                    else np.zeros(dim, np.float32) for k in keys])
    tmp = cache.with_name(cache.name + ".tmp.npz")
    np.savez(tmp, paths=np.array(keys), emb=emb,
             faces=np.array([cached[k]["faces"] if cached[k]["emb"] is not None else 0
                             for k in keys]),
             passed=np.array([cached[k]["passed"] for k in keys]),
             quality=np.array([cached[k].get("quality", 0.0) for k in keys]),
             embedder=np.array(sha))
    os.replace(tmp, cache)


def threshold_at_far(stranger_scores: np.ndarray, far: float) -> float:
    """The smallest threshold (score >= t accepts) accepting at most ``far`` of the strangers."""
    s = np.sort(stranger_scores)[::-1]
    allowed = int(math.floor(far * len(s) + 1e-9))  # strangers we may accept
    if allowed >= len(s):
        return -1.0
    # accept the top `allowed` ones, reject the next: t just above s[allowed]
    return float(np.nextafter(np.float32(s[allowed]), np.float32(2.0)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dev", type=Path, default=ROOT.parent / "shared" / "faces" / "dev")
    ap.add_argument("--models", default=None)
    ap.add_argument("--threads", type=int, default=1,
                    help="pipelines run in parallel (each holds its own interpreters and memory)")
    ap.add_argument("--cache", type=Path, default=None)
    ap.add_argument("--no-cache", action="store_true")
    ap.add_argument("--flip", action="store_true",
                    help="embed each face averaged with its mirror image (pipeline option flip)")
    ap.add_argument("--enrol", choices=("first", "quality"), default="first",
                    help="which 2 photos of a person to enrol: the first two by file name, or "
                         "the two with the best face quality score (the rest are probes)")
    ap.add_argument("--embedder", default=None, metavar="NAME",
                    help="the embedder (mobilefacenet, sface; default the manifest's default)")
    ap.add_argument("--default", type=float, default=None,
                    help="the threshold to report as the default (default: the embedder's "
                         "identification threshold in the manifest)")
    ap.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                    help="storage type of the gallery the probes are searched in")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures as JSON")
    args = ap.parse_args(argv)
    spec = EmbedderSpec.from_entry(Manifest.load().model("embedder", args.embedder))
    if args.default is None:
        args.default = spec.identification or MatchSettings().threshold

    people = list_people(args.dev)
    unknown = people.pop("unknown", [])
    all_paths = [p for imgs in people.values() for p in imgs] + list(unknown)
    cache = None
    if not args.no_cache:
        cache = args.cache or Path(tempfile.gettempdir()) / (
            "edged-eval-identification" + ("-flip" if args.flip else "")
            + (f"-{spec.name}" if args.embedder else "") + ".npz")
    t0 = time.monotonic()
    res, sha = embed_all(all_paths, args.models, args.threads, cache, args.flip, args.embedder)
    t_embed = time.monotonic() - t0

    enrolled, probes, strangers = [], [], []  # (person, path)
    no_face = {"enrol": 0, "probe": 0, "stranger": 0}
    below_quality = 0
    enrolled_people = []
    for person, imgs in people.items():
        if len(imgs) < 3:
            strangers += [(person, p) for p in imgs]
            continue
        got = [p for p in imgs if res[str(p)]["emb"] is not None]
        if args.enrol == "quality":  # stable: ties keep file-name order
            got = sorted(got, key=lambda p: -res[str(p)]["quality"])
        enrol = got[:2]
        if len(enrol) < 2:
            no_face["enrol"] += 2 - len(enrol)
        if not enrol:
            continue
        enrolled_people.append(person)
        enrolled += [(person, p) for p in enrol]
        probes += [(person, p) for p in imgs if p not in enrol]
    strangers += [("unknown", p) for p in unknown]
    for (person, p) in probes + strangers:
        if res[str(p)]["emb"] is not None and not res[str(p)]["passed"]:
            below_quality += 1

    with tempfile.TemporaryDirectory() as tmp:
        gpath = Path(tmp) / "dev.edgal"
        ids = [(person, person.replace("_", " ")) for person in enrolled_people]
        index = {person: j for j, person in enumerate(enrolled_people)}
        write_gallery(gpath, ids, [index[p] for p, _ in enrolled],
                      np.stack([res[str(p)]["emb"] for _, p in enrolled]), sha,
                      dtype=args.dtype)
        with Gallery.open(gpath, expect_embedder=sha) as g:
            def best(pairs):
                out = []  # (person, top id or None, score)
                have = [(person, p) for person, p in pairs if res[str(p)]["emb"] is not None]
                if have:
                    found = g.search(np.stack([res[str(p)]["emb"] for _, p in have]), k=2)
                    out = [(person, f[0][0], f[0][2]) for (person, _), f in zip(have, found)]
                missing = [(person, None, -1.0) for person, p in pairs
                           if res[str(p)]["emb"] is None]
                return out + missing
            pr = best(probes)
            st = best(strangers)
            n_rows, n_ids = g.rows, g.n_identities
    no_face["probe"] = sum(1 for _, t, _ in pr if t is None)
    no_face["stranger"] = sum(1 for _, t, _ in st if t is None)

    p_correct = np.array([t == person for person, t, _ in pr])
    p_score = np.array([s for _, _, s in pr], dtype=np.float64)
    s_score = np.array([s for _, t, s in st if t is not None], dtype=np.float64)
    rank1 = float(p_correct.mean())

    def at(t: float) -> dict:
        return {"threshold": round(float(t), 4),
                "strangers_accepted": float((s_score >= t).mean()),
                "correct_identification": float((p_correct & (p_score >= t)).mean()),
                "wrong_person_named": float((~p_correct & (p_score >= t)).mean())}

    t1 = threshold_at_far(s_score, 0.01)
    t01 = threshold_at_far(s_score, 0.001)
    table = [at(t) for t in (0.30, 0.36, 0.41, 0.46, 0.50, 0.52, 0.54, 0.56, 0.58, 0.60, 0.62, 0.64)]
    out = {
        "date": datetime.date.today().isoformat(), "machine": platform.machine(),
        "cpus": os.cpu_count(), "embedder": spec.name, "embedder_sha256": sha,
        "enrolled_people": n_ids, "enrolled_rows": n_rows, "probes": len(pr),
        "strangers": len(st), "strangers_with_face": int(len(s_score)),
        "no_face": no_face, "below_quality_probes_and_strangers": below_quality,
        "rank1": rank1, "at_far_1pct": at(t1), "at_far_0.1pct": at(t01),
        "default": at(args.default), "table": table, "embed_seconds": round(t_embed, 1),
        "wrong_at_far_1pct": [(person, t, round(s, 4)) for person, t, s in pr
                              if t != person and s >= t1],
        "missed_at_far_1pct": [(person, t, round(s, 4)) for person, t, s in pr
                               if not (t == person and s >= t1)],
        "stranger_top": sorted((round(float(s), 4) for s in s_score), reverse=True)[:10],
    }
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))

    pct = lambda v: f"{100 * v:.2f} %"  # noqa: E731
    print(f"Embedder {spec.name} ({spec.dim} values, sha256 {sha[:12]}).")
    print(f"Dev set `{args.dev}`: {n_ids} people enrolled with {n_rows} photos, {len(pr)} probe "
          f"photos of them, {len(st)} stranger photos ({len(s_score)} with a face).")
    print(f"Images without a face: {no_face}; probes and strangers below the quality "
          f"minimums (kept here): {below_quality}.\n")
    print(f"- rank-1 accuracy: **{pct(rank1)}** ({int(p_correct.sum())}/{len(pr)})")
    a = out["at_far_1pct"]
    print(f"- threshold letting through 1 % of strangers: {a['threshold']:.4f}; strangers "
          f"accepted {pct(a['strangers_accepted'])}; correct identification "
          f"**{pct(a['correct_identification'])}**; wrong person named "
          f"{pct(a['wrong_person_named'])}")
    a = out["at_far_0.1pct"]
    print(f"- at 0.1 % of strangers: threshold {a['threshold']:.4f}; correct identification "
          f"{pct(a['correct_identification'])}")
    a = out["default"]
    print(f"- default threshold {a['threshold']:.2f}: strangers accepted "
          f"{pct(a['strangers_accepted'])}; correct identification "
          f"{pct(a['correct_identification'])}; wrong person named {pct(a['wrong_person_named'])}\n")
    print("| threshold | strangers accepted | correct identification | wrong person named |")
    print("|---|---|---|---|")
    for r in table:
        print(f"| {r['threshold']:.2f} | {pct(r['strangers_accepted'])} | "
              f"{pct(r['correct_identification'])} | {pct(r['wrong_person_named'])} |")
    print(f"\nhighest stranger scores: {out['stranger_top']}")
    print(f"probes missed at the 1 % threshold ({len(out['missed_at_far_1pct'])}): "
          f"{out['missed_at_far_1pct']}")
    print(f"embedding took {t_embed:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
