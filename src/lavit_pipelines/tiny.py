"""A complete tiny LaVIT with seeded random weights, built in code (no download): for tests and demos.

`build_tiny_components()` returns the components of a `LavitText2ImagePipeline` (plus the visual
tokenizer); `tiny_pipeline_path()` saves them once into a cache folder that `from_pretrained` loads like a
converted checkpoint. The tokenizer is a small LLaMA-style byte-fallback BPE trained here on a built-in
corpus; the language model's vocabulary is that text vocabulary + `[IMG]`, `[/IMG]` and the codebook.
"""

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import PreTrainedTokenizerFast

from . import __version__
from .models.initialization import randomize_zero_parameters
from .models.language_model import LavitConfig, LavitForCausalLM
from .models.pixel_decoder import VARIANTS, LavitPixelDecoder
from .models.visual_tokenizer import LavitVisualTokenizer
from .staging import apply_umask, clean_stale_staging, staging_folder
from .tokenization import build_llama_style_tokenizer

CORPUS = (
    "a sculpture of a duck made of wool. a photo of a dog running in the snow. a red car parked on the street. "
    "a cat sitting on a sofa in the living room. two people walking on the beach at sunset. a bowl of fruit on "
    "a wooden table. a painting of a mountain lake with trees. the city skyline at night with bright lights. "
    "a small boat on the river. an astronaut riding a horse on the moon. what is in the picture? answer the question."
)
NUM_MERGES = 160
CODEBOOK_SIZE = 512
LLM_HIDDEN = 32
PROMPT_EMBED_DIMS = {"highres": (32, 48), "lowres": (32,)}
POOLED_DIM = 48
TIME_EMBED_DIM = 8


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """The tiny model's LLaMA-style tokenizer, trained on `CORPUS` (see `build_llama_style_tokenizer`)."""
    return build_llama_style_tokenizer(CORPUS, NUM_MERGES)


def _unet(variant: str) -> UNet2DConditionModel:
    """Tiny SDXL-style (high-res) or SD-1.5-style (low-res) UNet for 8×8 latents (64×64 images)."""
    common = dict(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64), norm_num_groups=8
    )
    if variant == "highres":
        return UNet2DConditionModel(
            **common,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
            transformer_layers_per_block=(1, 2),
            use_linear_projection=True,
            cross_attention_dim=sum(PROMPT_EMBED_DIMS["highres"]),
            addition_embed_type="text_time",
            addition_time_embed_dim=TIME_EMBED_DIM,
            projection_class_embeddings_input_dim=TIME_EMBED_DIM * 6 + POOLED_DIM,
        )
    return UNet2DConditionModel(
        **common,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=4,
        cross_attention_dim=sum(PROMPT_EMBED_DIMS["lowres"]),
    )


def build_tiny_components(variant: str = "highres", seed: int = 0) -> dict:
    """Tiny LaVIT components, identical for the same `variant` and `seed` (the global RNG is left untouched).

    Keys: tokenizer, language_model, visual_tokenizer, pixel_decoder, unet, vae, scheduler, ready for
    `LavitText2ImagePipeline(**components)`. Images are 64×64 (8×8 latents, VAE ×8), codebook 512×32.
    """
    if variant not in VARIANTS:
        raise ValueError(f"`variant` must be one of {VARIANTS}, got {variant!r}.")
    tokenizer = build_tiny_tokenizer()
    text_vocab = len(tokenizer)
    builders = {
        "language_model": lambda: LavitForCausalLM(
            LavitConfig(
                hidden_size=LLM_HIDDEN,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=4,
                max_position_embeddings=1024,
                bos_token_id=1,
                eos_token_id=2,
                pad_token_id=2,
                **LavitConfig.id_layout(text_vocab, CODEBOOK_SIZE),
            )
        ),
        "visual_tokenizer": lambda: LavitVisualTokenizer(
            hidden_size=176,
            encoder_layers=2,
            encoder_mlp_dim=64,
            merger_layers=1,
            merger_mlp_dim=64,
            codebook_size=CODEBOOK_SIZE,
            codebook_dim=32,
            llm_hidden_size=LLM_HIDDEN,
        ),
        "pixel_decoder": lambda: LavitPixelDecoder(
            variant=variant,
            codebook_size=CODEBOOK_SIZE,
            codebook_dim=32,
            hidden_size=176,
            num_layers=1,
            mlp_dim=64,
            output_dim=64,
            prompt_embed_dims=PROMPT_EMBED_DIMS[variant],
            pooled_embed_dim=POOLED_DIM if variant == "highres" else None,
            negative_condition_length=7 if variant == "lowres" else None,
        ),
        "unet": lambda: _unet(variant),
        "vae": lambda: AutoencoderKL(
            block_out_channels=(8, 8, 16, 16),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=64,
            scaling_factor=0.13025 if variant == "highres" else 0.18215,
        ),
    }
    components = {"tokenizer": tokenizer}
    with torch.random.fork_rng(devices=[]):
        for offset, (name, build) in enumerate(builders.items()):
            torch.manual_seed(seed + offset)
            components[name] = build().eval()
            if name in ("visual_tokenizer", "pixel_decoder"):
                randomize_zero_parameters(components[name])
    # The visual tokenizer's codebook is the decoder's: LaVIT shares one quantizer between them.
    components["pixel_decoder"].codebook.weight.data.copy_(components["visual_tokenizer"].codebook.weight.data)
    components["scheduler"] = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        clip_sample=False,
        set_alpha_to_one=False,
    )
    return components


def _code_fingerprint() -> str:
    """Short hash of the code that defines the saved tiny model, so a changed model never loads a stale cache."""
    package = Path(__file__).parent
    digest = hashlib.sha256()
    for path in sorted([Path(__file__), *package.glob("models/*.py")]):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


MANIFEST = "lavit_manifest.json"


def _file_digests(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file in `folder` but the manifest."""
    return {
        path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != MANIFEST
    }


def _cache_is_intact(folder: Path) -> bool:
    """Whether `folder` holds exactly the files its manifest lists, byte for byte."""
    try:
        return json.loads((folder / MANIFEST).read_text(encoding="utf-8")) == _file_digests(folder)
    except (OSError, ValueError):
        return False


def tiny_pipeline_path(cache_dir: str | os.PathLike | None = None, variant: str = "highres") -> Path:
    """Folder of the saved tiny pipeline (built and saved on first use), for `LavitText2ImagePipeline.from_pretrained`.

    Default: `~/.cache/lavit_pipelines/tiny-<version>-<code hash>-<variant>`. The folder is written under a
    temporary name with a manifest of its files' hashes and renamed into place, so concurrent callers never see a
    partial folder; a cache whose files no longer match the manifest is rebuilt, and staging folders of killed
    processes are removed.
    """
    from .pipelines.text2image import LavitText2ImagePipeline

    root = Path(cache_dir) if cache_dir is not None else Path.home() / ".cache" / "lavit_pipelines"
    target = root / f"tiny-{__version__}-{_code_fingerprint()}-{variant}"
    if _cache_is_intact(target):
        return target
    root.mkdir(parents=True, exist_ok=True)
    clean_stale_staging(root)
    staging = staging_folder(target)
    try:
        if target.exists():  # corrupt: moved aside (atomically, so a concurrent caller never loads it) and removed
            try:
                os.rename(target, staging / "corrupt")
            except FileNotFoundError:  # another process moved it first
                pass
            shutil.rmtree(staging / "corrupt", ignore_errors=True)
        LavitText2ImagePipeline(**build_tiny_components(variant)).save_pretrained(staging)
        (staging / MANIFEST).write_text(json.dumps(_file_digests(staging)))
        apply_umask(staging)
        try:
            os.rename(staging, target)
        except OSError:  # another process finished first
            if not _cache_is_intact(target):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
