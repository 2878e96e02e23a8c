"""NNAPI: Android's neural network API delegate, for boards that ship it."""
import dataclasses
from typing import Optional

from edged.runtime.base import CommonSettings, DelegatePlugin


@dataclasses.dataclass
class NnapiSettings(CommonSettings):
    library: str = "libnnapi_delegate.so"
    options: Optional[dict] = None


class NnapiPlugin(DelegatePlugin):
    type_key = "nnapi"
    Settings = NnapiSettings
    default_library = "libnnapi_delegate.so"
