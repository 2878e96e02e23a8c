"""GPU: the TFLite GPU delegate (OpenCL/OpenGL ES on Jetson and Mali boards)."""
import dataclasses
from typing import Optional

from edged.runtime.base import CommonSettings, DelegatePlugin


@dataclasses.dataclass
class GpuSettings(CommonSettings):
    library: str = "libtensorflowlite_gpu_delegate.so"
    options: Optional[dict] = None


class GpuPlugin(DelegatePlugin):
    type_key = "gpu"
    Settings = GpuSettings
    default_library = "libtensorflowlite_gpu_delegate.so"
