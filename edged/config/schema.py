"""The settings sections edged owns itself (device, models, pipeline, paths) and
:class:`Config`, the whole file: every section with its default, written once here or in the
stage module that owns it."""
from __future__ import annotations

import socket
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from edged.daemon.capture import CameraSettings
from edged.vision.detect import DetectionSettings
from edged.gallery import MatchSettings
from edged.publish.http import HttpSettings
from edged.vision.liveness import LivenessSettings
from edged.logs import LoggingSettings
from edged.vision.motion import MotionSettings
from edged.publish.mqtt import MqttSettings
from edged.ota.drops import DropSettings
from edged.vision.quality import QualitySettings
from edged.daemon.track import TrackingSettings
from edged.enrolment.store import EnrolmentSettings


@dataclass
class DeviceSettings:
    name: str = field(default="", metadata={
        "help": "device name used in MQTT topics, client id and events; empty = the host name"})

    def resolved_name(self) -> str:
        return self.name or socket.gethostname().split(".")[0] or "edged"

    def config_errors(self):
        bad = set(self.name) & set("/#+ \t\n")
        if bad:
            return [("name", f"must not contain {''.join(sorted(bad))!r} "
                             f"(it becomes an MQTT topic level), got {self.name!r}")]
        return []


@dataclass
class ModelsSettings:
    detector: Dict[str, Any] = field(default_factory=lambda: {"type": "cpu", "num_threads": 1},
                                     metadata={"help": "accelerator for P-Net, R-Net and O-Net "
                                                       "(see docs/models.md: type cpu, gpu, nnapi, "
                                                       "edgetpu, external and their keys)"})
    embedder: Dict[str, Any] = field(default_factory=lambda: {"type": "cpu", "num_threads": 1},
                                     metadata={"help": "accelerator for the embedder"})
    embedder_model: str = field(default="mobilefacenet", metadata={
        "help": "the embedder: mobilefacenet (192 values, the default) or sface (128 values, "
                "stronger, about 2.5x the cost per face; 'edged models install --embedder "
                "sface'); galleries must be built with the same one (docs/models.md)"})
    max_memory_mb: int = field(default=512, metadata={
        "min": 16, "max": 1048576,
        "help": "a dropped model needing more memory than this at an input size it runs at "
                "is refused (docs/models.md, memory check)"})

    def config_errors(self):
        from edged.runtime import SettingsError, parse_settings

        errs = self._embedder_model_errors()
        for key in ("detector", "embedder"):
            try:
                parse_settings(getattr(self, key), key)
            except SettingsError as exc:
                msg = str(exc)
                # parse_settings names the key as "<key>.sub: ..."; keep it relative.
                sub, _, rest = msg.partition(": ")
                errs.append((sub if sub.startswith(key) else key, rest or msg))
        return errs

    def _embedder_model_errors(self):
        from edged.runtime.modelstore import Manifest, ModelError

        try:
            names = Manifest.load().names("embedder")
        except ModelError:
            return []  # (no manifest here: loading the models says so)
        if self.embedder_model in names:
            return []
        return [("embedder_model", f"expected one of {', '.join(names)}; "
                                   f"got {self.embedder_model!r}")]

    def model_name(self, role: str) -> str:
        """The manifest name of the model run for ``role`` (empty: the role's default)."""
        return self.embedder_model if role == "embedder" else ""


@dataclass
class PipelineOptions:
    workers: int = field(default=1, metadata={
        "min": 1, "max": 16, "help": "detection threads, each with its own detector "
                                     "interpreters; frames are tracked in capture order after"})
    flip: bool = field(default=False, metadata={
        "help": "also embed the mirrored face and average the two (build the gallery "
                "with the same setting: edged gallery build --flip)"})
    detect_width: int = field(default=640, metadata={
        "min": 0, "max": 8192,
        "help": "detect faces on a copy of each frame scaled to this width (aspect kept, "
                "never enlarged); boxes are mapped back and faces are aligned and embedded "
                "from the full-resolution frame; 0 = detect on the frame itself; "
                "cameras[].detect_width overrides it"})


@dataclass
class PathsSettings:
    models_dir: str = field(default="", metadata={
        "help": "models directory; empty = $EDGED_MODELS_DIR, else /var/lib/edged/models for "
                "root, else ~/.local/share/edged/models"})
    gallery: str = field(default="/var/lib/edged/gallery.edgal", metadata={
        "help": "gallery file of enrolled people (edged gallery build); watched and hot-swapped"})
    state_dir: str = field(default="/var/lib/edged/state", metadata={
        "help": "writable directory for the event spool and runtime state"})
    drop_dir: str = field(default="", metadata={
        "help": "directory watched for over-the-air model drops (docs/ota.md); empty = the "
                "models directory"})


def _example_cameras():
    return [CameraSettings(name="cam0", source="/dev/video0")]


@dataclass
class Config:
    """The whole configuration file."""

    device: DeviceSettings = field(default_factory=DeviceSettings,
                                   metadata={"help": "this device"})
    cameras: List[CameraSettings] = field(default_factory=_example_cameras, metadata={
        "help": "one entry per camera (at least one)", "min_items": 1})
    detection: DetectionSettings = field(default_factory=DetectionSettings,
                                         metadata={"help": "MTCNN face detection"})
    quality: QualitySettings = field(default_factory=QualitySettings, metadata={
        "help": "minimum face quality for recognition (faces below are still tracked)"})
    liveness: LivenessSettings = field(default_factory=LivenessSettings, metadata={
        "help": "anti-spoofing: is the face live or a photo / screen (docs/models.md)"})
    match: MatchSettings = field(default_factory=MatchSettings,
                                 metadata={"help": "gallery search (identification)"})
    tracking: TrackingSettings = field(default_factory=TrackingSettings,
                                       metadata={"help": "tracking and evidence accumulation"})
    motion: MotionSettings = field(default_factory=MotionSettings, metadata={
        "help": "motion gating: detect only where something moves or a face is tracked"})
    pipeline: PipelineOptions = field(default_factory=PipelineOptions, metadata={
        "help": "how frames go through the face pipeline"})
    models: ModelsSettings = field(default_factory=ModelsSettings,
                                   metadata={"help": "per-model accelerators"})
    paths: PathsSettings = field(default_factory=PathsSettings, metadata={"help": "files"})
    drops: DropSettings = field(default_factory=DropSettings, metadata={
        "help": "over-the-air model and gallery drops (docs/ota.md)"})
    enrolment: EnrolmentSettings = field(default_factory=EnrolmentSettings, metadata={
        "help": "enrolment from the field: kept track faces, edged tracks (docs/enrolment.md)"})
    mqtt: MqttSettings = field(default_factory=MqttSettings, metadata={"help": "MQTT"})
    http: HttpSettings = field(default_factory=HttpSettings, metadata={
        "help": "the /metrics and /healthz endpoint, off by default (docs/metrics.md)"})
    logging: LoggingSettings = field(default_factory=LoggingSettings,
                                     metadata={"help": "log output"})

    def config_errors(self):
        errs = []
        seen = {}
        for i, cam in enumerate(self.cameras or []):
            name = getattr(cam, "name", None)
            if name in seen:
                errs.append((f"cameras[{i}].name",
                             f"duplicate camera name {name!r} (also cameras[{seen[name]}])"))
            seen.setdefault(name, i)
        return errs

    def match_settings(self, embedder_sha256: Optional[str] = None) -> MatchSettings:
        """``match`` with its threshold decided: the file's; else (``match.threshold: null``)
        the manifest default of the embedder whose file has ``embedder_sha256`` (the one in
        service, which a drop may have changed), else of ``models.embedder_model``."""
        from edged.vision.embed import EmbedderSpec
        from edged.runtime.modelstore import Manifest, ModelError

        if self.match.threshold is not None:
            return self.match
        spec = EmbedderSpec.of_model(embedder_sha256) if embedder_sha256 else None
        if spec is None:
            try:
                spec = EmbedderSpec.from_entry(
                    Manifest.load().model("embedder", self.models.embedder_model))
            except (ModelError, ValueError):
                spec = None  # (no manifest, or no such name: loading the models says so)
        return self.match.for_embedder(spec)
