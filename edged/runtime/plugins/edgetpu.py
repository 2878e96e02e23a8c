"""Edge TPU: Coral's ``libedgetpu.so.1`` (the model must be compiled for the Edge TPU)."""
import dataclasses
from typing import Optional

from edged.runtime.base import CommonSettings, DelegatePlugin


@dataclasses.dataclass
class EdgeTpuSettings(CommonSettings):
    library: str = "libedgetpu.so.1"
    device: Optional[str] = None  # "usb", "pci", "usb:0"...; None = first found


class EdgeTpuPlugin(DelegatePlugin):
    type_key = "edgetpu"
    Settings = EdgeTpuSettings
    default_library = "libedgetpu.so.1"

    @classmethod
    def options_of(cls, settings) -> dict:
        return {"device": settings.device} if settings.device else {}
