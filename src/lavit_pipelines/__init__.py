"""LaVIT as Hugging Face components and diffusers pipelines.

The public names are imported on first access (PEP 562), so that `import lavit_pipelines` and the `lavit` CLI's
`--help` do not load torch, diffusers and transformers.
"""

import importlib

__version__ = "0.1.0"

# public name -> submodule that defines it
_EXPORTS = {
    "ASPECT_RATIO_SIZES": ".pipelines",
    "LavitText2ImagePipeline": ".pipelines",
    "LavitText2ImagePipelineOutput": ".pipelines",
    "LavitUnderstandingPipeline": ".pipelines",
    "LavitUnderstandingPipelineOutput": ".pipelines",
    "LavitConfig": ".models",
    "LavitForCausalLM": ".models",
    "LavitPixelDecoder": ".models",
    "LavitPixelDecoderOutput": ".models",
    "LavitVisualTokenizer": ".models",
    "LavitImageProcessor": ".image_processor",
    "LavitProcessor": ".processing",
    "load_lavit_tokenizer": ".tokenization",
    "default_model_path": ".demo",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
