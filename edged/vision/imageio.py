"""Reading images from files into the one layout every stage uses: BGR uint8, H x W x 3.

:func:`load_image` reads any file OpenCV can decode (JPEG, PNG, BMP, TIFF, WebP, ...),
applies the EXIF orientation, and normalises grayscale, alpha and 16-bit images with
:func:`to_bgr8`.  Anything else raises :class:`ImageError`, whose message names the file and
the reason (missing, unreadable, empty, not an image).
"""
from __future__ import annotations

import os

import cv2
import numpy as np

__all__ = ["ImageError", "load_image", "to_bgr8"]


#: the longest image side face detection takes (OpenCV's remap needs sources under 32767 px)
MAX_SIDE = 32766


class ImageError(ValueError):
    """An image cannot be used; the message names the path (or array) and the reason."""


def to_bgr8(image: np.ndarray, where: str = "image") -> np.ndarray:
    """Return ``image`` as a contiguous BGR uint8 H x W x 3 array.

    Accepts H x W or H x W x 1 (grayscale), H x W x 3 (BGR), H x W x 4 (BGRA: the alpha
    channel is dropped), of dtype uint8, uint16 (scaled by 1/257: 65535 -> 255), other integer
    types (clipped to 0..255) or float (0..1 taken as the full range when the maximum is <= 1,
    else clipped to 0..255).
    """
    if not isinstance(image, np.ndarray):
        raise ImageError(f"{where}: expected a numpy array, got {type(image).__name__}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
        raise ImageError(f"{where}: unsupported image shape {image.shape} "
                         f"(expected H x W, H x W x 1, H x W x 3 or H x W x 4)")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ImageError(f"{where}: empty image (shape {image.shape})")
    dt = image.dtype
    if dt == np.uint8:
        pass
    elif dt == np.uint16:
        # 65535 / 257 = 255 exactly; rounding keeps 8-bit values stored in 16 bits intact.
        image = ((image.astype(np.uint32) + 128) // 257).astype(np.uint8)
    elif dt == np.bool_:
        image = image.astype(np.uint8) * 255
    elif np.issubdtype(dt, np.integer):
        image = np.clip(image, 0, 255).astype(np.uint8)
    elif np.issubdtype(dt, np.floating):
        finite = np.nan_to_num(image.astype(np.float32), nan=0.0, posinf=255.0, neginf=0.0)
        if finite.size and float(finite.max()) <= 1.0:
            finite = finite * 255.0
        image = np.clip(finite + 0.5, 0, 255).astype(np.uint8)
    else:
        raise ImageError(f"{where}: unsupported pixel type {dt}")
    if image.ndim == 2:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    elif image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    return np.ascontiguousarray(image)


def load_image(path) -> np.ndarray:
    """Read ``path`` as BGR uint8 H x W x 3; raise :class:`ImageError` saying why it cannot."""
    where = os.fspath(path)
    try:
        with open(where, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ImageError(f"{where}: no such file") from None
    except IsADirectoryError:
        raise ImageError(f"{where}: is a directory, not an image file") from None
    except PermissionError:
        raise ImageError(f"{where}: permission denied") from None
    except OSError as exc:
        raise ImageError(f"{where}: cannot read: {exc.strerror or exc}") from None
    if not data:
        raise ImageError(f"{where}: empty file")
    buf = np.frombuffer(data, dtype=np.uint8)
    # IMREAD_COLOR applies the EXIF orientation and gives 3 channels (gray expanded, alpha
    # dropped); IMREAD_ANYDEPTH keeps 16-bit samples so that to_bgr8 scales them properly.
    try:
        image = cv2.imdecode(buf, cv2.IMREAD_COLOR | cv2.IMREAD_ANYDEPTH)
    except cv2.error as exc:
        raise ImageError(f"{where}: not a readable image ({str(exc).strip().splitlines()[-1]})") from None
    if image is None:
        raise ImageError(f"{where}: not an image, or a format OpenCV cannot decode "
                         f"({len(data)} bytes)")
    h, w = image.shape[:2]
    if max(h, w) > MAX_SIDE:
        raise ImageError(f"{where}: {w}x{h} px is too large to search for faces (at most "
                         f"{MAX_SIDE} px a side); scale it down first")
    return to_bgr8(image, where)
