"""The demo model's architecture: a LaVIT at the size of the shapes world, built untrained in code.

64×64 images; a 3-layer ViT (hidden 128, 16×16-pixel patches: 16 patches) under a visual tokenizer with a
256-code codebook of dim 32; a 4-layer LLaMA of hidden 256 over a word-level vocabulary of the world; an
SD-1.5-style ("lowres") pixel decoder and UNet on the 8×8×4 latents of a small KL autoencoder.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import PreTrainedTokenizerFast

from ..models.initialization import randomize_zero_parameters
from ..models.language_model import LavitConfig, LavitForCausalLM
from ..models.pixel_decoder import LavitPixelDecoder
from ..models.visual_tokenizer import LavitVisualTokenizer
from ..tokenization import build_llama_style_tokenizer, words
from ..worlds import shapes

IMAGE_SIZE = 64
CODEBOOK_SIZE = 256
CODEBOOK_DIM = 32
VISION_HIDDEN = 128
LLM_HIDDEN = 256
CONDITION_DIM = 128
PATCH_SIZE = 16
MAX_VISUAL_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2  # one per patch
QUESTION_WORDS = "Question: Answer: what color is the where how many shapes are there shape on left? one two"


def world_corpus() -> str:
    """Every word the world's captions, questions and answers use (with `Question:`/`Answer:`, LaVIT's VQA
    prompt, and the full stop), once each: a tokenizer trained on it gives one token per word."""
    words = [
        "a",
        "an",
        *shapes.COLORS,
        *shapes.SHAPES,
        *shapes.POSITIONS,
        *" ".join(shapes.PHRASES.values()).split(),
        *" ".join(shapes.RELATIONS.values()).split(),
        *QUESTION_WORDS.split(),
    ]
    words += [f"{shape}?" for shape in shapes.SHAPES] + ["shapes?", "left?", "."]
    return " ".join(dict.fromkeys(words))


def build_tokenizer() -> PreTrainedTokenizerFast:
    """LLaMA-style tokenizer whose merges make every world word a single token (byte fallback for the rest); it
    declares the world's words as the model's `known_words`."""
    return build_llama_style_tokenizer(
        world_corpus(), num_merges=10_000, known_words=sorted(set(words(world_corpus())))
    )


def build_components(seed: int = 0) -> dict:
    """The untrained demo components (same `seed`, same weights), keyed as `LavitText2ImagePipeline` takes them."""
    tokenizer = build_tokenizer()
    text_vocab = len(tokenizer)
    builders = {
        "language_model": lambda: LavitForCausalLM(
            LavitConfig(
                hidden_size=LLM_HIDDEN,
                intermediate_size=2 * LLM_HIDDEN,
                num_hidden_layers=4,
                num_attention_heads=4,
                num_key_value_heads=4,
                max_position_embeddings=256,
                bos_token_id=1,
                eos_token_id=2,
                pad_token_id=2,
                **LavitConfig.id_layout(text_vocab, CODEBOOK_SIZE),
            )
        ),
        "visual_tokenizer": lambda: LavitVisualTokenizer(
            image_size=IMAGE_SIZE,
            patch_size=PATCH_SIZE,
            hidden_size=VISION_HIDDEN,
            encoder_layers=3,
            encoder_mlp_dim=2 * VISION_HIDDEN,
            merger_layers=1,
            merger_mlp_dim=2 * VISION_HIDDEN,
            attention_head_dim=32,
            codebook_size=CODEBOOK_SIZE,
            codebook_dim=CODEBOOK_DIM,
            llm_hidden_size=LLM_HIDDEN,
        ),
        "pixel_decoder": lambda: LavitPixelDecoder(
            variant="lowres",
            codebook_size=CODEBOOK_SIZE,
            codebook_dim=CODEBOOK_DIM,
            hidden_size=VISION_HIDDEN,
            num_layers=1,
            mlp_dim=2 * VISION_HIDDEN,
            attention_head_dim=32,
            num_queries=MAX_VISUAL_TOKENS,
            output_dim=CONDITION_DIM,
            prompt_embed_dims=(CONDITION_DIM,),
            pooled_embed_dim=None,
            negative_condition_length=4,
        ),
        "unet": lambda: UNet2DConditionModel(
            sample_size=IMAGE_SIZE // 8,
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            # diffusers' UNet2DConditionModel reads `attention_head_dim` as the number of heads: 2 and 4 heads of 16.
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            attention_head_dim=(2, 4),
            norm_num_groups=8,
            cross_attention_dim=CONDITION_DIM,
        ),
        "vae": lambda: AutoencoderKL(
            block_out_channels=(32, 32, 64, 64),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            norm_num_groups=16,
            sample_size=IMAGE_SIZE,
        ),
    }
    components = {"tokenizer": tokenizer}
    with torch.random.fork_rng(devices=[]):
        for offset, (name, build) in enumerate(builders.items()):
            torch.manual_seed(seed + offset)
            components[name] = build()
        # The decoder's queries and code positions are zeros in the release's definition (a checkpoint fills
        # them); trained from scratch they must start apart, or all queries stay identical and ignore the codes.
        randomize_zero_parameters(components["pixel_decoder"])
    components["scheduler"] = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        clip_sample=False,
        set_alpha_to_one=False,
    )
    return components
