"""CPU: TFLite's built-in XNNPACK delegate, ``num_threads`` threads."""
from edged.runtime.base import AcceleratorPlugin, TfliteRunner, threads_text


class CpuPlugin(AcceleratorPlugin):
    type_key = "cpu"

    @classmethod
    def describe(cls, settings) -> str:
        return f"cpu, {threads_text(settings.num_threads or 1)}"

    def open(self, model, settings, name="model"):
        threads = settings.num_threads or 1
        return TfliteRunner(model, None, threads, name,
                            delegate_name=f"cpu (XNNPACK, {threads_text(threads)})")
