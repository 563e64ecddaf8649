"""LaVIT as Hugging Face components and diffusers pipelines."""

__version__ = "0.1.0"

from .demo import default_model_path
from .image_processor import LavitImageProcessor
from .models import (
    LavitConfig,
    LavitForCausalLM,
    LavitPixelDecoder,
    LavitPixelDecoderOutput,
    LavitVisualTokenizer,
)
from .pipelines import (
    ASPECT_RATIO_SIZES,
    LavitText2ImagePipeline,
    LavitText2ImagePipelineOutput,
    LavitUnderstandingPipeline,
    LavitUnderstandingPipelineOutput,
)
from .tokenization import load_lavit_tokenizer

__all__ = [
    "ASPECT_RATIO_SIZES",
    "LavitText2ImagePipeline",
    "LavitText2ImagePipelineOutput",
    "LavitUnderstandingPipeline",
    "LavitUnderstandingPipelineOutput",
    "LavitConfig",
    "LavitForCausalLM",
    "LavitImageProcessor",
    "LavitPixelDecoder",
    "LavitPixelDecoderOutput",
    "LavitVisualTokenizer",
    "__version__",
    "default_model_path",
    "load_lavit_tokenizer",
]
