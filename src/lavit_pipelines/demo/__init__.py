"""The embedded demo LaVIT: trained on the shapes world (`lavit_pipelines.worlds.shapes`), shipped in the package.

`default_model_path()` is its pipeline folder, loaded like any converted LaVIT; `recipe` rebuilds it.
"""

from pathlib import Path

MODEL_FOLDER = "shapes-lavit"


def default_model_path() -> Path:
    """Folder of the embedded demo model, for `LavitText2ImagePipeline.from_pretrained` and
    `LavitUnderstandingPipeline.from_pretrained` (the CLI's model when `--model` is not given)."""
    return Path(__file__).parent / MODEL_FOLDER
