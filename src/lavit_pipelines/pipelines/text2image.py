"""LavitText2ImagePipeline: text (and image) prompts -> LaVIT visual tokens -> pixel decoder -> UNet -> VAE."""

import inspect
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, StableDiffusionMixin, UNet2DConditionModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import replace_example_docstring
from diffusers.utils.torch_utils import randn_tensor
from transformers import PreTrainedTokenizerBase
from transformers.image_processing_utils import BaseImageProcessor

from ..image_processor import ImageInput, LavitImageProcessor
from ..models.language_model import LavitForCausalLM
from ..models.pixel_decoder import LavitPixelDecoder, LavitPixelDecoderOutput, check_visual_token_ids
from ..models.visual_tokenizer import LavitVisualTokenizer
from ..processing import LavitProcessor, images_per_prompt
from .base import LavitPipelineMixin, read_model_index
from .lora import LavitLoraLoaderMixin
from .memory import check_image_memory, images_per_batch
from .outputs import LavitText2ImagePipelineOutput
from .textual_inversion import LavitTextualInversionLoaderMixin
from .validation import (
    check_float,
    check_generator,
    check_image_items,
    check_positive_int,
    check_sampling,
    check_token_limits,
)

NO_VISUAL_TOKENIZER = (
    "`image` needs the visual tokenizer: this pipeline was loaded with `visual_tokenizer=None`; load it without that "
    "argument or pass `visual_tokenizer=`."
)
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
# LaVIT's default decoder sizes (height, width) per aspect ratio.
ASPECT_RATIO_SIZES = {
    "1:1": (1024, 1024),
    "4:3": (896, 1152),
    "3:2": (832, 1216),
    "16:9": (768, 1344),
    "2:3": (1216, 832),
    "3:4": (1152, 896),
}

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from lavit_pipelines import LavitText2ImagePipeline

        >>> pipe = LavitText2ImagePipeline.from_pretrained("path/to/converted-lavit", dtype=torch.bfloat16).to("cuda")
        >>> image = pipe("a sculpture of a duck made of wool").images[0]

        >>> # image prompts: put <image> where each image goes
        >>> image = pipe("<image> it is running in the snow", image=dog).images[0]

        >>> # text prompts only: skip the visual tokenizer (3.6 GB less in bf16)
        >>> pipe = LavitText2ImagePipeline.from_pretrained("path/to/converted-lavit", visual_tokenizer=None)
        ```
"""


def row_batches(rows: int, batch_size: int | None) -> list[slice]:
    """Slices cutting `rows` images into batches of at most `batch_size` (None: one batch)."""
    step = batch_size or max(rows, 1)
    return [slice(start, start + step) for start in range(0, rows, step)]


def concatenate(batches: list):
    """Outputs of several batches as one: PIL lists joined, arrays and tensors concatenated along the batch."""
    if isinstance(batches[0], list):
        return [image for batch in batches for image in batch]
    if isinstance(batches[0], np.ndarray):
        return np.concatenate(batches)
    return torch.cat(batches)


class PromptInputs(NamedTuple):
    """The language-model inputs of a call, checked and normalised once (`check_prompt_inputs`)."""

    prompts: list[str]
    images: list[list]  # per prompt, its images in the order of its `<image>` placeholders
    llm_guidance_scale: float
    min_new_tokens: int
    max_new_tokens: int


def check_generated_codes(prompts: list[str], codes: list[torch.Tensor], num_images_per_prompt: int) -> None:
    """ValueError naming the prompt whose sampled row holds no visual token (nothing the pixel decoder can draw)."""
    for row, row_codes in enumerate(codes):
        if len(row_codes) == 0:
            prompt = prompts[row // num_images_per_prompt]
            raise ValueError(
                f"The language model produced no visual token for the prompt {prompt!r} (image {row}); raise "
                f"`min_new_tokens` or use another seed."
            )


LAVIT_GUIDANCE_SCALE = 7.0  # the original's decoder guidance: the default of folders that set none


class LavitText2ImagePipeline(
    LavitPipelineMixin, LavitLoraLoaderMixin, LavitTextualInversionLoaderMixin, DiffusionPipeline, StableDiffusionMixin
):
    r"""Text-to-image (and image+text-to-image) generation with LaVIT.

    The language model samples visual tokens after `[IMG]` with classifier-free guidance against the bare
    `[IMG]` context; the pixel decoder turns them into UNet conditioning (SDXL for the high-res decoder,
    SD-1.5 for the low-res one); the UNet denoises with guidance against the decoder's negative condition.

    Args:
        tokenizer: LaVIT's LLaMA tokenizer.
        language_model: [`LavitForCausalLM`].
        pixel_decoder: [`LavitPixelDecoder`].
        unet: the diffusion decoder's UNet (SDXL's or SD-1.5's layout).
        vae: the diffusion decoder's VAE.
        scheduler: the diffusion decoder's scheduler (DDIM, as the original; any diffusers scheduler works).
        visual_tokenizer: [`LavitVisualTokenizer`], needed only for image prompts and `reconstruct`; skip it
            with `from_pretrained(..., visual_tokenizer=None)` (saves 3.6 GB in bf16).
        safety_checker: optional Stable Diffusion safety checker.
        feature_extractor: the safety checker's image processor.
        default_guidance_scale: the decoder guidance of calls that give none; a setting of `model_index.json`
            (as SDXL's `force_zeros_for_empty_prompt`): LaVIT's 7.0 unless the folder says otherwise.
    """

    model_cpu_offload_seq = "visual_tokenizer->language_model->pixel_decoder->unet->vae"
    _optional_components = ["visual_tokenizer", "safety_checker", "feature_extractor"]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "add_text_embeds", "add_time_ids"]  # SDXL's names

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        language_model: LavitForCausalLM,
        pixel_decoder: LavitPixelDecoder,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        scheduler: KarrasDiffusionSchedulers,
        visual_tokenizer: LavitVisualTokenizer | None = None,
        safety_checker: StableDiffusionSafetyChecker | None = None,
        feature_extractor: BaseImageProcessor | None = None,
        default_guidance_scale: float = LAVIT_GUIDANCE_SCALE,
    ):
        super().__init__()
        check_float("guidance_scale", default_guidance_scale, label="`default_guidance_scale`")
        self.register_to_config(default_guidance_scale=default_guidance_scale)
        self.register_modules(
            tokenizer=tokenizer,
            language_model=language_model,
            pixel_decoder=pixel_decoder,
            unet=unet,
            vae=vae,
            scheduler=scheduler,
            visual_tokenizer=visual_tokenizer,
            safety_checker=safety_checker,
            feature_extractor=feature_extractor,
        )
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        self.visual_image_processor = (
            LavitImageProcessor.from_visual_tokenizer_config(visual_tokenizer.config)
            if visual_tokenizer
            else LavitImageProcessor()
        )
        if None not in (language_model, pixel_decoder, unet):
            self.check_components()

    @classmethod
    def check_folder(cls, folder, passed: dict) -> None:
        """The components' checks (`LavitPipelineMixin.check_folder`) and the folder's `default_guidance_scale`."""
        super().check_folder(folder, passed)
        index_path = folder / "model_index.json"
        value = read_model_index(folder).get("default_guidance_scale", LAVIT_GUIDANCE_SCALE)
        check_float("guidance_scale", value, label=f"{index_path}: `default_guidance_scale`")

    def check_components(self) -> None:
        """ValueError naming the components whose dimensions do not fit together."""
        codes = self.pixel_decoder.config.codebook_size
        if self.language_model.config.visual_vocab_size != codes:
            raise ValueError(
                f"`language_model` has {self.language_model.config.visual_vocab_size} visual ids but `pixel_decoder` "
                f"a codebook of {codes}."
            )
        if self.visual_tokenizer is not None and self.visual_tokenizer.config.codebook_size != codes:
            raise ValueError(
                f"`visual_tokenizer` has a codebook of {self.visual_tokenizer.config.codebook_size} but `pixel_decoder` of {codes}."
            )
        width = sum(self.pixel_decoder.config.prompt_embed_dims)
        if self.unet.config.cross_attention_dim != width:
            raise ValueError(
                f"`unet` expects conditioning of width {self.unet.config.cross_attention_dim} but `pixel_decoder` "
                f"gives {width}."
            )

    @property
    def processor(self) -> LavitProcessor:
        """The LaVIT sequence layout of this pipeline's tokenizer, visual image processor and language model."""
        return LavitProcessor(self.tokenizer, self.visual_image_processor, self.language_model.config)

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 1

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    # ------------------------------------------------------------------ inputs

    @staticmethod
    def _as_prompt_list(prompt) -> list[str]:
        if isinstance(prompt, str):
            return [prompt]
        if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
            return list(prompt)
        raise TypeError(f"`prompt` must be a string or a non-empty list of strings, got {type(prompt).__name__}.")

    def check_inputs(
        self,
        prompt,
        image,
        visual_token_ids,
        height,
        width,
        num_inference_steps,
        guidance_scale,
        llm_guidance_scale,
        do_sample,
        top_k,
        top_p,
        temperature,
        min_new_tokens,
        max_new_tokens,
        num_images_per_prompt,
        generator,
        latents,
        output_type,
        callback_on_step_end_tensor_inputs,
        eta=0.0,
    ) -> PromptInputs | None:
        """Raise a clear error for any invalid argument, before any model runs. Returns the checked language-model
        inputs (`check_prompt_inputs`), or None with `visual_token_ids`."""
        if (prompt is None) == (visual_token_ids is None):
            raise ValueError("Pass exactly one of `prompt` and `visual_token_ids`.")
        checked = None
        if visual_token_ids is not None:
            check_visual_token_ids(
                visual_token_ids, self.pixel_decoder.config.codebook_size, self.pixel_decoder.config.num_queries
            )
            if image is not None:
                raise ValueError("`image` is only used with `prompt`; `visual_token_ids` skips the language model.")
        else:
            checked = self.check_prompt_inputs(
                prompt, image, llm_guidance_scale, do_sample, top_k, top_p, temperature, min_new_tokens, max_new_tokens
            )
        for name, size in (("height", height), ("width", width)):
            if not isinstance(size, int) or size <= 0 or size % self.vae_scale_factor:
                raise ValueError(f"`{name}` must be a positive multiple of {self.vae_scale_factor}, got {size!r}.")
        check_positive_int("num_inference_steps", num_inference_steps)
        check_float("guidance_scale", guidance_scale)
        check_float("eta", eta)
        check_positive_int("num_images_per_prompt", num_images_per_prompt)
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        if not set(callback_on_step_end_tensor_inputs or []) <= set(self._callback_tensor_inputs):
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` must be a subset of {self._callback_tensor_inputs}, "
                f"got {callback_on_step_end_tensor_inputs}."
            )
        batch = (len(visual_token_ids) if checked is None else len(checked.prompts)) * num_images_per_prompt
        shape = (batch, self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if latents is not None and (not isinstance(latents, torch.Tensor) or tuple(latents.shape) != shape):
            got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise ValueError(f"`latents` must be a tensor of shape {shape} for this batch and size, got {got}.")
        if latents is not None and not torch.isfinite(latents).all():
            raise ValueError("`latents` must hold finite values, found NaN or infinity.")
        check_generator(generator, batch)
        default_size = self.unet.config.sample_size * self.vae_scale_factor
        check_image_memory(self.vae, height, width, self._execution_device, default_size)
        return checked

    def check_schedule(self, timesteps, sigmas) -> None:
        """ValueError unless at most one of `timesteps` and `sigmas` is given, and the scheduler takes it."""
        if timesteps is not None and sigmas is not None:
            raise ValueError("Pass at most one of `timesteps` and `sigmas`.")
        for name, value in (("timesteps", timesteps), ("sigmas", sigmas)):
            if value is not None and name not in inspect.signature(self.scheduler.set_timesteps).parameters:
                raise ValueError(f"`{name}`: {type(self.scheduler).__name__} does not take custom {name}.")

    def check_prompt_inputs(
        self, prompt, image, llm_guidance_scale, do_sample, top_k, top_p, temperature, min_new_tokens, max_new_tokens
    ) -> PromptInputs:
        """The language-model stage's arguments, checked once: the prompts as a list, the images grouped per prompt,
        the guidance (4.0, or 5.0 when the prompts hold images) and the token limits (`default_token_limits`)."""
        min_new_tokens, max_new_tokens = self.default_token_limits(min_new_tokens, max_new_tokens)
        self.check_sampling_inputs(
            llm_guidance_scale, do_sample, top_k, top_p, temperature, min_new_tokens, max_new_tokens
        )
        prompts = self._as_prompt_list(prompt)
        images = self.check_image_prompts(prompts, image)
        if llm_guidance_scale is None:
            llm_guidance_scale = 5.0 if any(len(group) for group in images) else 4.0
        return PromptInputs(prompts, images, llm_guidance_scale, min_new_tokens, max_new_tokens)

    def check_sampling_inputs(
        self, llm_guidance_scale, do_sample, top_k, top_p, temperature, min_new_tokens, max_new_tokens
    ):
        if llm_guidance_scale is not None:
            check_float("llm_guidance_scale", llm_guidance_scale)
        check_token_limits(min_new_tokens, max_new_tokens)
        context = self.language_model.config.max_position_embeddings
        if max_new_tokens >= context - 1:
            raise ValueError(
                f"`max_new_tokens` must leave room for the prompt in the {context}-token context, got {max_new_tokens}."
            )
        queries = self.pixel_decoder.config.num_queries if self.pixel_decoder is not None else max_new_tokens
        if max_new_tokens > queries:
            raise ValueError(
                f"`max_new_tokens` must be at most the pixel decoder's {queries} visual tokens, got {max_new_tokens}."
            )
        check_sampling(do_sample, top_k, top_p, temperature)

    def check_image_prompts(self, prompts: list[str], image) -> list[list]:
        """Images grouped per prompt, checked against the placeholders, the files and the visual tokenizer."""
        images = images_per_prompt(prompts, image)
        flat = [item for group in images for item in group]
        check_image_items(flat)
        if flat and self.visual_tokenizer is None:
            raise ValueError(NO_VISUAL_TOKENIZER)
        return images

    def check_reconstruct_inputs(self, images: list, num_inference_steps, guidance_scale, eta) -> None:
        """What `reconstruct` checks before the visual tokenizer runs (the rest is checked by `__call__`)."""
        if not images:
            raise ValueError("`image` must hold at least one image.")
        check_image_items(images)
        if self.visual_tokenizer is None:
            raise ValueError(NO_VISUAL_TOKENIZER)
        check_positive_int("num_inference_steps", num_inference_steps)
        check_float("guidance_scale", guidance_scale)
        check_float("eta", eta)

    # ------------------------------------------------------------------ language-model stage

    def default_token_limits(self, min_new_tokens: int | None, max_new_tokens: int | None) -> tuple[int, int]:
        """(min, max) new visual tokens, None meaning the model's default: at most min(200, the pixel decoder's
        `num_queries`), at least a tenth of that but never more than the maximum (LaVIT's 200 and 20 for the release)."""
        most = min(200, self.pixel_decoder.config.num_queries)
        max_new_tokens = most if max_new_tokens is None else max_new_tokens
        if min_new_tokens is None:
            min_new_tokens = max(1, most // 10)
            if isinstance(max_new_tokens, int):
                min_new_tokens = min(min_new_tokens, max_new_tokens)
        return min_new_tokens, max_new_tokens

    def encode_prompt(
        self, prompts: list[str], images: list[list], max_new_tokens: int = 200, generator=None
    ) -> list[torch.Tensor]:
        """Prompts with `<image>` placeholders -> per prompt the LLM ids: text segments tokenised on their own
        (no BOS), each image as its visual codes + offset (no [IMG]/[/IMG]), then `[IMG]`."""
        codes = self._tokenize_images([img for imgs in images for img in imgs], generator)
        visual_ids = iter([self.language_model.codes_to_token_ids(c.cpu()) for c in codes])
        processor = self.processor
        return [
            torch.tensor(processor.prompt_ids(prompt, [next(visual_ids) for _ in group], max_new_tokens))
            for prompt, group in zip(prompts, images)
        ]

    def _tokenize_images(self, images: list, generator) -> list[torch.Tensor]:
        """All prompt images, tokenised in one batch with the stage-1 weights -> codes per image (the callers' checks
        have made sure that there is a visual tokenizer when there are images)."""
        if not images:
            return []
        preprocess = self.visual_image_processor.preprocess
        pixels = torch.cat([preprocess(i[None] if isinstance(i, torch.Tensor) else i) for i in images])
        pixels = pixels.to(self._execution_device, self.visual_tokenizer.dtype)
        return self.visual_tokenizer.tokenize(
            pixels, generator=generator[0] if isinstance(generator, list) else generator
        )

    @torch.no_grad()
    def generate_visual_tokens(
        self,
        prompt: str | list[str],
        image=None,
        llm_guidance_scale: float | None = None,
        do_sample: bool = True,
        top_k: int = 50,
        top_p: float = 1.0,
        temperature: float = 1.0,
        min_new_tokens: int | None = None,
        max_new_tokens: int | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        cache_implementation: str = "dynamic",
        compile: bool = False,
        max_batch_size: int | None = None,
    ) -> list[torch.Tensor]:
        """The language-model stage alone: prompts -> per image a LongTensor of codebook indices, sampled in batches
        of at most `max_batch_size` images (None: all at once); with one generator per image the codes do not
        depend on the batches.

        `llm_guidance_scale` defaults to 4.0 for text prompts and 5.0 when the prompts hold images; the token limits
        to `default_token_limits`.
        `cache_implementation="static"` (optionally with `compile=True`) decodes with a preallocated KV cache and
        fixed shapes, for `torch.compile`/CUDA graphs; the tokens are the same (see `docs/speed.md`).
        """
        checked = self.check_prompt_inputs(
            prompt, image, llm_guidance_scale, do_sample, top_k, top_p, temperature, min_new_tokens, max_new_tokens
        )
        return self._generate_visual_tokens(
            checked,
            do_sample,
            top_k,
            top_p,
            temperature,
            num_images_per_prompt,
            generator,
            cache_implementation,
            compile,
            max_batch_size,
        )

    def _generate_visual_tokens(
        self,
        checked: PromptInputs,
        do_sample,
        top_k,
        top_p,
        temperature,
        num_images_per_prompt,
        generator,
        cache_implementation: str = "dynamic",
        compile: bool = False,
        max_batch_size: int | None = None,
    ) -> list[torch.Tensor]:
        """`generate_visual_tokens` on inputs that `check_prompt_inputs` has checked."""
        encoded = self.encode_prompt(checked.prompts, checked.images, checked.max_new_tokens, generator)
        rows = [ids for ids in encoded for _ in range(num_images_per_prompt)]
        batches = row_batches(len(rows), max_batch_size)
        generated = []
        with self.progress_bar(total=checked.max_new_tokens * len(batches), desc="visual tokens") as progress:
            for batch in batches:
                generated += self.language_model.sample_visual_tokens(
                    rows[batch],
                    pad_token_id=self.processor.pad_token_id,
                    guidance_scale=checked.llm_guidance_scale,
                    min_new_tokens=checked.min_new_tokens,
                    max_new_tokens=checked.max_new_tokens,
                    do_sample=do_sample,
                    temperature=temperature,
                    top_k=top_k,
                    top_p=top_p,
                    generator=generator[batch] if isinstance(generator, list) else generator,
                    progress_bar=progress,
                    cache_implementation=cache_implementation,
                    compile=compile,
                )
            progress.total = progress.n  # the images ended after this many tokens: the bar ends full
        codes = [self.language_model.token_ids_to_codes(row) for row in generated]
        check_generated_codes(checked.prompts, codes, num_images_per_prompt)
        return codes

    # ------------------------------------------------------------------ diffusion stage

    def encode_visual_tokens(self, visual_token_ids: list[torch.Tensor]) -> LavitPixelDecoderOutput:
        """Codes per image -> UNet conditioning. For the high-res decoder, `prompt_embeds`,
        `pooled_prompt_embeds` and their (zero) negatives plug straight into a diffusers
        `StableDiffusionXLPipeline` built from this pipeline's `unet`, `vae` and `scheduler`."""
        return self.pixel_decoder(visual_token_ids)

    def prepare_conditioning(
        self, decoded: LavitPixelDecoderOutput, height: int, width: int
    ) -> dict[str, torch.Tensor]:
        """SDXL's denoising conditioning, negatives first under guidance: `prompt_embeds` (2B, Q, D),
        `add_text_embeds` (2B, pooled) and `add_time_ids` (2B, 6); without guidance B rows. The low-res decoder
        has no added conditioning (those two are (rows, 0) and unused) but attention masks, `prompt_attention_mask`
        (rows, Q)."""
        dtype = self.unet.dtype

        def both(positive, negative):
            return torch.cat([negative, positive]) if self.do_classifier_free_guidance else positive

        prompt_embeds = both(decoded.prompt_embeds, decoded.negative_prompt_embeds).to(dtype)
        rows, device = len(prompt_embeds), prompt_embeds.device
        conditioning = {
            "prompt_embeds": prompt_embeds,
            "add_text_embeds": torch.zeros(rows, 0, dtype=dtype, device=device),
            "add_time_ids": torch.zeros(rows, 0, dtype=dtype, device=device),
        }
        if decoded.pooled_prompt_embeds is not None:
            pooled = both(decoded.pooled_prompt_embeds, decoded.negative_pooled_prompt_embeds)
            conditioning["add_text_embeds"] = pooled.to(dtype)
            conditioning["add_time_ids"] = torch.tensor(
                [[height, width, 0, 0, height, width]], dtype=dtype, device=device
            ).repeat(rows, 1)
        if decoded.prompt_attention_mask is not None:
            conditioning["prompt_attention_mask"] = both(
                decoded.prompt_attention_mask, decoded.negative_prompt_attention_mask
            )
        return conditioning

    def unet_inputs(self, conditioning: dict[str, torch.Tensor], guided: bool, batch_size: int) -> dict:
        """The UNet's conditioning keyword arguments for one step. Without guidance only the positive half of
        each tensor is used: a callback may have switched guidance off without cutting the negatives away."""

        def rows(tensor):
            return tensor[batch_size:] if not guided and len(tensor) == 2 * batch_size else tensor

        kwargs = {"encoder_hidden_states": rows(conditioning["prompt_embeds"])}
        if self.unet.config.addition_embed_type == "text_time":
            kwargs["added_cond_kwargs"] = {
                "text_embeds": rows(conditioning["add_text_embeds"]),
                "time_ids": rows(conditioning["add_time_ids"]),
            }
        if "prompt_attention_mask" in conditioning:
            kwargs["encoder_attention_mask"] = rows(conditioning["prompt_attention_mask"])
        return kwargs

    def set_timesteps(self, num_inference_steps: int, device, timesteps=None, sigmas=None) -> torch.Tensor:
        """The scheduler's timesteps from `num_inference_steps`, or from custom `timesteps` / `sigmas` (checked by
        `check_schedule`), as diffusers' `retrieve_timesteps` sets them. (That helper lives in diffusers' SDXL pipeline
        module, whose import pulls in transformers' CLIP image processors and their warnings, so it is not imported.)"""
        custom = {name: value for name, value in (("timesteps", timesteps), ("sigmas", sigmas)) if value is not None}
        self.scheduler.set_timesteps(**(custom or {"num_inference_steps": num_inference_steps}), device=device)
        return self.scheduler.timesteps

    def prepare_latents(self, batch_size, height, width, dtype, device, generator, latents=None) -> torch.Tensor:
        """Initial noise (B, C, h/f, w/f), scaled by the scheduler's `init_noise_sigma` (call after setting the
        timesteps: for schedulers such as Euler the sigma depends on them)."""
        shape = (
            batch_size,
            self.unet.config.in_channels,
            height // self.vae_scale_factor,
            width // self.vae_scale_factor,
        )
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        return latents.to(device=device, dtype=dtype) * self.scheduler.init_noise_sigma

    def _step_kwargs(self, generator, eta: float) -> dict:
        accepted = inspect.signature(self.scheduler.step).parameters
        return {k: v for k, v in (("generator", generator), ("eta", eta)) if k in accepted}

    def denoise(self, latents, conditioning, timesteps, generator, eta, callback, callback_inputs):
        """The UNet loop with classifier-free guidance against the decoder's negative condition. Guidance is
        re-read every step, and callbacks may replace `latents` and the conditioning tensors (SDXL's names)."""
        self._num_timesteps = len(timesteps)
        step_kwargs = self._step_kwargs(generator, eta)
        with self.progress_bar(total=len(timesteps), desc="denoising") as progress:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                guided = self.do_classifier_free_guidance
                model_input = torch.cat([latents] * 2) if guided else latents
                model_input = self.scheduler.scale_model_input(model_input, t)
                unet_kwargs = self.unet_inputs(conditioning, guided, len(latents))
                noise = self.unet(model_input, t, **unet_kwargs, return_dict=False)[0]
                if guided:
                    uncond, cond = noise.chunk(2)
                    noise = uncond + self.guidance_scale * (cond - uncond)
                latents = self.scheduler.step(noise, t, latents, **step_kwargs, return_dict=False)[0]
                if callback is not None:
                    tensors = {"latents": latents, **conditioning}
                    outputs = callback(self, i, t, {k: tensors[k] for k in callback_inputs})
                    latents = outputs.pop("latents", latents)
                    conditioning.update({k: v for k, v in outputs.items() if k in self._callback_tensor_inputs})
                progress.update()
        return latents

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [-1, 1] (B, 3, H, W); the VAE runs in float32 when it needs upcasting."""
        needs_upcasting = self.vae.dtype == torch.float16 and self.vae.config.force_upcast
        if needs_upcasting:
            self.vae.to(torch.float32)
        image = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor, return_dict=False)[0]
        if needs_upcasting:
            self.vae.to(torch.float16)
        return image

    def run_safety_checker(self, image: torch.Tensor, dtype) -> tuple[torch.Tensor, list[bool] | None]:
        if self.safety_checker is None:
            return image, None
        pil = self.image_processor.postprocess(image, output_type="pil")
        clip_input = self.feature_extractor(pil, return_tensors="pt").pixel_values.to(self._execution_device, dtype)
        return self.safety_checker(images=image, clip_input=clip_input)

    def decode_visual_tokens(
        self,
        visual_token_ids,
        height,
        width,
        num_inference_steps,
        timesteps,
        sigmas,
        generator,
        latents,
        eta,
        output_type,
        callback_on_step_end,
        callback_on_step_end_tensor_inputs,
    ):
        """One batch of the diffusion stage: codes per image -> (images in `output_type`, NSFW flags or None)."""
        device = self._execution_device
        conditioning = self.prepare_conditioning(self.encode_visual_tokens(visual_token_ids), height, width)
        dtype = conditioning["prompt_embeds"].dtype
        timesteps = self.set_timesteps(num_inference_steps, device, timesteps, sigmas)
        latents = self.prepare_latents(len(visual_token_ids), height, width, dtype, device, generator, latents)
        latents = self.denoise(
            latents, conditioning, timesteps, generator, eta, callback_on_step_end, callback_on_step_end_tensor_inputs
        )
        if output_type == "latent":
            return latents, None
        images, nsfw = self.run_safety_checker(self.decode_latents(latents), dtype)
        denormalize = None if nsfw is None else [not flagged for flagged in nsfw]
        return self.image_processor.postprocess(images, output_type=output_type, do_denormalize=denormalize), nsfw

    # ------------------------------------------------------------------ call

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image: ImageInput | None = None,
        visual_token_ids: list[torch.Tensor] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 25,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float | None = None,
        llm_guidance_scale: float | None = None,
        do_sample: bool = True,
        top_k: int = 50,
        top_p: float = 1.0,
        temperature: float = 1.0,
        min_new_tokens: int | None = None,
        max_new_tokens: int | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        eta: float = 0.0,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 - diffusers' signature, never mutated
        llm_decoding_kwargs: dict | None = None,
        max_batch_size: int | None = None,
    ) -> LavitText2ImagePipelineOutput | tuple:
        r"""Generate images from prompts, or decode given visual tokens.

        Args:
            prompt: text, or a list of texts; `<image>` marks where each image of `image` goes.
            image: the prompt images (PIL, paths, or a preprocessed (N, 3, 224, 224) tensor); a list per prompt
                when `prompt` is a list.
            visual_token_ids: per image a LongTensor of codebook indices; skips the language model.
            height: output height, a multiple of the VAE factor; default the UNet's native size (1024 for the
                high-res decoder, 512 for the low-res one). LaVIT's aspect ratios: `ASPECT_RATIO_SIZES`.
            width: output width, as `height`.
            num_inference_steps: denoising steps.
            timesteps: custom denoising timesteps, for schedulers whose `set_timesteps` takes them (overrides
                `num_inference_steps`).
            sigmas: custom sigmas, for schedulers whose `set_timesteps` takes them (overrides
                `num_inference_steps`).
            guidance_scale: decoder guidance against the pixel decoder's negative condition (off when <= 1);
                default the pipeline's `config.default_guidance_scale` (LaVIT's 7.0; 2.5 for the demo model).
            llm_guidance_scale: guidance of the visual-token sampling; default 4.0 (5.0 with image prompts).
            do_sample: sample the visual tokens (False: greedy).
            top_k: visual-token top-k (0: off).
            top_p: visual-token nucleus threshold (1.0: off).
            temperature: visual-token softmax temperature.
            min_new_tokens: fewest visual tokens before `[/IMG]` may end the image (default: `default_token_limits`).
            max_new_tokens: most visual tokens per image (default: `default_token_limits`).
            num_images_per_prompt: images per prompt (each with its own visual tokens).
            generator: a `torch.Generator` (or one per image) for the tokens and the initial noise.
            latents: initial noise (B, C, height/8, width/8).
            eta: DDIM's eta (schedulers that take it).
            output_type: "pil", "np", "pt" or "latent".
            return_dict: return the output class instead of a tuple.
            callback_on_step_end: called after every denoising step as `callback(pipe, step, timestep, tensors)`
                (or a diffusers `PipelineCallback`); the tensors it returns replace the pipeline's.
            callback_on_step_end_tensor_inputs: the tensors the callback receives, from
                `_callback_tensor_inputs`: `latents`, `prompt_embeds`, `add_text_embeds`, `add_time_ids` (SDXL's
                names; under guidance the negative rows come first).
            llm_decoding_kwargs: passed to `generate_visual_tokens`: `cache_implementation` ("dynamic" or
                "static") and `compile`.
            max_batch_size: images sampled and decoded per batch (each batch with its own progress bars); None: as
                many as fit the memory available (`pipelines/memory.py`). With one generator per image the results do
                not depend on the batches.

        Examples:

        Returns:
            The images and their visual tokens: a `LavitText2ImagePipelineOutput`, or the tuple
                `(images, visual_token_ids)` with `return_dict=False`.
        """
        self.check_schedule(timesteps, sigmas)
        if max_batch_size is not None:
            check_positive_int("max_batch_size", max_batch_size)
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        default_size = self.unet.config.sample_size * self.vae_scale_factor
        height, width = height or default_size, width or default_size
        guidance_scale = self.config.default_guidance_scale if guidance_scale is None else guidance_scale
        checked = self.check_inputs(
            prompt,
            image,
            visual_token_ids,
            height,
            width,
            num_inference_steps,
            guidance_scale,
            llm_guidance_scale,
            do_sample,
            top_k,
            top_p,
            temperature,
            min_new_tokens,
            max_new_tokens,
            num_images_per_prompt,
            generator,
            latents,
            output_type,
            callback_on_step_end_tensor_inputs,
            eta=eta,
        )
        self._guidance_scale = guidance_scale
        self._interrupt = False
        device = self._execution_device

        batch_size = max_batch_size or images_per_batch(self.vae, height, width, device)
        if visual_token_ids is None:
            visual_token_ids = self._generate_visual_tokens(
                checked,
                do_sample,
                top_k,
                top_p,
                temperature,
                num_images_per_prompt,
                generator,
                max_batch_size=batch_size,
                **(llm_decoding_kwargs or {}),
            )
        else:
            visual_token_ids = [
                torch.as_tensor(ids).long() for ids in visual_token_ids for _ in range(num_images_per_prompt)
            ]
        decoded = [
            self.decode_visual_tokens(
                visual_token_ids[batch],
                height,
                width,
                num_inference_steps,
                timesteps,
                sigmas,
                generator[batch] if isinstance(generator, list) else generator,
                None if latents is None else latents[batch],
                eta,
                output_type,
                callback_on_step_end,
                callback_on_step_end_tensor_inputs,
            )
            for batch in row_batches(len(visual_token_ids), batch_size)
        ]
        images = concatenate([images for images, _ in decoded])
        nsfw = None if decoded[0][1] is None else [flag for _, flags in decoded for flag in flags]
        self.maybe_free_model_hooks()
        visual_token_ids = [ids.cpu() for ids in visual_token_ids]
        if not return_dict:
            return images, visual_token_ids
        return LavitText2ImagePipelineOutput(
            images=images, visual_token_ids=visual_token_ids, nsfw_content_detected=nsfw
        )

    @torch.no_grad()
    def reconstruct(self, image, num_inference_steps: int = 50, guidance_scale: float = 5.0, generator=None, **kwargs):
        """Image -> stage-1 visual tokens -> image (LaVIT's reconstruction: 50 steps, guidance 5.0).
        Further keyword arguments go to `__call__`."""
        images = list(image) if isinstance(image, (list, tuple, torch.Tensor)) else [image]
        self.check_reconstruct_inputs(images, num_inference_steps, guidance_scale, kwargs.get("eta", 0.0))
        codes = self._tokenize_images(images, generator)
        return self(
            visual_token_ids=codes,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=generator,
            **kwargs,
        )
