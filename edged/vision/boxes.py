"""Box arithmetic of the MTCNN cascade (:mod:`edged.vision.detect`): suppression, regression
and squaring.

Boxes are ``[x1, y1, x2, y2]`` rows with inclusive corners, as MTCNN computes them.
:func:`nms` is greedy suppression by IoU ("union") or intersection over the smaller box
("min"), :func:`nms_union` the same by IoU on OpenCV's C++ ``NMSBoxes`` when it is there,
:func:`soft_nms` Gaussian Soft-NMS; :func:`regress` applies a network's box regression and
:func:`square` makes boxes square around their centres.
"""
from __future__ import annotations

import logging

import cv2
import numpy as np

log = logging.getLogger("edged.detect")


def _areas(b: np.ndarray) -> np.ndarray:
    return (b[:, 2] - b[:, 0] + 1) * (b[:, 3] - b[:, 1] + 1)


def _overlap(box: np.ndarray, others: np.ndarray, area: float, others_area: np.ndarray,
             mode: str) -> np.ndarray:
    xx1 = np.maximum(box[0], others[:, 0])
    yy1 = np.maximum(box[1], others[:, 1])
    xx2 = np.minimum(box[2], others[:, 2])
    yy2 = np.minimum(box[3], others[:, 3])
    inter = np.maximum(0.0, xx2 - xx1 + 1) * np.maximum(0.0, yy2 - yy1 + 1)
    if mode == "min":
        return inter / np.minimum(area, others_area)
    return inter / (area + others_area - inter)


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float, mode: str = "union") -> np.ndarray:
    """Greedy non-maximum suppression; indices kept, best score first.

    ``boxes`` are ``[x1, y1, x2, y2]`` with inclusive corners; ``mode`` "union" (IoU) or "min"
    (intersection over the smaller box).
    """
    if len(boxes) == 0:
        return np.zeros(0, dtype=np.int64)
    boxes = np.asarray(boxes, dtype=np.float64)
    areas = _areas(boxes)
    order = np.argsort(-np.asarray(scores), kind="stable")
    keep = []
    while order.size:
        i = order[0]
        keep.append(i)
        if order.size == 1:
            break
        rest = order[1:]
        ov = _overlap(boxes[i], boxes[rest], areas[i], areas[rest], mode)
        order = rest[ov <= threshold]
    return np.asarray(keep, dtype=np.int64)


_HAVE_CV2_NMS = hasattr(cv2, "dnn") and hasattr(cv2.dnn, "NMSBoxes")


def nms_union(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> np.ndarray:
    """IoU suppression (indices kept, best first): OpenCV's C++ NMSBoxes when available."""
    n = len(boxes)
    if n <= 1:
        return np.arange(n, dtype=np.int64)
    global _HAVE_CV2_NMS
    if _HAVE_CV2_NMS:
        xywh = np.empty((n, 4), dtype=np.float64)
        xywh[:, :2] = boxes[:, :2]
        xywh[:, 2:] = boxes[:, 2:4] - boxes[:, :2] + 1.0
        try:
            keep = cv2.dnn.NMSBoxes(xywh, np.asarray(scores, dtype=np.float32), 0.0,
                                    float(threshold))
            return np.asarray(keep, dtype=np.int64).reshape(-1)
        except (cv2.error, TypeError) as exc:  # an OpenCV build whose bindings differ
            log.info("OpenCV NMSBoxes unusable (%s); using numpy suppression", exc)
            _HAVE_CV2_NMS = False
    return nms(boxes, scores, threshold, "union")


def soft_nms(boxes: np.ndarray, scores: np.ndarray, sigma: float, min_score: float) -> tuple:
    """Gaussian Soft-NMS: ``(indices kept, their decayed scores)``, best first."""
    n = len(boxes)
    if n == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
    boxes = np.asarray(boxes, dtype=np.float64)
    areas = _areas(boxes)
    s = np.asarray(scores, dtype=np.float64).copy()
    idx = np.arange(n)
    keep, kept_scores = [], []
    while idx.size:
        j = int(np.argmax(s[idx]))
        i = idx[j]
        if s[i] < min_score:
            break
        keep.append(i)
        kept_scores.append(s[i])
        idx = np.delete(idx, j)
        if idx.size == 0:
            break
        iou = _overlap(boxes[i], boxes[idx], areas[i], areas[idx], "union")
        s[idx] *= np.exp(-(iou * iou) / sigma)
        idx = idx[s[idx] >= min_score]
    return np.asarray(keep, dtype=np.int64), np.asarray(kept_scores, dtype=np.float32)


def regress(boxes: np.ndarray, reg: np.ndarray, plus_one: bool = True) -> np.ndarray:
    w = boxes[:, 2] - boxes[:, 0] + (1 if plus_one else 0)
    h = boxes[:, 3] - boxes[:, 1] + (1 if plus_one else 0)
    out = boxes.copy()
    out[:, 0] += reg[:, 0] * w
    out[:, 1] += reg[:, 1] * h
    out[:, 2] += reg[:, 2] * w
    out[:, 3] += reg[:, 3] * h
    return out


def square(boxes: np.ndarray) -> np.ndarray:
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    side = np.maximum(w, h)
    out = boxes.copy()
    out[:, 0] = boxes[:, 0] + w * 0.5 - side * 0.5
    out[:, 1] = boxes[:, 1] + h * 0.5 - side * 0.5
    out[:, 2] = out[:, 0] + side
    out[:, 3] = out[:, 1] + side
    return out
