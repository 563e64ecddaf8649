"""LavitText2ImagePipeline: text (and image) prompts -> LaVIT visual tokens -> pixel decoder -> UNet -> VAE."""

import inspect
from typing import Callable

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import logging, replace_example_docstring
from diffusers.utils.torch_utils import randn_tensor
from transformers import PreTrainedTokenizerBase

from ..generation import sample_visual_tokens
from ..image_processor import LavitImageProcessor
from ..models.language_model import LavitForCausalLM
from ..models.pixel_decoder import LavitPixelDecoder, LavitPixelDecoderOutput, check_visual_token_ids
from ..models.visual_tokenizer import LavitVisualTokenizer
from .base import LavitPipelineMixin
from .lora import LavitLoraLoaderMixin
from .outputs import LavitText2ImagePipelineOutput
from .validation import check_image_items, check_positive_int, check_sampling, check_token_limits

logger = logging.get_logger(__name__)

IMAGE_PLACEHOLDER = "<image>"
NO_VISUAL_TOKENIZER = (
    "`image` needs the visual tokenizer: load the pipeline with `load_visual_tokenizer=True` or pass `visual_tokenizer=`."
)
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
# LaVIT's default decoder sizes (height, width) per aspect ratio.
ASPECT_RATIO_SIZES = {
    "1:1": (1024, 1024), "4:3": (896, 1152), "3:2": (832, 1216), "16:9": (768, 1344), "2:3": (1216, 832), "3:4": (1152, 896)
}

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from lavit_pipelines import LavitText2ImagePipeline

        >>> pipe = LavitText2ImagePipeline.from_pretrained("path/to/converted-lavit", torch_dtype=torch.bfloat16).to("cuda")
        >>> image = pipe("a sculpture of a duck made of wool").images[0]

        >>> # image prompts: load the visual tokenizer and put <image> where each image goes
        >>> pipe = LavitText2ImagePipeline.from_pretrained("path/to/converted-lavit", load_visual_tokenizer=True)
        >>> image = pipe("<image> it is running in the snow", image=dog).images[0]
        ```
"""


class LavitText2ImagePipeline(LavitPipelineMixin, LavitLoraLoaderMixin, DiffusionPipeline):
    r"""Text-to-image (and image+text-to-image) generation with LaVIT.

    The language model samples visual tokens after `[IMG]` with classifier-free guidance against the bare
    `[IMG]` context; the pixel decoder turns them into UNet conditioning (SDXL for the high-res decoder,
    SD-1.5 for the low-res one); the UNet denoises with guidance against the decoder's negative condition.

    Args:
        tokenizer: LaVIT's LLaMA tokenizer. language_model: [`LavitForCausalLM`].
        pixel_decoder: [`LavitPixelDecoder`]. unet, vae, scheduler: the diffusion decoder.
        visual_tokenizer: [`LavitVisualTokenizer`], needed only for image prompts and `reconstruct`.
        safety_checker, feature_extractor: optional Stable Diffusion safety checker and its processor.
    """

    model_cpu_offload_seq = "visual_tokenizer->language_model->pixel_decoder->unet->vae"
    _optional_components = ["visual_tokenizer", "safety_checker", "feature_extractor"]
    _callback_tensor_inputs = ["latents", "prompt_embeds"]

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        language_model: LavitForCausalLM,
        pixel_decoder: LavitPixelDecoder,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        scheduler: KarrasDiffusionSchedulers,
        visual_tokenizer: LavitVisualTokenizer | None = None,
        safety_checker=None,
        feature_extractor=None,
    ):
        super().__init__()
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
        self.visual_image_processor = LavitImageProcessor(
            **({k: visual_tokenizer.config[k] for k in ("image_size", "image_mean", "image_std")} if visual_tokenizer else {})
        )
        if None not in (language_model, pixel_decoder, unet):
            self.check_components()

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

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, load_visual_tokenizer: bool = False, **kwargs):
        """diffusers' `from_pretrained`; the visual tokenizer (only needed for image prompts and
        `reconstruct`) is loaded only with `load_visual_tokenizer=True` or when passed in."""
        if not load_visual_tokenizer:
            kwargs.setdefault("visual_tokenizer", None)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

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

    @staticmethod
    def _images_per_prompt(prompts: list[str], image) -> list[list]:
        """Group `image` by prompt: one list per prompt, as many images as its `<image>` placeholders."""
        counts = [p.count(IMAGE_PLACEHOLDER) for p in prompts]
        if image is None:
            images = [[] for _ in prompts]
        elif isinstance(image, torch.Tensor):
            images = list(image.split(counts)) if image.ndim == 4 and len(image) == sum(counts) else None
        elif len(prompts) > 1 and isinstance(image, (list, tuple)) and all(isinstance(i, (list, tuple)) for i in image):
            images = [list(i) for i in image]
        else:
            images = [list(image) if isinstance(image, (list, tuple)) else [image]] if len(prompts) == 1 else None
        if images is None or len(images) != len(prompts) or [len(i) for i in images] != counts:
            given = "no image" if image is None else f"{len(image) if isinstance(image, (list, tuple, torch.Tensor)) else 1} image entries"
            raise ValueError(
                f"The prompts hold {counts} `{IMAGE_PLACEHOLDER}` placeholders but `image` has {given}; pass one image "
                f"per placeholder (a list per prompt when `prompt` is a list)."
            )
        return images

    def check_inputs(
        self, prompt, image, visual_token_ids, height, width, num_inference_steps, guidance_scale, llm_guidance_scale,
        do_sample, top_k, top_p, temperature, min_new_tokens, max_new_tokens, num_images_per_prompt, generator,
        latents, output_type, callback_on_step_end_tensor_inputs,
    ) -> None:
        """Raise a clear error for any invalid argument, before any model runs."""
        if (prompt is None) == (visual_token_ids is None):
            raise ValueError("Pass exactly one of `prompt` and `visual_token_ids`.")
        if visual_token_ids is not None:
            check_visual_token_ids(visual_token_ids, self.pixel_decoder.config.codebook_size, self.pixel_decoder.config.num_queries)
            if image is not None:
                raise ValueError("`image` is only used with `prompt`; `visual_token_ids` skips the language model.")
        else:
            self.check_sampling_inputs(llm_guidance_scale, do_sample, top_k, top_p, temperature, min_new_tokens, max_new_tokens)
            self.check_image_prompts(self._as_prompt_list(prompt), image)
        for name, size in (("height", height), ("width", width)):
            if not isinstance(size, int) or size <= 0 or size % self.vae_scale_factor:
                raise ValueError(f"`{name}` must be a positive multiple of {self.vae_scale_factor}, got {size!r}.")
        check_positive_int("num_inference_steps", num_inference_steps)
        if not isinstance(guidance_scale, (int, float)) or guidance_scale < 0:
            raise ValueError(f"`guidance_scale` must be a non-negative number, got {guidance_scale!r}.")
        check_positive_int("num_images_per_prompt", num_images_per_prompt)
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        if not set(callback_on_step_end_tensor_inputs or []) <= set(self._callback_tensor_inputs):
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` must be a subset of {self._callback_tensor_inputs}, "
                f"got {callback_on_step_end_tensor_inputs}."
            )
        batch = (len(visual_token_ids) if visual_token_ids is not None else len(self._as_prompt_list(prompt)))
        batch *= num_images_per_prompt
        shape = (batch, self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if latents is not None and (not isinstance(latents, torch.Tensor) or tuple(latents.shape) != shape):
            got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise ValueError(f"`latents` must be a tensor of shape {shape} for this batch and size, got {got}.")
        generators = generator if isinstance(generator, list) else [generator]
        if not all(g is None or isinstance(g, torch.Generator) for g in generators):
            raise TypeError(f"`generator` must be a torch.Generator or a list of them, got {type(generator).__name__}.")
        if isinstance(generator, list) and len(generator) != batch:
            raise ValueError(f"`generator` is a list of {len(generator)}; expected one per image ({batch}).")

    def check_sampling_inputs(self, llm_guidance_scale, do_sample, top_k, top_p, temperature, min_new_tokens, max_new_tokens):
        if llm_guidance_scale is not None and (not isinstance(llm_guidance_scale, (int, float)) or llm_guidance_scale <= 0):
            raise ValueError(f"`llm_guidance_scale` must be a positive number, got {llm_guidance_scale!r}.")
        check_token_limits(min_new_tokens, max_new_tokens)
        context = self.language_model.config.max_position_embeddings
        if max_new_tokens >= context - 1:
            raise ValueError(f"`max_new_tokens` must leave room for the prompt in the {context}-token context, got {max_new_tokens}.")
        if max_new_tokens > self.pixel_decoder.config.num_queries:
            raise ValueError(
                f"`max_new_tokens` must be at most {self.pixel_decoder.config.num_queries}, the most visual tokens the "
                f"pixel decoder takes, got {max_new_tokens}."
            )
        check_sampling(do_sample, top_k, top_p, temperature)

    def check_image_prompts(self, prompts: list[str], image) -> list[list]:
        """Images grouped per prompt, checked against the placeholders, the files and the visual tokenizer."""
        images = self._images_per_prompt(prompts, image)
        flat = [item for group in images for item in group]
        check_image_items(flat)
        if flat and self.visual_tokenizer is None:
            raise ValueError(NO_VISUAL_TOKENIZER)
        return images

    # ------------------------------------------------------------------ language-model stage

    def default_token_limits(self, min_new_tokens: int | None, max_new_tokens: int | None) -> tuple[int, int]:
        """(min, max) new visual tokens, None meaning the model's default: at most min(200, the pixel decoder's
        `num_queries`), at least a tenth of that (LaVIT's 200 and 20 for the release)."""
        most = min(200, self.pixel_decoder.config.num_queries)
        return (max(1, most // 10) if min_new_tokens is None else min_new_tokens), (most if max_new_tokens is None else max_new_tokens)


    def encode_prompt(self, prompts: list[str], images: list[list], max_new_tokens: int = 200, generator=None) -> list[torch.Tensor]:
        """Prompts with `<image>` placeholders -> per prompt the LLM ids: text segments tokenised on their own
        (no BOS), each image as its visual codes + offset (no [IMG]/[/IMG]), then `[IMG]`."""
        config = self.language_model.config
        image_codes = iter(self._tokenize_images([img for imgs in images for img in imgs], generator))
        encoded = []
        for prompt in prompts:
            ids = []
            for i, segment in enumerate(prompt.split(IMAGE_PLACEHOLDER)):
                if i > 0:
                    ids += self.language_model.codes_to_token_ids(next(image_codes).cpu()).tolist()
                if segment.strip():
                    ids += self.tokenizer(segment.strip(), add_special_tokens=False).input_ids
            encoded.append(torch.tensor(self._truncate(ids, max_new_tokens) + [config.image_start_token_id]))
        return encoded

    def _truncate(self, ids: list[int], max_new_tokens: int) -> list[int]:
        """Keep the prompt ids that fit the context beside `[IMG]` and the new tokens."""
        limit = self.language_model.config.max_position_embeddings - max_new_tokens - 1
        if len(ids) > limit:
            logger.warning(f"The prompt has {len(ids)} tokens; only the first {limit} fit the language model's context.")
        return ids[:limit]

    def _tokenize_images(self, images: list, generator) -> list[torch.Tensor]:
        """All prompt images, tokenised in one batch with the stage-1 weights -> codes per image."""
        if not images:
            return []
        if self.visual_tokenizer is None:
            raise ValueError(NO_VISUAL_TOKENIZER)
        preprocess = self.visual_image_processor.preprocess
        pixels = torch.cat([preprocess(i[None] if isinstance(i, torch.Tensor) else i) for i in images])
        pixels = pixels.to(self._execution_device, self.visual_tokenizer.dtype)
        return self.visual_tokenizer.tokenize(pixels, generator=generator[0] if isinstance(generator, list) else generator)

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
    ) -> list[torch.Tensor]:
        """The language-model stage alone: prompts -> per image a LongTensor of codebook indices.

        `llm_guidance_scale` defaults to 4.0 for text prompts and 5.0 when the prompts hold images; the token limits
        to `default_token_limits`.
        `cache_implementation="static"` (optionally with `compile=True`) decodes with a preallocated KV cache and
        fixed shapes, for `torch.compile`/CUDA graphs; the tokens are the same (see `docs/speed.md`).
        """
        prompts = self._as_prompt_list(prompt)
        images = self.check_image_prompts(prompts, image)
        min_new_tokens, max_new_tokens = self.default_token_limits(min_new_tokens, max_new_tokens)
        self.check_sampling_inputs(llm_guidance_scale, do_sample, top_k, top_p, temperature, min_new_tokens, max_new_tokens)
        if llm_guidance_scale is None:
            llm_guidance_scale = 5.0 if any(images) else 4.0
        encoded = self.encode_prompt(prompts, images, max_new_tokens, generator)
        rows = [ids for ids in encoded for _ in range(num_images_per_prompt)]
        config = self.language_model.config
        with self.progress_bar(total=max_new_tokens) as progress:
            generated = sample_visual_tokens(
                self.language_model,
                rows,
                guidance_scale=llm_guidance_scale,
                unconditional_prompt=[config.image_start_token_id],
                suppress_ids=range(3, config.text_vocab_size),
                eos_token_id=config.image_end_token_id,
                pad_token_id=self.tokenizer.pad_token_id,
                min_new_tokens=min_new_tokens,
                max_new_tokens=max_new_tokens,
                do_sample=do_sample,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                generator=generator,
                progress_bar=progress,
                cache_implementation=cache_implementation,
                compile=compile,
            )
        return [self.language_model.token_ids_to_codes(row) for row in generated]

    # ------------------------------------------------------------------ diffusion stage

    def encode_visual_tokens(self, visual_token_ids: list[torch.Tensor]) -> LavitPixelDecoderOutput:
        """Codes per image -> UNet conditioning. For the high-res decoder, `prompt_embeds`,
        `pooled_prompt_embeds` and their (zero) negatives plug straight into a diffusers
        `StableDiffusionXLPipeline` built from this pipeline's `unet`, `vae` and `scheduler`."""
        return self.pixel_decoder(visual_token_ids)

    def _unet_conditioning(self, decoded: LavitPixelDecoderOutput, height: int, width: int) -> tuple[torch.Tensor, dict]:
        """Encoder hidden states and the UNet's extra kwargs; under CFG the negatives come first."""
        dtype = self.unet.dtype

        def both(positive, negative):
            return torch.cat([negative, positive]) if self.do_classifier_free_guidance else positive

        hidden = both(decoded.prompt_embeds, decoded.negative_prompt_embeds).to(dtype)
        kwargs = {}
        if decoded.pooled_prompt_embeds is not None:
            time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=dtype, device=hidden.device)
            time_ids = time_ids.repeat(len(decoded.prompt_embeds), 1)
            pooled = both(decoded.pooled_prompt_embeds, decoded.negative_pooled_prompt_embeds).to(dtype)
            kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": both(time_ids, time_ids)}
        if decoded.prompt_attention_mask is not None:
            kwargs["encoder_attention_mask"] = both(decoded.prompt_attention_mask, decoded.negative_prompt_attention_mask)
        return hidden, kwargs

    def prepare_latents(self, batch_size, height, width, dtype, device, generator, latents=None) -> torch.Tensor:
        """Initial noise (B, C, h/f, w/f), scaled by the scheduler's `init_noise_sigma`."""
        shape = (batch_size, self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        return latents.to(device=device, dtype=dtype) * self.scheduler.init_noise_sigma

    def _step_kwargs(self, generator, eta: float) -> dict:
        accepted = inspect.signature(self.scheduler.step).parameters
        return {k: v for k, v in (("generator", generator), ("eta", eta)) if k in accepted}

    def denoise(self, latents, prompt_embeds, unet_kwargs, num_inference_steps, generator, eta, callback, callback_inputs):
        """The UNet loop with classifier-free guidance against the decoder's negative condition."""
        device = latents.device
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        self._num_timesteps = len(timesteps)
        step_kwargs = self._step_kwargs(generator, eta)
        guided = self.do_classifier_free_guidance  # fixed for the loop; callbacks may change the scale itself
        with self.progress_bar(total=len(timesteps)) as progress:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                model_input = torch.cat([latents] * 2) if guided else latents
                model_input = self.scheduler.scale_model_input(model_input, t)
                noise = self.unet(model_input, t, encoder_hidden_states=prompt_embeds, **unet_kwargs, return_dict=False)[0]
                if guided:
                    uncond, cond = noise.chunk(2)
                    noise = uncond + self.guidance_scale * (cond - uncond)
                latents = self.scheduler.step(noise, t, latents, **step_kwargs, return_dict=False)[0]
                if callback is not None:
                    tensors = {"latents": latents, "prompt_embeds": prompt_embeds}
                    outputs = callback(self, i, t, {k: tensors[k] for k in callback_inputs})
                    latents = outputs.pop("latents", latents)
                    prompt_embeds = outputs.pop("prompt_embeds", prompt_embeds)
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

    # ------------------------------------------------------------------ call

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image=None,
        visual_token_ids: list[torch.Tensor] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 25,
        guidance_scale: float = 7.0,
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
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
        llm_decoding_kwargs: dict | None = None,
    ):
        r"""Generate images from prompts, or decode given visual tokens.

        Args:
            prompt: text, or a list of texts; `<image>` marks where each image of `image` goes.
            image: the prompt images (PIL, paths, or a preprocessed (N, 3, 224, 224) tensor); a list per prompt
                when `prompt` is a list.
            visual_token_ids: per image a LongTensor of codebook indices; skips the language model.
            height, width: output size, multiples of the VAE factor; default the UNet's native size
                (1024 for the high-res decoder, 512 for the low-res one). LaVIT's aspect ratios:
                `ASPECT_RATIO_SIZES`.
            num_inference_steps, guidance_scale: denoising steps and decoder guidance (off when <= 1).
            llm_guidance_scale: guidance of the visual-token sampling; default 4.0 (5.0 with image prompts).
            do_sample, top_k, top_p, temperature, min_new_tokens, max_new_tokens: visual-token sampling (token
                limits: `default_token_limits`).
            num_images_per_prompt: images per prompt (each with its own visual tokens).
            generator: a `torch.Generator` (or one per image) for the tokens and the initial noise.
            latents: initial noise (B, C, height/8, width/8).
            eta: DDIM eta. output_type: "pil", "np", "pt" or "latent". return_dict: return the output class.
            callback_on_step_end, callback_on_step_end_tensor_inputs: called after every denoising step with
                the named tensors (`latents`, `prompt_embeds`); returned tensors replace them.
            llm_decoding_kwargs: passed to `generate_visual_tokens`: `cache_implementation` ("dynamic" or
                "static") and `compile`.

        Examples:

        Returns:
            [`LavitText2ImagePipelineOutput`] (or a tuple `(images, visual_token_ids)`).
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        default_size = self.unet.config.sample_size * self.vae_scale_factor
        height, width = height or default_size, width or default_size
        min_new_tokens, max_new_tokens = self.default_token_limits(min_new_tokens, max_new_tokens)
        self.check_inputs(
            prompt, image, visual_token_ids, height, width, num_inference_steps, guidance_scale, llm_guidance_scale,
            do_sample, top_k, top_p, temperature, min_new_tokens, max_new_tokens, num_images_per_prompt, generator,
            latents, output_type, callback_on_step_end_tensor_inputs,
        )
        self._guidance_scale = guidance_scale
        self._interrupt = False
        device = self._execution_device

        if visual_token_ids is None:
            visual_token_ids = self.generate_visual_tokens(
                prompt, image, llm_guidance_scale, do_sample, top_k, top_p, temperature, min_new_tokens,
                max_new_tokens, num_images_per_prompt, generator, **(llm_decoding_kwargs or {}),
            )
        else:
            visual_token_ids = [torch.as_tensor(ids) for ids in visual_token_ids for _ in range(num_images_per_prompt)]
        decoded = self.encode_visual_tokens(visual_token_ids)
        prompt_embeds, unet_kwargs = self._unet_conditioning(decoded, height, width)
        latents = self.prepare_latents(len(visual_token_ids), height, width, prompt_embeds.dtype, device, generator, latents)
        latents = self.denoise(
            latents, prompt_embeds, unet_kwargs, num_inference_steps, generator, eta,
            callback_on_step_end, callback_on_step_end_tensor_inputs,
        )

        nsfw = None
        if output_type == "latent":
            images = latents
        else:
            images, nsfw = self.run_safety_checker(self.decode_latents(latents), prompt_embeds.dtype)
            denormalize = None if nsfw is None else [not flagged for flagged in nsfw]
            images = self.image_processor.postprocess(images, output_type=output_type, do_denormalize=denormalize)
        self.maybe_free_model_hooks()
        visual_token_ids = [ids.cpu() for ids in visual_token_ids]
        if not return_dict:
            return images, visual_token_ids
        return LavitText2ImagePipelineOutput(images=images, visual_token_ids=visual_token_ids, nsfw_content_detected=nsfw)

    @torch.no_grad()
    def reconstruct(self, image, num_inference_steps: int = 50, guidance_scale: float = 5.0, generator=None, **kwargs):
        """Image -> stage-1 visual tokens -> image (LaVIT's reconstruction: 50 steps, guidance 5.0).
        Further keyword arguments go to `__call__`."""
        codes = self._tokenize_images(list(image) if isinstance(image, (list, tuple, torch.Tensor)) else [image], generator)
        return self(
            visual_token_ids=codes, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
            generator=generator, **kwargs,
        )
