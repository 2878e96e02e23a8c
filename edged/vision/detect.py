"""MTCNN face detection on the TFLite P-Net, R-Net and O-Net.

The three networks were converted from the original Caffe models and expect every image and
crop with height and width swapped (``[N, W, H, 3]``), RGB, scaled as ``(x - 127.5) / 128``;
their score and regression maps come back swapped the same way (index 0 runs along x).
Pyramid levels are transposed after resizing and crops are sampled straight into the
transposed layout, so the frame itself is never copied.

Stages, as in the original MTCNN:

1. **P-Net** on an image pyramid: the first level scales the frame by ``12 / min_face``, each
   next one by ``scale_factor``, down to 12 pixels (area averaging, each level from the one
   before).  For a given frame size the pyramid is fixed, so there is one P-Net interpreter
   per level size, opened at that size on first use and kept (an LRU bounded by
   :data:`PNET_CACHE` interpreters and :data:`PNET_CACHE_PIXELS` input pixels).  Candidate
   boxes are thresholded, suppressed per level (IoU 0.5) and across levels (IoU 0.7),
   regressed and made square.
2. **R-Net** on 24 x 24 crops of the candidates, all in one batch (split into power-of-two
   chunks, each with its own pre-sized interpreter, so nothing is re-allocated per frame);
   suppression at IoU 0.6, regression, squaring.
3. **O-Net** on 48 x 48 crops: final score, box regression and the 5 landmarks; a last
   suppression ('Min' overlap 0.7, or Gaussian Soft-NMS when ``soft_nms`` is set).

**Processing resolution.** ``detect(image, detect_width=W)`` runs the cascade on a copy of
the image scaled to ``W`` pixels wide (aspect kept, area averaging; never enlarged) and maps
the boxes and landmarks back to the image's pixels, so the caller aligns and embeds from the
full-resolution image.  ``min_face`` stays in the image's pixels: on the copy it is
``min_face * W / width``, but never under P-Net's 12 px window, so the smallest face found is
``max(min_face, 12 * width / W)`` pixels of the image.  ``detect_width=0`` (or a width at
least the image's) detects on the image itself.

Crops are sampled bilinearly from the frame or one of its exact halvings (so that a crop is
never more than 2x smaller than its source), with zero padding where a box crosses the frame
border, so such boxes never fail; the boxes returned are not clipped to the frame (a face cut
by the border has a box reaching outside it).  A detector is not thread-safe: use one per
thread.

The box arithmetic (suppression, regression, squaring) is in :mod:`edged.vision.boxes`.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import cv2
import numpy as np

from edged.vision.boxes import nms, nms_union, regress, soft_nms, square
from edged.vision.imageio import MAX_SIDE, ImageError, to_bgr8
from edged.runtime.tflitefile import pnet_model_for  # noqa: F401  (re-exported: edged.ota uses it)
from edged.types import Face

__all__ = ["DetectionSettings", "MtcnnDetector", "BatchRunner", "pyramid_scales", "pnet_levels",
           "detection_size"]

PNET_CACHE = 24  # at most this many P-Net interpreters kept, one per pyramid level size
PNET_CACHE_PIXELS = 2_000_000  # ... and at most this many input pixels over all of them
RNET_MAX_BATCH = 16  # the largest R-Net batch (one interpreter per power of two up to it)
ONET_MAX_BATCH = 4  # ... and O-Net's
_NORM_SCALE = np.float32(1.0 / 128.0)
_NORM_SHIFT = np.float32(127.5)


@dataclass
class DetectionSettings:
    """MTCNN settings (``detection:`` in the configuration)."""

    min_face: int = field(default=40, metadata={
        "min": 12, "max": 4096,
        "help": "smallest face to find, in pixels of the frame; smaller is slower "
                "(the first pyramid level scales the frame by 12 / min_face)"})
    scale_factor: float = field(default=0.709, metadata={
        "min": 0.3, "max": 0.95,
        "help": "ratio between image pyramid levels; closer to 1 finds more faces, slower"})
    thresholds: List[float] = field(default_factory=lambda: [0.6, 0.7, 0.7], metadata={
        "help": "score thresholds of P-Net, R-Net and O-Net, each in [0, 1]"})
    nms_thresholds: List[float] = field(default_factory=lambda: [0.5, 0.7, 0.6, 0.7], metadata={
        "help": "suppression overlaps: P-Net per level (IoU), P-Net across levels (IoU), "
                "R-Net (IoU; the original MTCNN uses 0.7: 0.6 sends fewer duplicate boxes to "
                "O-Net, about 1 ms less per 640x480 frame), O-Net (intersection over the "
                "smaller box)"})
    soft_nms: bool = field(default=False, metadata={
        "help": "final suppression by Gaussian Soft-NMS instead of hard suppression: keeps "
                "strongly overlapping neighbours in crowds (their score is decayed)"})
    soft_nms_sigma: float = field(default=0.3, metadata={
        "min": 0.01, "max": 10.0, "help": "Gaussian width of Soft-NMS (score *= exp(-IoU^2 / sigma))"})

    def config_errors(self) -> list:
        """``[(key, message)]`` for what per-field metadata cannot express (list lengths)."""
        errs = []
        if not isinstance(self.min_face, int) or isinstance(self.min_face, bool) or self.min_face < 12:
            errs.append(("min_face", f"expected an integer >= 12, got {self.min_face!r}"))
        if not isinstance(self.scale_factor, (int, float)) or not 0.3 <= self.scale_factor <= 0.95:
            errs.append(("scale_factor", f"expected a number in 0.3 .. 0.95, got {self.scale_factor!r}"))
        for name, n in (("thresholds", 3), ("nms_thresholds", 4)):
            values = getattr(self, name)
            if (not isinstance(values, (list, tuple)) or len(values) != n
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                               and 0.0 <= v <= 1.0 for v in values)):
                errs.append((name, f"expected {n} numbers in [0, 1], got {values!r}"))
        if not isinstance(self.soft_nms_sigma, (int, float)) or self.soft_nms_sigma <= 0:
            errs.append(("soft_nms_sigma", f"expected a positive number, got {self.soft_nms_sigma!r}"))
        return errs

    def check(self) -> None:
        """Raise ValueError naming the first bad key (``detection.<key>: ...``)."""
        errs = self.config_errors()
        if errs:
            raise ValueError("; ".join(f"detection.{k}: {m}" for k, m in errs))


def pyramid_scales(height: int, width: int, min_face: int, factor: float) -> List[float]:
    """Scales of the P-Net pyramid: ``12 / min_face`` times powers of ``factor``."""
    m = 12.0 / float(min_face)
    side = min(height, width) * m
    scales = []
    s = m
    while side >= 12.0:
        scales.append(s)
        s *= factor
        side *= factor
    return scales


def pnet_levels(height: int, width: int, min_face: int, factor: float) -> list:
    """``[(scale, P-Net input shape)]`` of the pyramid of a ``height`` x ``width`` frame; the
    shape is ``[1, W, H, 3]`` (width and height swapped, as P-Net wants them)."""
    levels = []
    for scale in pyramid_scales(height, width, min_face, factor):
        ws, hs = int(math.ceil(width * scale)), int(math.ceil(height * scale))
        if ws < 12 or hs < 12:
            break
        levels.append((scale, (1, ws, hs, 3)))
    return levels


# ---------------------------------------------------------------------------- runners


class BatchRunner:
    """Runs a batch-resizable model on any number of samples without re-allocating per call.

    The batch is split into power-of-two chunks (at most ``max_batch``); each chunk size has
    its own interpreter, created and sized on first use and kept, so a steady stream of calls
    never re-plans the model.
    """

    def __init__(self, model: bytes, accel=None, name: str = "model", sha256: str = "",
                 max_batch: int = 64):
        from edged.runtime import open_runner

        self._open = lambda shape=None: open_runner(model, accel, name=name, sha256=sha256,
                                                    where=f"{name}.accelerator",
                                                    input_shape=shape)
        self.name = name
        self.max_batch = max(1, int(max_batch))
        first = self._open()
        shape = list(first.input_details()[0]["shape"])
        self.sample_shape = tuple(shape[1:])
        self.delegate = first.delegate
        self.fallback_reason = first.fallback_reason
        self._runners: Dict[int, object] = {}
        if shape[0] >= 1:
            self._runners[int(shape[0])] = first
        from edged.runtime import parse_settings

        if getattr(parse_settings(accel, f"{name}.accelerator")[1], "strict", False):
            # strict: a batch size the delegate refuses stops the start, not a frame later
            n = 1
            while n <= self.max_batch:
                self.runner(n)
                n *= 2

    def runner(self, n: int):
        r = self._runners.get(n)
        if r is None:  # (a delegate that refuses the new shape falls back to the CPU)
            r = self._open((n,) + self.sample_shape)
            self._runners[n] = r
        return r

    def chunks(self, n: int) -> List[int]:
        sizes = []
        while n > 0:
            c = min(1 << (n.bit_length() - 1), self.max_batch)
            sizes.append(c)
            n -= c
        return sizes

    def run(self, batch: np.ndarray) -> list:
        n = len(batch)
        if n == 0:
            raise ValueError(f"{self.name}: empty batch")
        outs, start = [], 0
        for c in self.chunks(n):
            outs.append(self.runner(c).run(batch[start:start + c]))
            start += c
        if len(outs) == 1:
            return outs[0]
        return [np.concatenate([o[k] for o in outs], axis=0) for k in range(len(outs[0]))]


class NonFiniteOutput(RuntimeError):
    """A network gave NaN or infinite outputs: the model is broken (a bad drop, say).  Raised
    rather than read as "no face", so that the daemon counts the frame as a failure of the
    set in service (and rolls a new set back)."""


def _finite(name: str, *outputs) -> None:
    for out in outputs:
        if not np.isfinite(out).all():
            raise NonFiniteOutput(f"{name} gave non-finite outputs (a broken model?)")


# ---------------------------------------------------------------------------- detector


_NORM_LUT = ((np.arange(256, dtype=np.float32) - _NORM_SHIFT) * _NORM_SCALE).reshape(1, 256)


def _normalise(bgr: np.ndarray) -> np.ndarray:
    """BGR uint8 (..., 3) -> RGB float32 scaled as (x - 127.5) / 128 (OpenCV: two passes)."""
    shape = bgr.shape
    flat = np.ascontiguousarray(bgr).reshape(-1, shape[-2], 3)
    return cv2.LUT(cv2.cvtColor(flat, cv2.COLOR_BGR2RGB), _NORM_LUT).reshape(shape)


class _Octaves:
    """A frame and its exact 2 x 2 area halvings (OpenCV's fast path), made once per frame
    when first needed: the pyramid's first level and the crops both start from them."""

    def __init__(self, img: np.ndarray):
        self.images = [img]

    def get(self, k: int) -> np.ndarray:
        imgs = self.images
        while len(imgs) <= k and min(imgs[-1].shape[:2]) >= 2:
            prev = imgs[-1]
            imgs.append(cv2.resize(prev, (prev.shape[1] // 2, prev.shape[0] // 2),
                                   interpolation=cv2.INTER_AREA))
        return imgs[min(k, len(imgs) - 1)]

    def resize(self, rows: int, cols: int) -> np.ndarray:
        """Area-averaging resize of the frame to rows x cols, from the smallest halving that is
        still at least that large."""
        img = self.images[0]
        if rows >= img.shape[0] or cols >= img.shape[1]:
            if (rows, cols) == img.shape[:2]:
                return img
            return cv2.resize(img, (cols, rows), interpolation=cv2.INTER_AREA)
        k = int(math.floor(math.log2(min(img.shape[0] / rows, img.shape[1] / cols))))
        src = self.get(max(k, 0))
        while src.shape[0] < rows or src.shape[1] < cols:  # // 2 may have lost a pixel
            k -= 1
            src = self.get(k)
        if src.shape[:2] == (rows, cols):
            return src
        return cv2.resize(src, (cols, rows), interpolation=cv2.INTER_AREA)


def _crops(octs: "_Octaves", boxes: np.ndarray, size: int) -> tuple:
    """Square crops of the integer ``boxes`` (inclusive corners) of a BGR frame, resized to
    ``size`` x ``size`` and transposed as the networks want them (N x size(x) x size(y) x 3,
    BGR); and the mask of the boxes kept.

    Bilinear sampling, one ``cv2.remap`` per octave: each box is sampled from the halving of
    the frame in which it is between 1 and 2 times the crop size, so the sampling hardly
    aliases.  Whatever lies outside the frame is black (zero padding); boxes that miss the
    frame entirely are dropped.
    """
    H, W = octs.images[0].shape[:2]
    b = boxes.astype(np.float64)
    bw = b[:, 2] - b[:, 0] + 1.0
    bh = b[:, 3] - b[:, 1] + 1.0
    keep = ((bw >= 1) & (bh >= 1) & (b[:, 0] <= W - 1) & (b[:, 1] <= H - 1)
            & (b[:, 2] >= 0) & (b[:, 3] >= 0) & np.isfinite(b).all(axis=1))
    b, bw, bh = b[keep], bw[keep], bh[keep]
    n = len(b)
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    if n == 0:
        return out, keep
    octave = np.clip(np.floor(np.log2(np.maximum(bw, bh) / size)), 0, 30).astype(np.int64)
    octs.get(int(octave.max()))
    octave = np.minimum(octave, len(octs.images) - 1)
    per_call = max(1, 32000 // size)  # cv2.remap output is limited to 32767 rows
    for o in np.unique(octave):
        for start in range(0, int((octave == o).sum()), per_call):
            sel = np.nonzero(octave == o)[0][start:start + per_call]
            _sample(octs.images[int(o)], b[sel], bw[sel], bh[sel], float(1 << int(o)), size,
                    out, sel)
    return out, keep


def _sample(src: np.ndarray, b: np.ndarray, bw: np.ndarray, bh: np.ndarray, f: float,
            size: int, out: np.ndarray, sel: np.ndarray) -> None:
    """Bilinear crops of boxes ``b`` from ``src`` (the frame shrunk ``f`` times) into ``out[sel]``."""
    grid = (np.arange(size, dtype=np.float64) + 0.5) / size  # sample centres in [0, 1]
    # Frame coordinates of the sample centres, in this octave's pixel grid.  Output row u of a
    # crop runs along x, column v along y (the transposed layout).
    xs = (b[:, 0:1] + grid[None, :] * bw[:, None]) / f - 0.5
    ys = (b[:, 1:2] + grid[None, :] * bh[:, None]) / f - 0.5
    map_x = np.repeat(xs[:, :, None], size, axis=2).reshape(-1, size).astype(np.float32)
    map_y = np.repeat(ys[:, None, :], size, axis=1).reshape(-1, size).astype(np.float32)
    crops = cv2.remap(src, map_x, map_y, cv2.INTER_LINEAR,
                      borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))
    out[sel] = crops.reshape(len(sel), size, size, 3)


class MtcnnDetector:
    """The three-stage MTCNN cascade on verified model bytes (see the module docstring)."""

    def __init__(self, pnet: bytes, rnet: bytes, onet: bytes,
                 settings: Optional[DetectionSettings] = None, accel=None):
        from edged.runtime.modelstore import sha256_bytes
        from edged.runtime import open_runner

        self.settings = settings or DetectionSettings()
        self.settings.check()
        self.accel = accel
        self.sha256s = {"pnet": sha256_bytes(pnet), "rnet": sha256_bytes(rnet),
                        "onet": sha256_bytes(onet)}
        self._pnet_bytes = pnet
        self._open = open_runner
        self._pnet_cache: "OrderedDict[tuple, object]" = OrderedDict()
        self._pnet_pixels = 0
        self._pnet_frame = 0  # frames through P-Net
        self._pnet_used: Dict[tuple, int] = {}  # level shape -> the frame that last used it
        # frame size -> (the frame that had it before the last one, the last one)
        self._pnet_sizes: Dict[tuple, tuple] = {}
        self._pnet_keep = 1
        first = self._open_pnet((1, 24, 24, 3))  # checks the model and the accelerator now
        self.delegate = first.delegate
        self.fallback_reason = first.fallback_reason
        self.rnet = BatchRunner(rnet, accel, name="rnet", sha256=self.sha256s["rnet"],
                                max_batch=RNET_MAX_BATCH)
        self.onet = BatchRunner(onet, accel, name="onet", sha256=self.sha256s["onet"],
                                max_batch=ONET_MAX_BATCH)

    @classmethod
    def from_models(cls, models_dir=None, settings: Optional[DetectionSettings] = None,
                    accel=None) -> "MtcnnDetector":
        from edged.runtime.modelstore import read_verified

        blobs = {role: read_verified(role, models_dir)[0] for role in ("pnet", "rnet", "onet")}
        return cls(blobs["pnet"], blobs["rnet"], blobs["onet"], settings, accel)

    # -- P-Net interpreters, one per level size

    def _open_pnet(self, shape=None):
        model = self._pnet_bytes if shape is None else pnet_model_for(self._pnet_bytes, shape)
        return self._open(model, self.accel, name="pnet", sha256=self.sha256s["pnet"],
                          where="pnet.accelerator")

    def _pnet_for(self, shape: tuple):
        """The P-Net interpreter for one pyramid level.  Levels are kept (LRU, within
        PNET_CACHE and PNET_CACHE_PIXELS), but a level used within the last K + 1 frames, K
        the number of frame sizes coming in (cameras of different resolutions take turns; at
        least 1), is never evicted: when their pyramids do not fit, the levels that fit stay cached
        and the rest are opened for each frame alone (a plain LRU would evict each level just
        before its turn came again, and reopen every level every frame)."""
        r = self._pnet_cache.get(shape)
        if r is not None:
            self._pnet_cache.move_to_end(shape)
            self._pnet_used[shape] = self._pnet_frame
            return r
        pixels = shape[1] * shape[2]

        def full():
            return len(self._pnet_cache) >= PNET_CACHE or \
                self._pnet_pixels + pixels > PNET_CACHE_PIXELS

        while self._pnet_cache and full():
            old = next(iter(self._pnet_cache))  # the least recently used level
            if self._pnet_used.get(old, -1 - self._pnet_keep) >= self._pnet_frame - self._pnet_keep:
                break  # (and so were all the others)
            del self._pnet_cache[old]
            self._pnet_used.pop(old, None)
            self._pnet_pixels -= old[1] * old[2]
        r = self._open_pnet(shape)
        r.resize(shape)  # no-op unless the model's declared shape could not be used
        if not full():
            self._pnet_cache[shape] = r
            self._pnet_pixels += pixels
            self._pnet_used[shape] = self._pnet_frame
        return r

    # -- stages

    def _pnet_new_frame(self, size: tuple) -> None:
        """Count a frame of ``size`` (rows, cols) for the P-Net cache: the levels of the last
        K + 1 frames stay, K the number of frame sizes that came back within the last 32
        frames (cameras, not one-off photos), at least 1."""
        self._pnet_frame += 1
        sizes, now = self._pnet_sizes, self._pnet_frame
        sizes[size] = (sizes[size][1] if size in sizes else None, now)
        for k, (before, last) in list(sizes.items()):
            if last <= now - 32:
                del sizes[k]
        recurring = sum(1 for before, last in sizes.values()
                        if before is not None and before > now - 32)
        self._pnet_keep = max(1, recurring)

    def _stage_pnet(self, img: "_Octaves", min_face: float) -> np.ndarray:
        self._pnet_new_frame(img.images[0].shape[:2])
        s = self.settings
        H, W = img.images[0].shape[:2]
        t_p, nms_level, nms_all = s.thresholds[0], s.nms_thresholds[0], s.nms_thresholds[1]
        found = []
        prev = None
        for scale, (_, ws, hs, _) in pnet_levels(H, W, min_face, s.scale_factor):
            if prev is None:
                level = img.resize(hs, ws)
            else:
                # Each later level from the one before: area averaging on far fewer pixels.
                level = cv2.resize(prev, (ws, hs), interpolation=cv2.INTER_AREA)
            prev = level
            x = _normalise(cv2.transpose(level))[None]  # [1, W, H, 3]: width and height swapped
            prob, reg = self._pnet_for(x.shape).run(x)[:2]
            _finite("pnet", prob, reg)
            prob = prob[0, :, :, 1]  # W' x H' (swapped): index 0 runs along x
            xi, yi = np.nonzero(prob >= t_p)
            if xi.size == 0:
                continue
            score = prob[xi, yi]
            r = reg[0, xi, yi, :]
            b = np.empty((xi.size, 9), dtype=np.float64)
            b[:, 0] = np.trunc((2.0 * xi) / scale)
            b[:, 1] = np.trunc((2.0 * yi) / scale)
            b[:, 2] = np.trunc((2.0 * xi + 11.0) / scale)
            b[:, 3] = np.trunc((2.0 * yi + 11.0) / scale)
            b[:, 4] = score
            b[:, 5:9] = r
            keep = nms_union(b[:, :4], b[:, 4], nms_level)
            found.append(b[keep])
        if not found:
            return np.zeros((0, 5))
        b = np.concatenate(found)
        keep = nms_union(b[:, :4], b[:, 4], nms_all)
        b = b[keep]
        boxes = regress(b[:, :4], b[:, 5:9], plus_one=False)
        boxes = np.trunc(square(boxes))
        return np.hstack([boxes, b[:, 4:5]])

    def _stage_rnet(self, img: "_Octaves", cand: np.ndarray) -> np.ndarray:
        s = self.settings
        crops, kept = _crops(img, cand[:, :4], 24)
        cand = cand[kept]
        if len(cand) == 0:
            return cand
        prob, reg = self.rnet.run(_normalise(crops))[:2]
        _finite("rnet", prob, reg)
        score = prob[:, 1]
        ok = score > s.thresholds[1]
        if not ok.any():
            return np.zeros((0, 5))
        boxes, score, reg = cand[ok, :4], score[ok], reg[ok]
        keep = nms_union(boxes, score, s.nms_thresholds[2])
        boxes = regress(boxes[keep], reg[keep])
        boxes = np.trunc(square(boxes))
        return np.hstack([boxes, score[keep, None].astype(np.float64)])

    def _stage_onet(self, img: "_Octaves", cand: np.ndarray) -> List[Face]:
        s = self.settings
        crops, kept = _crops(img, cand[:, :4], 48)
        cand = cand[kept]
        if len(cand) == 0:
            return []
        prob, reg, pts = self.onet.run(_normalise(crops))[:3]
        _finite("onet", prob, reg, pts)
        score = prob[:, 1]
        ok = score > s.thresholds[2]
        if not ok.any():
            return []
        boxes, score, reg, pts = cand[ok, :4], score[ok].astype(np.float64), reg[ok], pts[ok]
        w = (boxes[:, 2] - boxes[:, 0] + 1)[:, None]
        h = (boxes[:, 3] - boxes[:, 1] + 1)[:, None]
        lx = boxes[:, 0:1] + w * pts[:, 0:5]
        ly = boxes[:, 1:2] + h * pts[:, 5:10]
        boxes = regress(boxes, reg)
        if s.soft_nms:
            keep, score_k = soft_nms(boxes, score, s.soft_nms_sigma, s.thresholds[2])
        else:
            keep = nms(boxes, score, s.nms_thresholds[3], "min")
            score_k = score[keep]
        faces = []
        for k, sc in zip(keep, score_k):
            x1, y1, x2, y2 = boxes[k]
            faces.append(Face(
                box=np.array([x1, y1, x2 + 1.0, y2 + 1.0], dtype=np.float32),
                score=float(sc),
                landmarks=np.stack([lx[k], ly[k]], axis=1).astype(np.float32)))
        faces.sort(key=lambda f: -f.score)
        return faces

    def detect(self, image_bgr: np.ndarray, detect_width: int = 0,
               around: Optional[np.ndarray] = None) -> List[Face]:
        """Faces in a BGR image (gray, BGRA and 16-bit are converted), best score first, in
        the image's pixels; found on a copy ``detect_width`` pixels wide when that is smaller
        than the image (0: on the image itself; see the module docstring).

        ``around``: boxes (N x 4, ``[x1, y1, x2, y2]`` in the image's pixels) where faces are
        expected (tracks between two full detections): instead of the P-Net pyramid, R-Net and
        O-Net refine square crops of them; a box with no face there gives nothing."""
        if image_bgr.dtype != np.uint8 or image_bgr.ndim != 3 or image_bgr.shape[2] != 3:
            image_bgr = to_bgr8(image_bgr)
        h, w = image_bgr.shape[:2]
        if min(h, w) < 12:
            return []
        if max(h, w) > MAX_SIDE:  # OpenCV's remap takes sources under 32767 px a side
            raise ImageError(f"image of {w}x{h} px: too large to search for faces (at most "
                             f"{MAX_SIDE} px a side); scale it down first")
        size = detection_size(w, h, detect_width)
        if size == (w, h):
            return self._cascade(image_bgr, float(self.settings.min_face), around)
        sw, sh = size
        small = _Octaves(image_bgr).resize(sh, sw)  # (from a halving: far cheaper at 1080p)
        k = np.array([w / sw, h / sh], dtype=np.float32)
        if around is not None:
            around = np.asarray(around, np.float64).reshape(-1, 4) / np.tile(k, 2)
        faces = self._cascade(small, max(12.0, self.settings.min_face * sw / w), around)
        for f in faces:  # back to the image's pixels
            f.box = f.box * np.tile(k, 2)
            f.landmarks = f.landmarks * k
        return faces

    def _cascade(self, image_bgr: np.ndarray, min_face: float,
                 around: Optional[np.ndarray] = None) -> List[Face]:
        octs = _Octaves(image_bgr)
        if around is None:
            cand = self._stage_pnet(octs, min_face)
        else:
            cand = _track_candidates(around)
        if len(cand) == 0:
            return []
        cand = self._stage_rnet(octs, cand)
        if len(cand) == 0:
            return []
        return self._stage_onet(octs, cand)


def _track_candidates(boxes: np.ndarray) -> np.ndarray:
    """R-Net candidates ``[x1, y1, x2, y2, score]`` (integer, inclusive, square) from face
    boxes with exclusive corners, as P-Net would have proposed them."""
    b = np.asarray(boxes, np.float64).reshape(-1, 4).copy()
    b = b[np.isfinite(b).all(axis=1)]
    b[:, 2:] -= 1.0
    return np.hstack([np.trunc(square(b)), np.ones((len(b), 1))])


def detection_size(width: int, height: int, detect_width: int) -> tuple:
    """``(width, height)`` of the copy a ``width`` x ``height`` image is detected on: scaled to
    ``detect_width`` pixels wide, aspect kept, never enlarged (0: the image's own size)."""
    if detect_width <= 0 or detect_width >= width:
        return width, height
    return int(detect_width), max(1, int(round(height * detect_width / width)))
