"""The gallery: a memory-mapped file of enrolled people, searched by cosine similarity.

A gallery file (``.edgal``, ``docs/gallery-format.md``) holds every enrolled identity (an id
and a display name) and its embedding rows, L2-normalised, float32 or float16, grouped by
identity, with the sha256 of the embedder that made them.  A face is named after the
identity whose best row scores highest, when that score reaches the threshold.

=====================  ==================================================================
module                 its job
=====================  ==================================================================
:mod:`.format`         the file layout, the header and its checks, reading a file safely,
                       :func:`write_gallery`, :class:`GalleryError`
:mod:`.gallery`        :class:`Gallery`: an open file (mapped or in memory), its
                       identities and the public search API; :func:`read_entries`
:mod:`.checks`         the full check of an open file: identity tables, ids, every row
:mod:`.search`         the scan (compiled float16 ``_scan``, or blocks widened), each
                       identity's best row, the top k, the thread pool
:mod:`.match`          :class:`MatchSettings` and :func:`decide` (candidates -> Match)
``_scan.c``            the compiled float16 scan (``edged.gallery._scan``, built by setup.py)
=====================  ==================================================================

The daemon's hot-swapped gallery (its snapshots, the last good one) is
:class:`edged.ota.galleryholder.GalleryHolder`: hot swaps are the job of :mod:`edged.ota`.

The names below are what other packages import; a test or tool that changes a module's
private name (``_scan_ext``, ``BLOCK_ROWS`` ...) sets it in the module that reads it.
"""
from __future__ import annotations

from edged.gallery.format import (FORMAT_VERSION, GALLERY_MODE, HEADER_SIZE, MAGIC, MAX_DIM,
                                  SUFFIX, GalleryError, embedder_label, embedder_name,
                                  peek_embedder, write_gallery)
from edged.gallery.gallery import Gallery, read_entries
from edged.gallery.match import FALLBACK_THRESHOLD, MatchSettings, decide
from edged.gallery.search import scan_kernel

__all__ = ["FALLBACK_THRESHOLD", "FORMAT_VERSION", "GALLERY_MODE", "HEADER_SIZE", "MAGIC",
           "MAX_DIM", "SUFFIX", "Gallery", "GalleryError", "MatchSettings", "decide",
           "embedder_label", "embedder_name", "peek_embedder", "read_entries", "scan_kernel",
           "write_gallery"]
