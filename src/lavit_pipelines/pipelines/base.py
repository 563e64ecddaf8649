"""What both LaVIT pipelines share: Hub download of a converted folder and Hub upload with a model card."""

import importlib
import inspect
import json
import os
import tempfile
from pathlib import Path

import diffusers.pipelines
from accelerate import init_empty_weights
from diffusers import ModelMixin
from huggingface_hub import HfApi, ModelCard, ModelCardData, snapshot_download
from safetensors import safe_open
from transformers import PreTrainedModel

# Files of a converted folder that loading needs (weights in safetensors only).
_COMPONENT_FILES = ("*.json", "*.safetensors", "*.model", "*.txt")

MODEL_CARD = """
# {repo_id}

[LaVIT](https://github.com/jy0205/LaVIT) (ICLR 2024): a LLaMA-2 language model that reads and writes images as
dynamic discrete visual tokens, converted for [lavit-pipelines](https://pypi.org/project/lavit-pipelines/).

## Usage

```python
from lavit_pipelines import LavitText2ImagePipeline, LavitUnderstandingPipeline

pipe = LavitText2ImagePipeline.from_pretrained("{repo_id}", torch_dtype=torch.bfloat16).to("cuda")
image = pipe("a sculpture of a duck made of wool").images[0]

understanding = LavitUnderstandingPipeline.from_pretrained("{repo_id}", torch_dtype=torch.bfloat16).to("cuda")
print(understanding.caption(image)[0])
```

The weights keep the LLaMA 2 Community License of the original release.
"""


def check_component_shapes(name: str, folder: Path, entry: list) -> None:
    """ValueError naming the component when its weights do not fit the model its config describes.
    Cheap: the model is built on the meta device and only the safetensors headers are read."""
    library = getattr(diffusers.pipelines, entry[0], None) or importlib.import_module(entry[0])  # e.g. "stable_diffusion"
    model_cls = getattr(library, entry[1], None)
    if model_cls is None or not issubclass(model_cls, (ModelMixin, PreTrainedModel)):
        return
    with init_empty_weights():
        if issubclass(model_cls, ModelMixin):
            model = model_cls.from_config(model_cls.load_config(folder))
        else:
            model = model_cls._from_config(model_cls.config_class.from_pretrained(folder))
    expected = {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()}
    for weights in sorted(folder.glob("*.safetensors")):
        with safe_open(weights, "pt") as f:
            for key in f.keys():
                shape = tuple(f.get_slice(key).get_shape())
                if key in expected and expected[key] != shape:
                    raise ValueError(
                        f"The component `{name}` does not match its config: {weights.name} holds {key} of shape "
                        f"{shape}, the config of {folder} expects {expected[key]}."
                    )


def model_card(repo_id: str) -> ModelCard:
    """Model card of a converted LaVIT folder: llama2 licence, pipeline tag, library name, usage."""
    data = ModelCardData(
        license="llama2",
        library_name="lavit-pipelines",
        pipeline_tag="text-to-image",
        tags=["lavit", "diffusers", "text-to-image", "image-to-text", "visual-question-answering"],
    )
    return ModelCard(f"---\n{data.to_yaml()}\n---\n" + MODEL_CARD.format(repo_id=repo_id))


class LavitPipelineMixin:
    """Hub I/O for the LaVIT pipelines.

    diffusers' own `download` refuses `model_index.json` entries from libraries other than diffusers and
    transformers; a converted LaVIT folder names `lavit_pipelines` modules, so we fetch it ourselves, and
    only the folders of the calling pipeline's components.
    """

    @classmethod
    def component_names(cls) -> list[str]:
        """Names of the `__init__` arguments that are components."""
        return [name for name in inspect.signature(cls.__init__).parameters if name != "self"]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """diffusers' `from_pretrained` on a local folder or Hub id, after checking that the folder holds every
        component this pipeline loads (diffusers would otherwise look for a missing one at the root)."""
        folder = os.fspath(pretrained_model_name_or_path)
        if not os.path.isdir(folder):
            if os.path.exists(folder) or folder.startswith((".", "/", "~")) or folder.count("/") != 1:
                raise FileNotFoundError(f"{folder!r} is neither a converted LaVIT folder nor a Hub repo id.")
            folder = cls.download(folder, **kwargs)
        cls.check_folder(Path(folder), passed=kwargs)
        return super().from_pretrained(folder, **kwargs)

    @classmethod
    def check_folder(cls, folder: Path, passed: dict) -> None:
        """FileNotFoundError/ValueError naming the first component the folder lacks (components in `passed` are
        given by the caller and not loaded)."""
        index_path = folder / "model_index.json"
        if not index_path.is_file():
            raise FileNotFoundError(f"{folder} is not a converted LaVIT folder: it has no model_index.json.")
        index = json.loads(index_path.read_text())
        for name in cls.component_names():
            entry = index.get(name, [None, None])
            if name in passed or entry[0] is None:
                if entry[0] is None and name not in passed and name not in cls._optional_components:
                    raise ValueError(f"{index_path} has no entry for the component `{name}`.")
                continue
            if not (folder / name).is_dir():
                raise FileNotFoundError(f"The component `{name}` is missing: {folder / name} does not exist.")
            check_component_shapes(name, folder / name, entry)

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

    def push_to_hub(self, repo_id: str, commit_message: str | None = None, private: bool | None = None,
                    token: str | None = None, create_pr: bool = False, **save_kwargs) -> str:
        """`save_pretrained` into a temporary folder, add the model card, upload it to `repo_id`."""
        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, **save_kwargs)
            model_card(repo_id).save(Path(folder) / "README.md")
            return api.upload_folder(
                repo_id=repo_id, folder_path=folder, commit_message=commit_message or "Upload LaVIT pipeline",
                create_pr=create_pr,
            )

    def progress_bar(self, iterable=None, total=None, desc: str | None = None):
        """diffusers' progress bar, labelled `desc` unless `set_progress_bar_config` gave a label."""
        bar = super().progress_bar(iterable=iterable, total=total)
        if desc and "desc" not in getattr(self, "_progress_bar_config", {}):
            bar.set_description_str(desc, refresh=False)
        return bar
