"""The LaVIT diffusers pipelines."""

from .outputs import LavitText2ImagePipelineOutput, LavitUnderstandingPipelineOutput
from .text2image import ASPECT_RATIO_SIZES, LavitText2ImagePipeline
from .understanding import LavitUnderstandingPipeline

__all__ = [
    "ASPECT_RATIO_SIZES",
    "LavitText2ImagePipeline",
    "LavitText2ImagePipelineOutput",
    "LavitUnderstandingPipeline",
    "LavitUnderstandingPipelineOutput",
]
