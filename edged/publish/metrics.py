"""Prometheus metrics of a running daemon (docs/metrics.md), collected when scraped.

Almost everything is read at scrape time from counters the daemon keeps anyway (frames read
and dropped per camera, events, drops, the spool...): :class:`DaemonCollector` is a custom
collector, so the frame path does no work for a metric except the stage timings, which are
observed into :class:`Histogram` (a bisect and two additions under an uncontended lock, next to
the rolling statistics the daemon already keeps for its ``stats`` topic).

prometheus_client is imported only when a registry is built (``http.listen`` set): a daemon
without the endpoint never loads it.
"""
from __future__ import annotations

import bisect
import threading
import time
from typing import Iterable, List, Optional, Sequence, Tuple

from edged import __version__
from edged.health import STATES
from edged.types import EVENT_TYPES

#: stage timings (seconds): capture (camera to detection worker), detect, embed, match, track,
#: publish (one event into the spool and the MQTT queue)
STAGES = ("capture", "detect", "embed", "match", "track", "publish")
STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                 5.0, 10.0)
#: capture to event handed to the publisher (seconds)
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Histogram:
    """A cumulative histogram (Prometheus ``le`` buckets, a sum), cheap to observe."""

    def __init__(self, bounds: Sequence[float]):
        self.bounds = tuple(sorted(float(b) for b in bounds))
        self._counts = [0] * (len(self.bounds) + 1)  # the last one: above every bound (+Inf)
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        i = bisect.bisect_left(self.bounds, value)  # the first bound >= value: le semantics
        with self._lock:
            self._counts[i] += 1
            self._sum += value

    def snapshot(self) -> Tuple[List[Tuple[str, int]], float]:
        """``([(le, cumulative count)...], sum)``, ``+Inf`` last, as prometheus_client takes."""
        with self._lock:
            counts, total = list(self._counts), self._sum
        out, acc = [], 0
        for bound, n in zip(self.bounds + (float("inf"),), counts):
            acc += n
            out.append(("+Inf" if bound == float("inf") else repr(bound), acc))
        return out, total


def _models(svc) -> Iterable[Tuple[str, str, str]]:
    """(role, sha256, delegate) of every model in service."""
    if svc is None:
        return []
    versions, acc = svc.versions or {}, svc.accelerators or {}
    det = versions.get("detector") or {}
    out = [(role, str(sha), str(acc.get("detector", "unknown")))
           for role, sha in (det.items() if isinstance(det, dict) else [("detector", det)])]
    out.append(("embedder", str(versions.get("embedder") or ""),
                str(acc.get("embedder", "unknown"))))
    live = getattr(svc.pipeline, "liveness", None)
    if live is not None:
        out.append(("antispoof", str(live.sha256), str(getattr(live, "delegate", "unknown"))))
    return out


class DaemonCollector:
    """The daemon's metrics, read from it at each scrape (a prometheus_client collector)."""

    def __init__(self, daemon):
        self.d = daemon
        self._people: Tuple[Optional[str], int] = (None, 0)  # (gallery version, identities)

    def describe(self):
        return []  # (collected at scrape time only: no metric is checked at registration)

    def collect(self):
        from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                            HistogramMetricFamily)

        self._c, self._g, self._h = CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
        yield from self._process()
        yield from self._cameras()
        yield from self._pipeline()
        yield from self._publishing()
        yield from self._service()

    # -- families, by part

    def _family(self, kind, name: str, doc: str, labels: Sequence[str],
                samples: Iterable[Tuple[Sequence[str], float]]):
        fam = kind(name, doc, labels=list(labels))
        for values, v in samples:
            fam.add_metric(list(values), v)
        return fam

    def _process(self):
        d = self.d
        yield self._family(self._g, "edged_info", "edged's version and device name",
                           ("version", "device"), [((__version__, d.device), 1)])
        state = d.health.state
        yield self._family(self._g, "edged_health_state",
                           "1 for the daemon's health state (healthy: /healthz answers 200)",
                           ("state",), [((s,), 1 if s == state else 0) for s in STATES])
        problems = d.health.document()["problems"]
        yield self._family(self._g, "edged_health_problem",
                           "1 per problem the health names (spool, status_file, camera:<name>, "
                           "pipeline)", ("problem",), [((k,), 1) for k in problems])

    def _cameras(self):
        d, now = self.d, time.monotonic()
        cams = dict(d.cameras)
        c, g = self._c, self._g
        yield self._family(c, "edged_frames", "frames read from the camera", ("camera",),
                           [((n,), cam.frames_read) for n, cam in cams.items()])
        yield self._family(c, "edged_frames_processed", "frames through the pipeline",
                           ("camera",), [((n,), d.counters.frames_by_camera.get(n, 0)) for n in cams])
        yield self._family(c, "edged_frames_dropped",
                           "frames replaced by a newer one before the pipeline took them",
                           ("camera",), [((n,), d.hub.dropped.get(n, 0)) for n in cams])
        yield self._family(g, "edged_camera_up", "1 while the camera is connected", ("camera",),
                           [((n,), 1 if cam.connected else 0) for n, cam in cams.items()])
        yield self._family(c, "edged_camera_reconnects", "times the source was reopened",
                           ("camera",), [((n,), cam.reconnects) for n, cam in cams.items()])
        yield self._family(g, "edged_camera_last_frame_age_seconds",
                           "seconds since the camera's last frame", ("camera",),
                           [((n,), now - cam.last_frame_monotonic) for n, cam in cams.items()
                            if cam.last_frame_monotonic is not None])

    def _pipeline(self):
        d = self.d
        c = self._c
        cams = sorted(d.cameras)  # every series from 0 (an alert on "none yet" needs them)
        yield self._family(c, "edged_faces_detected", "faces the detector found", ("camera",),
                           [((n,), d.counters.faces_detected.get(n, 0)) for n in cams])
        yield self._family(c, "edged_embeddings", "faces embedded and searched in the gallery",
                           (), [((), d.counters.faces_embedded)])
        counts = dict(d.counters.event_counts)
        keys = sorted(set(counts) | {(n, t) for n in cams for t in EVENT_TYPES})
        yield self._family(c, "edged_events", "events made, by camera and type",
                           ("camera", "type"), [(k, counts.get(k, 0)) for k in keys])
        yield self._family(c, "edged_recognitions", "recognized events (a person named)",
                           ("camera",), [((n,), counts.get((n, "recognized"), 0)) for n in cams])
        yield self._family(self._g, "edged_last_event_timestamp_seconds",
                           "when the camera's last event was handed to the publisher (epoch)",
                           ("camera",), sorted(((k,), v) for k, v in dict(d.counters.last_event_at).items()))
        yield self._family(c, "edged_pipeline_errors", "frames on which a stage raised",
                           (), [((), d.counters.errors)])
        stages = self._h("edged_stage_seconds", "time per stage and frame (event, for publish)",
                         labels=["stage"])
        for stage in STAGES:
            buckets, total = d.counters.stage[stage].histogram.snapshot()
            stages.add_metric([stage], buckets, total)
        yield stages
        buckets, total = d.counters.latency.histogram.snapshot()
        lat = self._h("edged_capture_to_event_seconds",
                      "from a frame's capture to its event handed to the publisher")
        lat.add_metric([], buckets, total)
        yield lat
        yield self._family(self._g, "edged_event_queue", "events waiting for the events thread",
                           (), [((), d.events.qsize())])

    def _publishing(self):
        pub = self.d.publisher
        on = pub is not None and getattr(pub, "enabled", False)
        spool = pub.spool.stats() if on else {}
        g, c = self._g, self._c
        yield self._family(g, "edged_mqtt_connected", "1 while connected to the broker", (),
                           [((), 1 if on and pub.connected else 0)])
        yield self._family(g, "edged_spool_events", "events in the spool, not yet acknowledged",
                           (), [((), spool.get("depth", 0))])
        yield self._family(g, "edged_spool_bytes", "bytes of event payloads in the spool", (),
                           [((), spool.get("bytes", 0))])
        yield self._family(c, "edged_spool_dropped", "events dropped by the spool's bounds "
                           "(kept across restarts)", (), [((), spool.get("dropped", 0))])

    def _service(self):
        d = self.d
        yield self._family(self._c, "edged_drops", "outcomes of file drops and swaps",
                           ("kind", "outcome"),
                           sorted((k, v) for k, v in dict(d.status.drop_outcomes).items()))
        svc = d.service
        yield self._family(self._g, "edged_gallery_identities", "people in the gallery in service",
                           (), [((), self._identities(svc))])
        yield self._family(self._g, "edged_model_info", "1 per model in service",
                           ("role", "sha256", "delegate"), [(m, 1) for m in _models(svc)])

    def _identities(self, svc) -> int:
        version = (svc.versions or {}).get("gallery") if svc is not None else None
        if version != self._people[0]:  # counted once per gallery, not at every scrape
            self._people = (version, len(self.d.sets.people(svc)) if svc is not None else 0)
        return self._people[1]


def registry(daemon):
    """A registry of its own (several daemons may run in one process, in tests) with the
    daemon's metrics and the process's (``process_resident_memory_bytes``,
    ``process_cpu_seconds_total``...)."""
    from prometheus_client import CollectorRegistry, ProcessCollector

    reg = CollectorRegistry(auto_describe=False)
    reg.register(DaemonCollector(daemon))
    ProcessCollector(registry=reg)
    return reg

