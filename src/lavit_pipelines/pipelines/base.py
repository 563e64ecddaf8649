"""What both LaVIT pipelines share: Hub download of a converted folder."""

import inspect

from huggingface_hub import snapshot_download

# Files of a converted folder that loading needs (weights in safetensors only).
_COMPONENT_FILES = ("*.json", "*.safetensors", "*.model", "*.txt")


class LavitPipelineMixin:
    """Downloads only the folders of the calling pipeline's components.

    diffusers' own `download` refuses `model_index.json` entries from libraries other than diffusers and
    transformers; a converted LaVIT folder names `lavit_pipelines` modules, so we fetch it ourselves.
    """

    @classmethod
    def component_names(cls) -> list[str]:
        """Names of the `__init__` arguments that are components."""
        return [name for name in inspect.signature(cls.__init__).parameters if name != "self"]

    @classmethod
    def download(cls, pretrained_model_name, **kwargs) -> str:
        """Snapshot of `model_index.json` and this pipeline's component folders from the Hub."""
        patterns = ["model_index.json"] + [f"{name}/{files}" for name in cls.component_names() for files in _COMPONENT_FILES]
        return snapshot_download(
            pretrained_model_name,
            allow_patterns=patterns,
            cache_dir=kwargs.get("cache_dir"),
            force_download=kwargs.get("force_download", False),
            local_files_only=bool(kwargs.get("local_files_only")),
            token=kwargs.get("token"),
            revision=kwargs.get("revision"),
        )


