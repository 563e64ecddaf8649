"""What both LaVIT pipelines share: Hub download of a converted folder and Hub upload with a model card."""

import enum
import importlib
import inspect
import json
import math
import os
import pickle
import re
import sys
import tempfile
import typing
from contextlib import contextmanager
from pathlib import Path

import diffusers.pipelines
import torch
from diffusers import ModelMixin, SchedulerMixin
from diffusers.models.model_loading_utils import load_state_dict
from huggingface_hub import HfApi, ModelCard, ModelCardData, snapshot_download
from safetensors import safe_open
from transformers import PreTrainedModel

# Files of a converted folder that a Hub download fetches (weights in safetensors only: never a release's `.bin`).
_COMPONENT_FILES = ("*.json", "*.safetensors", "*.model", "*.txt")
WEIGHT_FORMATS = ("safetensors", "bin")  # in the order diffusers and transformers prefer them

MODEL_CARD = """
# {repo_id}

[LaVIT](https://github.com/jy0205/LaVIT) (ICLR 2024): a LLaMA-2 language model that reads and writes images as
dynamic discrete visual tokens, converted for [lavit-pipelines](https://pypi.org/project/lavit-pipelines/).

## Usage

```python
from lavit_pipelines import LavitText2ImagePipeline, LavitUnderstandingPipeline

pipe = LavitText2ImagePipeline.from_pretrained("{repo_id}", dtype=torch.bfloat16).to("cuda")
image = pipe("a sculpture of a duck made of wool").images[0]

understanding = LavitUnderstandingPipeline.from_pretrained("{repo_id}", dtype=torch.bfloat16).to("cuda")
print(understanding.caption(image)[0])
```

The weights keep the LLaMA 2 Community License of the original release.
"""


# Libraries a `model_index.json` entry may name. Only diffusers and transformers are ever imported by name; this
# package's modules are taken from `sys.modules` (imported by this package itself), never imported for an entry.
IMPORTABLE_LIBRARIES = ("diffusers", "transformers")
PACKAGE = __name__.split(".")[0]


def is_hub_id(name: str) -> bool:
    """Whether `name` can only mean a Hub repo id (`owner/name`), not a local path."""
    return not name.startswith((".", "/", "~")) and name.count("/") == 1 and not os.path.isabs(name)


def read_model_index(folder: Path) -> dict:
    """`folder/model_index.json` as a dict; FileNotFoundError/ValueError naming the file when absent or malformed."""
    path = folder / "model_index.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a converted LaVIT folder: it has no model_index.json.")
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(index, dict):
        raise ValueError(f"{path} must hold a JSON object of components, got a {type(index).__name__}.")
    if not isinstance(index.get("_class_name"), str):
        raise ValueError(
            f"{path}: `_class_name` must be the name of a pipeline class, got {index.get('_class_name')!r}."
        )
    return index


def component_entries(index: dict) -> dict:
    """The component entries of a `model_index.json` dict: without the `_` metadata and the pipelines' settings
    (numbers and booleans, such as `default_guidance_scale`)."""
    return {
        name: entry
        for name, entry in index.items()
        if not name.startswith("_") and not isinstance(entry, (bool, int, float))
    }


def _library(library_name: str):
    """The module an entry names, or None when it is outside this package, diffusers and transformers.
    Nothing is imported but diffusers and transformers themselves."""
    if library_name in IMPORTABLE_LIBRARIES:
        return importlib.import_module(library_name)
    if library_name == PACKAGE or library_name.startswith(PACKAGE + "."):
        return sys.modules.get(library_name)
    if library_name.isidentifier() and library_name in diffusers.pipelines._import_structure:
        module = getattr(
            diffusers.pipelines, library_name, None
        )  # a diffusers pipeline module, e.g. "stable_diffusion"
        return module if inspect.ismodule(module) and module.__name__.startswith("diffusers.") else None
    return None


def _declared_classes(annotation) -> tuple[type, ...]:
    """The classes a component's `__init__` annotation allows (an Enum of scheduler names means any scheduler)."""
    if annotation is inspect.Parameter.empty:
        return ()
    classes = tuple(c for c in (typing.get_args(annotation) or (annotation,)) if inspect.isclass(c))
    return tuple(SchedulerMixin if issubclass(c, enum.Enum) else c for c in classes)


def resolve_component_class(name: str, entry, index_path: Path, declared) -> type | None:
    """The class that the `model_index.json` entry of component `name` names (None for `[null, null]`), checked
    before anything is imported: ValueError naming the component unless it is a class of this package, diffusers
    or transformers, and (when the pipeline annotates the component) a subclass of the declared class."""
    if entry is None or entry == [None, None]:
        return None
    if not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(part, str) for part in entry)):
        raise ValueError(f"{index_path}: the entry of `{name}` must be [library, class name], got {entry!r}.")
    library_name, class_name = entry
    if (index_path.parent / name / f"{library_name}.py").exists():
        raise ValueError(
            f"{index_path}: the component `{name}` ships code ({library_name}.py); nothing is executed from a model folder."
        )
    library = _library(library_name)
    if library is None:
        raise ValueError(
            f"{index_path}: the component `{name}` names the module {library_name!r}; only classes of {PACKAGE}, "
            f"diffusers and transformers are loaded, and nothing is imported from a model folder."
        )
    cls = getattr(library, class_name, None)
    if not inspect.isclass(cls) or cls.__module__.split(".")[0] not in (PACKAGE, *IMPORTABLE_LIBRARIES):
        raise ValueError(
            f"{index_path}: the component `{name}` names {library_name}.{class_name}, which is not a class it provides."
        )
    classes = _declared_classes(declared)
    if classes and not issubclass(cls, classes):
        raise ValueError(
            f"{index_path}: the component `{name}` must be a {' or '.join(c.__name__ for c in classes)}, got {class_name}."
        )
    return cls


def _is_variant(path: Path, variant: str | None) -> bool:
    """Whether a weight file or index name carries exactly `variant` (`model.fp16.safetensors`,
    `model.safetensors.index.fp16.json`, `diffusion_pytorch_model.fp16.bin`), or no variant when `variant` is None."""
    infixes = [part for part in path.name.split(".")[1:-1] if part not in ("index", *WEIGHT_FORMATS)]
    return infixes == ([variant] if variant else [])


def weight_files(name: str, folder: Path, variant: str | None = None) -> list[Path]:
    """The weight files a model component loads from, as diffusers and transformers pick them: safetensors before
    `.bin`, the shards an index lists before single files, files of `variant` before plain ones.
    FileNotFoundError naming the component when there are none."""
    for candidate in dict.fromkeys([variant, None]):
        for suffix in WEIGHT_FORMATS:
            for index in sorted(i for i in folder.glob(f"*.{suffix}.index*.json") if _is_variant(i, candidate)):
                try:
                    shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
                except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
                    raise ValueError(
                        f"The component `{name}`: {index} is not a valid weight index: {error!r}."
                    ) from error
                return [folder / shard for shard in shards]
            files = [f for f in sorted(folder.glob(f"*.{suffix}")) if _is_variant(f, candidate)]
            if files:
                return files
    raise FileNotFoundError(f"The component `{name}` has no weights (*.safetensors or *.bin) in {folder}.")


def _quantized_parts(metadata: dict | None) -> dict[str, str]:
    """Stored key -> parameter name, for the parameters a quantizer saved as several tensors (torchao: the header's
    metadata maps `layer.weight` to its tensor subclass and `_tensor_data_names`, stored as `layer._weight_qdata`,
    `layer._weight_scale`, ...)."""
    parts = {}
    for param, description in (metadata or {}).items():
        try:
            names = json.loads(description).get("_tensor_data_names", ())
        except (json.JSONDecodeError, AttributeError):
            continue
        module, _, attribute = param.rpartition(".")
        parts.update({f"{module}._{attribute}_{part}": param for part in names})
    return parts


def stored_shapes(name: str, files: list[Path]) -> dict[str, tuple | None]:
    """Tensor name -> shape, from the safetensors headers, or from a `.bin` unpickled as diffusers and transformers
    do (`torch.load(weights_only=True)`, onto the meta device: no tensor data is read). A pickle that holds anything
    but tensors and plain containers is refused by torch, before any of its code could run. A quantized parameter
    stored as several tensors counts under its own name, with shape None (its stored shapes are the quantizer's)."""
    shapes = {}
    for path in files:
        if not path.is_file():
            raise FileNotFoundError(f"The component `{name}` lacks its weight file {path}.")
        try:
            if path.suffix == ".safetensors":
                with safe_open(path, "pt") as f:
                    parts = _quantized_parts(f.metadata())
                    for key in f.keys():
                        shapes[parts.get(key, key)] = None if key in parts else tuple(f.get_slice(key).get_shape())
            else:
                state = load_state_dict(str(path), map_location="meta")
                shapes.update(
                    {key: tuple(value.shape) for key, value in state.items() if isinstance(value, torch.Tensor)}
                )
        except Exception as error:  # noqa: BLE001 - SafetensorError, refused pickles and OS errors: name the file
            reason = (
                "it holds objects other than tensors, which `torch.load(weights_only=True)` refuses; nothing "
                "in it was executed"
                if _caused_by(error, pickle.UnpicklingError)
                else first_line(error)
            )
            raise ValueError(f"The component `{name}`: {path} is not a readable weight file ({reason}).") from error
    return shapes


def _caused_by(error: BaseException, kind: type) -> bool:
    while error is not None and not isinstance(error, kind):
        error = error.__cause__ or error.__context__
    return error is not None


def first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


class ConfigTooLarge(ValueError):
    """The config describes a model with far more parameters than its weights hold."""


@contextmanager
def parameter_budget(limit: int):
    """While active, registering parameters or buffers beyond `limit` elements in all raises ConfigTooLarge: a
    config that disagrees with its weights (say `num_hidden_layers: 10**9`) stops at its first surplus layer
    instead of building a billion modules."""
    total = 0

    def count(module, name, tensor):
        nonlocal total
        total += tensor.numel() if tensor is not None else 0
        if total > limit:
            raise ConfigTooLarge(f"more than {limit:,} parameters (at a {type(module).__name__})")

    hooks = [
        torch.nn.modules.module.register_module_parameter_registration_hook(count),
        torch.nn.modules.module.register_module_buffer_registration_hook(count),
    ]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def meta_model(name: str, folder: Path, model_cls, max_elements: int | None = None):
    """The model its config describes, on the meta device (no memory, no weights read); with `max_elements`, a
    ValueError as soon as its parameters and buffers exceed that many elements."""
    try:
        with torch.device("meta"), parameter_budget(max_elements if max_elements is not None else float("inf")):
            if issubclass(model_cls, ModelMixin):
                return model_cls.from_config(model_cls.load_config(folder))
            return model_cls._from_config(model_cls.config_class.from_pretrained(folder))
    except ConfigTooLarge as error:
        raise ValueError(
            f"The component `{name}`: the config in {folder} describes a {model_cls.__name__} of {error}, far more "
            f"than its weights hold; refused before building it."
        ) from None
    except Exception as error:  # noqa: BLE001 - a missing or malformed config: name the component
        raise ValueError(
            f"The component `{name}`: could not build {model_cls.__name__} from the config in {folder}: {error}"
        ) from error


# diffusers' `fuse_qkv_projections` adds these layers, copies of to_q/to_k/to_v (which stay and are saved too);
# `unfuse_qkv_projections` keeps them, so a pipeline saved after fusing holds them, and diffusers' loader drops them.
FUSED_PROJECTIONS = (r"\.to_qkv\.", r"\.to_kv\.", r"\.to_added_qkv\.")


def _ignored(key: str, patterns) -> bool:
    return any(re.search(pattern, key) for pattern in patterns or ())


def _quantized_owner(key: str, expected) -> str:
    """The parameter a stored tensor of a quantized component belongs to: bitsandbytes stores a quantized
    `layer.weight` packed, with its state beside it (`layer.weight.absmax`, `layer.weight.quant_map`, ...)."""
    parts = key.split(".")
    return next((".".join(parts[:n]) for n in range(len(parts), 0, -1) if ".".join(parts[:n]) in expected), key)


def check_component_weights(name: str, folder: Path, model_cls, variant: str | None = None) -> None:
    """ValueError/FileNotFoundError naming the component when its weights do not fit the model its config describes:
    a tensor missing, unexpected or of another shape (not compared for a component saved quantized), a config that
    describes a model much larger than its weights, or a weight file unreadable. Cheap: only the weights' headers are
    read, then the model is built on the meta device, stopped once it outgrows twice the stored elements (tied weights
    count twice while building; no limit for a quantized component, whose stored sizes are the quantizer's)."""
    if not issubclass(model_cls, (ModelMixin, PreTrainedModel)):
        return
    stored = stored_shapes(name, weight_files(name, folder, variant))
    try:
        quantized = "quantization_config" in json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):  # `meta_model` names the component's missing or malformed config
        quantized = False
    budget = None if quantized or None in stored.values() else 2 * sum(map(math.prod, stored.values())) + 2**20
    model = meta_model(name, folder, model_cls, budget)
    state = model.state_dict(keep_vars=True)
    expected = {key: tuple(tensor.shape) for key, tensor in state.items()}
    if quantized:
        stored = {_quantized_owner(key, expected): None for key in stored}
    for key in sorted(stored.keys() & expected.keys()):
        if stored[key] not in (None, expected[key]):
            raise ValueError(
                f"The component `{name}` does not match its config: its weights hold {key} of shape {stored[key]}, "
                f"the config in {folder} expects {expected[key]}."
            )
    present = {id(state[key]) for key in stored.keys() & expected.keys()}  # a tied tensor is stored under one name
    missing = [
        k
        for k in expected
        if k not in stored
        and id(state[k]) not in present
        and not _ignored(k, getattr(model_cls, "_keys_to_ignore_on_load_missing", None))
    ]
    ignored = (*(getattr(model_cls, "_keys_to_ignore_on_load_unexpected", None) or ()), *FUSED_PROJECTIONS)
    unexpected = [k for k in stored if k not in expected and not _ignored(k, ignored)]
    for problem, keys in (("lack", missing), ("hold unexpected", unexpected)):
        if keys:
            raise ValueError(
                f"The component `{name}` does not match its config in {folder}: its weights {problem} {len(keys)} "
                f"tensors ({', '.join(sorted(keys)[:3])}{', ...' if len(keys) > 3 else ''})."
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
        """Names of the `__init__` arguments that are components (the others are settings of the pipeline's config)."""
        modules, _ = cls._get_signature_keys(cls)
        return [name for name in inspect.signature(cls.__init__).parameters if name in modules]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """diffusers' `from_pretrained` on a local folder or Hub id, after checking that the folder holds every
        component this pipeline loads (diffusers would otherwise look for a missing one at the root)."""
        folder = os.fspath(pretrained_model_name_or_path)
        if not os.path.isdir(folder):
            if os.path.exists(folder) or not is_hub_id(folder):
                raise FileNotFoundError(f"{folder!r} is neither a converted LaVIT folder nor a Hub repo id.")
            folder = cls.download(folder, **kwargs)
        cls.check_folder(Path(folder), passed=kwargs)
        return super().from_pretrained(folder, **kwargs)

    @classmethod
    def check_folder(cls, folder: Path, passed: dict) -> None:
        """Before anything is imported or loaded: FileNotFoundError/ValueError naming the first component of this
        pipeline that the folder lacks, that names a class outside this package, diffusers and transformers (or
        not the declared one), or whose weights do not fit its config (components in `passed` are given by the
        caller and not loaded)."""
        index = read_model_index(folder)
        index_path = folder / "model_index.json"
        declared = inspect.signature(cls.__init__).parameters
        loaded = [name for name in cls.component_names() if name not in passed]
        for name, entry in component_entries(
            index
        ).items():  # passed-in and other pipelines' too: diffusers looks them up
            if name not in loaded:
                resolve_component_class(name, entry, index_path, None)
        for name in loaded:
            model_cls = resolve_component_class(name, index.get(name), index_path, declared[name].annotation)
            if model_cls is None:
                if name not in cls._optional_components:
                    raise ValueError(f"{index_path} has no entry for the component `{name}`.")
                continue
            if not (folder / name).is_dir():
                raise FileNotFoundError(f"The component `{name}` is missing: {folder / name} does not exist.")
            check_component_weights(name, folder / name, model_cls, passed.get("variant"))

    @classmethod
    def download(cls, pretrained_model_name, **kwargs) -> str:
        """Snapshot of `model_index.json` and this pipeline's component folders from the Hub."""
        patterns = ["model_index.json"] + [
            f"{name}/{files}" for name in cls.component_names() for files in _COMPONENT_FILES
        ]
        return snapshot_download(
            pretrained_model_name,
            allow_patterns=patterns,
            cache_dir=kwargs.get("cache_dir"),
            force_download=kwargs.get("force_download", False),
            local_files_only=bool(kwargs.get("local_files_only")),
            token=kwargs.get("token"),
            revision=kwargs.get("revision"),
        )

    def push_to_hub(
        self,
        repo_id: str,
        commit_message: str | None = None,
        private: bool | None = None,
        token: str | None = None,
        create_pr: bool = False,
        **save_kwargs,
    ) -> str:
        """`save_pretrained` into a temporary folder, add the model card, upload it to `repo_id`."""
        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, **save_kwargs)
            model_card(repo_id).save(Path(folder) / "README.md")
            return api.upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                commit_message=commit_message or "Upload LaVIT pipeline",
                create_pr=create_pr,
            )

    def progress_bar(self, iterable=None, total=None, desc: str | None = None):
        """diffusers' progress bar, labelled `desc` unless `set_progress_bar_config` gave a label."""
        bar = super().progress_bar(iterable=iterable, total=total)
        if desc and "desc" not in getattr(self, "_progress_bar_config", {}):
            bar.set_description_str(desc, refresh=False)
        return bar
