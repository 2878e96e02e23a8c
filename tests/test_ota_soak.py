"""Soak: 50 over-the-air drops, in random order (fixed seed), into a daemon running on a looping
real video with a real mosquitto.

Drops: valid model re-encodings (with a manifest, through ``edged drop``), installed models
copied under a new name without a manifest (known by sha256; the batch-2 MobileFaceNet gets its
dynamic-batch copy), galleries for the embedder in service (renamed into place or copied in
place), new embedders held back and then their galleries (swapped together), galleries made by
an unknown embedder, corrupt files (sha256 not the manifest's, random bytes), half-copied models
and galleries, a NaN model refused by the self-test.  Each drop's outcome is awaited on the
status (events, not sleeps).  The test keeps its own model of what must be in service and
checks, after each drop, the outcome and the reason on the retained MQTT status; at the end:
every valid drop went into service (and the last ones are in service), every invalid one was
refused with its reason, no drop outcome and no recognition event was lost, and frames kept
flowing, measured with the daemon's per-frame log against the same run's baseline (the frames
before the first drop): the baseline's rate was kept, and no gap between two processed frames
was longer than three median intervals or twice the baseline's longest gap (printed).  That
verdict needs a quiet machine (the load of other work changes while the test runs), so it is
made only with EDGED_SOAK_TIMING=1; otherwise the numbers are printed and only a frame path
stalled for 10 s fails the test.

It failed twice on a loaded machine (drops.handled 35, waiting 1): a corrupt model renamed in
just before its manifest, the two renames in different clock ticks, looked like a file left
by an earlier drop, and the manifest waited 60 s for a replacement.  edged.ota now takes a
file whose own arrival was reported as the drop's (tests/test_ota.py has the case alone).
"""
from __future__ import annotations

import json
import os
import random
import shutil
import time

import numpy as np

from conftest import wait_for
from edged.runtime import modelstore
from edged_daemon_helpers import Subscriber
from test_ota import (MODEL_FILES, StatusWatch, base_gallery, gallery_variant, poison,  # noqa: F401
                      reencode, setup_device,
                      start_daemon, write_drop)

N_DROPS = 50
SEED = 20261121
#: the camera's frame rate.  At the clip's full 29.97 fps this shared 2-core VM is near its limit
#: even without any drop (measured: docs/ota.md), so gaps would measure the machine, not swaps.
FPS = 10.0
#: frames processed before the first drop, the same run's baseline (skipping the first 10)
BASE_FRAMES = 100
#: an upper bound for one drop's outcome, not an expected time (each wait ends on its event):
#: a machine busy with other work slows the drops down
DROP_TIMEOUT_S = 300.0
#: with this set (to anything), the frame rate and the gaps are judged against the baseline:
#: only meaningful on a machine doing nothing else, as the measurements of docs/ota.md
TIMING_ENV = "EDGED_SOAK_TIMING"
#: the longest time without a processed frame accepted on any machine, however busy (the
#: longest seen in ten runs with both cores kept busy by other processes: 2.3 s)
STALL_S = 10.0

KINDS = {  # kind: weight
    "det_reencode": 8, "det_known": 4, "emb_reencode": 6, "emb_original": 2,
    "gallery_current": 6, "gallery_held": 8, "gallery_mismatch": 4, "corrupt_manifest": 3,
    "corrupt_unknown": 2, "half_model": 2, "half_gallery": 3, "nan_model": 2,
}


def test_fifty_drops_while_frames_flow(shared_dir, models_dir, base_gallery, broker, tmp_path,
                                       capsys):
    installed = {r: modelstore.read_verified(r, models_dir)[:2] for r in MODEL_FILES}
    orig_emb = modelstore.read_verified("embedder", models_dir, original=True)[0]
    cfg, mdir, gpath = setup_device(tmp_path, models_dir, shared_dir, base_gallery, broker.port,
                                    "soak", installed, fps_limit=FPS)
    frame_log = tmp_path / "frames.log"
    prefix = "edged/soak"
    watch = StatusWatch(broker.port, prefix)
    sub = Subscriber(broker.port, f"{prefix}/events")
    d = start_daemon(cfg, tmp_path, env={"EDGED_FRAME_LOG": str(frame_log)})
    rng = random.Random(SEED)
    e0 = installed["embedder"][1]
    # the test's model of what must be in service
    emb, held = e0, None
    det = {r: installed[r][1] for r in ("pnet", "rnet", "onet")}
    st = watch.wait(lambda s: s["versions"]["embedder"] == e0, 120, "the first status")
    gal = st["versions"]["gallery"]
    # the baseline: the same daemon, on the same machine at the same time, before any drop
    assert wait_for(lambda: _frame_count(frame_log) >= BASE_FRAMES + 10, timeout=300), \
        f"{_frame_count(frame_log)} frames processed"
    outcomes, windows = [], []
    t_start = time.monotonic()
    try:
        for i in range(1, N_DROPS + 1):
            kind = rng.choices(list(KINDS), weights=list(KINDS.values()))[0]
            if kind == "gallery_held" and held is None:
                kind = "emb_reencode"
            name = f"d{i:02d}"
            expect, why = None, None
            t_drop = time.monotonic()
            if kind == "det_reencode":
                role = rng.choice(["pnet", "rnet", "onet"])
                data = reencode(installed[role][0], i)
                write_drop(mdir, [(role, f"{name}-{role}.tflite", data)], name, cli=False)
                det[role] = modelstore.sha256_bytes(data)
                expect = "swapped"
            elif kind == "det_known":
                role = rng.choice(["pnet", "rnet", "onet"])
                shutil.copyfile(models_dir / MODEL_FILES[role], mdir / f"{name}-{role}.tflite")
                expect = "unchanged" if det[role] == installed[role][1] else "swapped"
                det[role] = installed[role][1]
            elif kind in ("emb_reencode", "emb_original"):
                if kind == "emb_reencode":
                    data = reencode(installed["embedder"][0], 1000 + i)
                    write_drop(mdir, [("embedder", f"{name}-mfn.tflite", data)], name, cli=False)
                    sha = modelstore.sha256_bytes(data)
                else:  # the published batch-2 file, no manifest: derived to e0
                    tmp = mdir / f".{name}.part"
                    tmp.write_bytes(orig_emb)
                    os.replace(tmp, mdir / f"{name}-mobilefacenet.tflite")
                    sha = e0
                if sha == emb:
                    expect = "unchanged"
                else:
                    expect, held = "held_back", sha
            elif kind == "gallery_current":
                gal = _put_gallery(base_gallery, gpath, emb, i, rng)
                expect = "swapped"
            elif kind == "gallery_held":
                gal = _put_gallery(base_gallery, gpath, held, i, rng)
                emb, held, expect = held, None, "swapped"
            elif kind == "gallery_mismatch":
                gallery_variant(base_gallery, gpath, "%064x" % rng.getrandbits(256), seed=i)
                expect, why = "rejected", "neither in service"
            elif kind == "corrupt_manifest":
                role = rng.choice(["rnet", "onet", "embedder"])
                good = reencode(installed[role][0], 2000 + i)
                bad = bytearray(good)
                bad[len(bad) // 2] ^= 0xFF
                stage = tmp_path / "stage"
                stage.mkdir(exist_ok=True)
                (stage / f"{name}.tflite").write_bytes(bytes(bad))
                from test_ota import manifest_for
                (stage / f"{name}.json").write_text(json.dumps(
                    manifest_for([(role, f"{name}.tflite", good)])))
                os.replace(stage / f"{name}.tflite", mdir / f"{name}.tflite")
                os.replace(stage / f"{name}.json", mdir / f"{name}.json")
                expect, why = "rejected", "sha256 mismatch"
            elif kind == "corrupt_unknown":  # not a model at all: refused by its magic
                (mdir / f"{name}.tflite").write_bytes(rng.randbytes(40000))
                expect, why = "rejected", "not a TFLite model (wrong magic)"
            elif kind == "half_model":
                role = rng.choice(["rnet", "onet"])
                data = (models_dir / MODEL_FILES[role]).read_bytes()
                with open(mdir / f"{name}-{role}.tflite", "wb") as f:  # an interrupted copy
                    f.write(data[: len(data) // 2])
                expect, why = "rejected", "not a model of the manifest in force"
            elif kind == "half_gallery":
                tmp = tmp_path / "half.edgal"
                gallery_variant(base_gallery, tmp, emb, seed=i)
                data = tmp.read_bytes()
                with open(gpath, "wb") as f:  # in place, cut short
                    f.write(data[: len(data) // 2])
                expect, why = "rejected", "gallery"
            elif kind == "nan_model":
                role = rng.choice(["onet", "embedder"])
                data = poison(reencode(installed[role][0], 3000 + i))
                write_drop(mdir, [(role, f"{name}-nan.tflite", data)], name, cli=False)
                expect, why = "rejected", "non-finite output"
            st = watch.handled(i, timeout=DROP_TIMEOUT_S)
            windows.append((t_drop, time.monotonic(), kind))
            got = st["drops"]
            outcomes.append((i, kind, expect))
            if expect == "rejected":
                rj = st["last_rejected_drop"]
                assert got["rejected"] == sum(e == "rejected" for _, _, e in outcomes), (i, kind, st)
                assert rj["why"] and (why in rj["why"] or why == "gallery"), (i, kind, rj)
            else:
                assert got[expect] == sum(e == expect for _, _, e in outcomes), (i, kind, got)
            # what is in service is what the test expects, after every drop
            assert st["versions"]["embedder"] == emb, (i, kind, st["versions"])
            assert st["versions"]["detector"] == det, (i, kind, st["versions"])
            assert st["versions"]["gallery"] == gal, (i, kind, st["versions"])
            assert (st["held_back"] or {}).get("embedder") == held, (i, kind, st["held_back"])
        # the last swap confirmed (its probation over): still in service afterwards
        st = watch.wait(lambda s: s["last_swap"]["confirmed"], DROP_TIMEOUT_S,
                        "the last swap confirmed")
        time.sleep(1.0)
        st = watch.last()
        assert st["versions"]["embedder"] == emb and st["versions"]["detector"] == det
        assert st["versions"]["gallery"] == gal
        assert st["drops"]["rolled_back"] == 0
        soak_s = time.monotonic() - t_start
        d.terminate()
    finally:
        d.kill()
        watch.close()
    time.sleep(0.5)
    sub.close()
    log = d.log()
    assert "Traceback" not in log

    # every drop reported once in the journal, with its outcome
    final = ("event=ota_swapped", "event=ota_held_back", "event=ota_rejected",
             "event=ota_unchanged")
    n_reported = sum(log.count(k) for k in final)
    assert n_reported == N_DROPS, (n_reported, [(k, log.count(k)) for k in final])
    counts = {e: sum(x == e for _, _, x in outcomes) for e in
              ("swapped", "held_back", "rejected", "unchanged")}
    assert st["drops"]["handled"] == N_DROPS
    for k, n in counts.items():
        assert st["drops"][k] == n, (k, st["drops"], counts)

    # no recognition event lost: every event the daemon made reached the subscriber
    made = {e["id"] for e in d.events()}
    got = {json.loads(p)["id"] for t, p in sub.messages if t.endswith("/events")}
    assert made and made <= got, len(made - got)

    # frames kept flowing: the drops against the baseline, the same daemon on the same
    # machine just before them (a machine busy with other work slows both alike)
    times = np.array([float(line.split()[2]) for line in frame_log.read_text().splitlines()])
    base, times = times[10:10 + BASE_FRAMES], times[times >= t_start]
    b_rate, b_worst = (len(base) - 1) / (base[-1] - base[0]), float(np.diff(base).max() * 1000)
    gaps = np.diff(times) * 1000.0
    median, worst = float(np.median(gaps)), float(gaps.max())
    p99 = float(np.percentile(gaps, 99))
    rate = (len(times) - 1) / (times[-1] - times[0])
    limit = max(3 * median, 2 * b_worst)
    with capsys.disabled():
        print(f"\nsoak: baseline {len(base)} frames, {b_rate:.2f} frames/s, longest gap "
              f"{b_worst:.1f} ms")
        print(f"soak: {N_DROPS} drops in {soak_s:.1f} s ({counts}); {len(times)} frames, "
              f"{rate:.2f} frames/s; frame interval median {median:.1f} ms, p99 {p99:.1f} ms, "
              f"max {worst:.1f} ms (limit {limit:.1f} ms, in a {_window_of(windows, times, gaps)} "
              f"drop)")
        for what, secs in sorted(_swap_seconds(log).items()):
            print(f"soak: {what} swaps: {len(secs)}, drop seen to swapped in: median "
                  f"{np.median(secs):.3f} s, max {max(secs):.3f} s")
    # Frames flowed through every drop, whatever else the machine did: no drop held the frame
    # path for STALL_S
    assert worst <= STALL_S * 1000, f"no frame for {worst:.1f} ms"
    if not os.environ.get(TIMING_ENV):  # a verdict on the timing needs a quiet machine
        with capsys.disabled():
            print(f"soak: frame timing printed, not judged (set {TIMING_ENV}=1 on a quiet "
                  f"machine)")
        return
    # The rate: frames were processed at the baseline's rate (the camera's) all along: a swap
    # that held up the frame path would cost frames, since the newest frame wins over a
    # backlog.
    assert rate >= 0.8 * b_rate, f"{rate:.2f} frames/s processed, {b_rate:.2f} before the drops"
    # The longest gap: no stall of more than two frame intervals (not two: at 10 fps from a
    # 30 fps clip, one skipped source frame already makes a 133 ms gap; docs/ota.md), nor
    # longer than twice the longest gap before the drops.
    assert worst <= limit, f"a gap of {worst:.1f} ms (median {median:.1f} ms, longest before " \
                           f"the drops {b_worst:.1f} ms)"


def _window_of(windows, times, gaps) -> str:
    """The kind of drop during which the longest gap began."""
    t = times[int(np.argmax(gaps))]
    return next((k for a, b, k in windows if a <= t <= b), "no")


def _frame_count(frame_log) -> int:
    try:
        return frame_log.read_text().count("\n")
    except FileNotFoundError:
        return 0


def _swap_seconds(log: str) -> dict:
    """``{kind: [seconds]}`` from the daemon's ``<kind> swap: ... in service in X s`` lines."""
    import re

    out = {}
    for m in re.finditer(r"edged\.daemon: (\S+) swap: .* in service in ([0-9.]+) s", log):
        out.setdefault(m.group(1), []).append(float(m.group(2)))
    return out


def _put_gallery(base, gpath, emb, i, rng):
    """A gallery for ``emb``: renamed into place, or copied over the file in place."""
    if rng.random() < 0.5:
        return gallery_variant(base, gpath, emb, seed=i)
    tmp = gpath.parent.parent / "gal-stage.edgal"
    checksum = gallery_variant(base, tmp, emb, seed=i)
    data = tmp.read_bytes()
    with open(gpath, "r+b") as f:  # in place: truncate, write in pieces, close
        f.truncate(0)
        for k in range(0, len(data), 4096):
            f.write(data[k:k + 4096])
    return checksum
