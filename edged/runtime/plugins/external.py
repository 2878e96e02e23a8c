"""External: any TFLite delegate library given by path, with its options."""
import dataclasses
from typing import Optional

from edged.runtime.base import CommonSettings, DelegatePlugin, SettingsError


@dataclasses.dataclass
class ExternalSettings(CommonSettings):
    library: str = ""
    options: Optional[dict] = None


class ExternalPlugin(DelegatePlugin):
    type_key = "external"
    Settings = ExternalSettings

    @classmethod
    def check(cls, settings, where):
        super().check(settings, where)
        if not settings.library:
            raise SettingsError(f"{where}.library: required for accelerator 'external' "
                                f"(path of a TFLite delegate library)")
