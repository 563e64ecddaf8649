"""Model components of LaVIT."""

from .language_model import LavitConfig, LavitForCausalLM
from .pixel_decoder import LavitPixelDecoder, LavitPixelDecoderOutput
from .visual_tokenizer import LavitVisualTokenizer

__all__ = [
    "LavitConfig",
    "LavitForCausalLM",
    "LavitPixelDecoder",
    "LavitPixelDecoderOutput",
    "LavitVisualTokenizer",
]
