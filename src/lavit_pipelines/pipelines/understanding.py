"""LavitUnderstandingPipeline: images (+ text) -> LaVIT's stage-2 visual features -> LLaMA -> text."""

import contextlib
import copy
import json
import os
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline
from diffusers.utils import replace_example_docstring
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, PreTrainedTokenizerBase
from transformers.generation.streamers import BaseStreamer

from ..image_processor import ImageInput, LavitImageProcessor
from ..models.language_model import LavitForCausalLM
from ..models.visual_tokenizer import LavitVisualTokenizer
from ..processing import LavitProcessor
from .base import LavitPipelineMixin, read_model_index, resolve_component_class
from .lora import LANGUAGE_MODEL, LavitLoraLoaderMixin
from .outputs import LavitUnderstandingPipelineOutput
from .textual_inversion import LavitTextualInversionLoaderMixin
from .validation import (
    check_float,
    check_generator,
    check_image_items,
    check_positive_int,
    check_sampling,
    check_token_limits,
)

VQA_PROMPT = "Question: {} Answer:"
# The pipeline's generation settings when neither the call nor `generation_config` sets them.
GENERATION_DEFAULTS = dict(
    max_new_tokens=36,
    min_new_tokens=8,
    num_beams=1,
    do_sample=False,
    temperature=1.0,
    top_p=1.0,
    top_k=50,
    length_penalty=1.0,
    repetition_penalty=1.0,
    num_return_sequences=1,
    early_stopping=False,
)
# The original's caption and VQA settings.
CAPTION_DEFAULTS = dict(num_beams=2, max_new_tokens=36, min_new_tokens=8)
ANSWER_DEFAULTS = dict(num_beams=5, max_new_tokens=10, min_new_tokens=2, length_penalty=0.0, early_stopping=True)
# `generate` arguments that the pipeline builds itself from the images and prompts.
BUILT_INPUTS = ("inputs", "input_ids", "inputs_embeds", "attention_mask")
# The original's post-processing of VQA answers: keep what comes before the first of these, in this order.
ANSWER_CUTS = ("\n", "question:", "Long answer:", ",", ".")
LEMMATIZER_HINT = "pip install spacy && python -m spacy download en_core_web_sm"

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> from lavit_pipelines import LavitUnderstandingPipeline

        >>> pipe = LavitUnderstandingPipeline.from_pretrained("path/to/converted-lavit").to("cuda")
        >>> pipe.caption("dog.jpg")
        ['a dog running in the snow']
        >>> pipe.answer(["dog.jpg", "cat.png"], ["What animal is this?", "What color is the cat?"])
        ['dog', 'black']
        ```
"""


def postprocess_caption(text: str) -> str:
    """The original's caption post-processing: strip, keep the first sentence (cut at the first '.')."""
    return text.strip().split(".")[0]


def postprocess_answer(text: str) -> str:
    """The original's VQA post-processing: strip, then cut at the first '\\n', 'question:', 'Long answer:', ',', '.'."""
    text = text.strip()
    for cut in ANSWER_CUTS:
        text = text.split(cut)[0]
    return text


def load_lemmatizer():
    """spaCy's `en_core_web_sm`; ImportError without spaCy, ValueError without the model."""
    try:
        import spacy
    except ImportError as error:
        raise ImportError(f"`lemmatize=True` needs spaCy and its English model: {LEMMATIZER_HINT}") from error
    try:
        return spacy.load("en_core_web_sm")
    except OSError as error:
        raise ValueError(f"`lemmatize=True` needs spaCy's `en_core_web_sm` model: {LEMMATIZER_HINT}") from error


def lemmatize_answers(answers: list[str], nlp) -> list[str]:
    """The original's answer lemmatisation: lower-case, nouns and verbs replaced by their lemma, space-joined."""
    return [" ".join(t.lemma_ if t.pos_ in ("NOUN", "VERB") else t.text for t in nlp(a.lower())) for a in answers]


def image_token_limit(vision_config) -> int:
    """The most LLM positions an image takes: one feature per patch, plus [IMG] and [/IMG]."""
    return (vision_config["image_size"] // vision_config["patch_size"]) ** 2 + 2


def check_context_fits(
    text_ids, prompts: list[str] | None, max_new_tokens: int, image_tokens: int, context: int
) -> None:
    """ValueError when the longest of `prompts` (`text_ids`: text -> token ids), an image of `image_tokens`
    positions and `max_new_tokens` exceed the `context` of the language model."""
    longest = max((len(text_ids(p)) for p in prompts or []), default=0)
    if longest + image_tokens + max_new_tokens > context:
        raise ValueError(
            f"`prompt` ({longest} tokens) + the image (up to {image_tokens}) + `max_new_tokens` ({max_new_tokens}) "
            f"exceed the language model's {context}-token context; shorten the prompt or lower `max_new_tokens`."
        )


class _SuppressIdRange(LogitsProcessor):
    """Sets the scores of ids `start ... stop - 1` to -inf: a slice, cheaper than `suppress_tokens`' per-step
    `isin` over 16386 ids. Runs where `suppress_tokens` would: after the built-in processors, before sampling
    warpers."""

    def __init__(self, ids: range):
        self.ids = ids

    def __call__(self, input_ids, scores):
        scores[:, self.ids.start : self.ids.stop] = -float("inf")
        return scores


class _ProgressProcessor(LogitsProcessor):
    """Identity logits processor that advances a progress bar once per generated position."""

    def __init__(self, progress_bar):
        self.progress_bar = progress_bar

    def __call__(self, input_ids, scores):
        self.progress_bar.update()
        return scores


def generation_settings(generation_config: GenerationConfig | None, defaults: dict, given: dict) -> dict:
    """The value of each setting in `defaults`: the one `given` (not None), else the one `generation_config`
    sets (differs from transformers' default), else the default."""
    configured = generation_config.to_diff_dict() if generation_config is not None else {}
    return {
        name: given[name] if given.get(name) is not None else configured.get(name, default)
        for name, default in defaults.items()
    }


@contextlib.contextmanager
def _seeded_sampling(generator: torch.Generator | list[torch.Generator] | None, device: torch.device):
    """`generate` samples from torch's global RNG: reseed it from a number drawn from `generator` (the first
    one of a list), inside `fork_rng` so the caller's global RNG state is left as it was. No-op without one."""
    if isinstance(generator, list):
        generator = generator[0]
    if generator is None:
        yield
        return
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    accelerated = device.type not in ("cpu", "meta")
    with torch.random.fork_rng(
        devices=[device] if accelerated else [], device_type=device.type if accelerated else "cuda"
    ):
        torch.manual_seed(seed)
        yield


class LavitUnderstandingPipeline(
    LavitPipelineMixin, LavitLoraLoaderMixin, LavitTextualInversionLoaderMixin, DiffusionPipeline
):
    r"""Image captioning and visual question answering with LaVIT.

    Each image is tokenised with the stage-2 weights of the visual tokenizer into continuous LLM-space
    features of its kept patches; the language model reads `[IMG] features [/IMG]` (left-padded), then the
    prompt, and generates text with the visual ids suppressed.

    Args:
        tokenizer: LaVIT's LLaMA tokenizer.
        language_model: [`LavitForCausalLM`].
        visual_tokenizer: [`LavitVisualTokenizer`] (its `encode_features`).
    """

    model_cpu_offload_seq = "visual_tokenizer->language_model"
    _lora_loadable_modules = [LANGUAGE_MODEL]

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        language_model: LavitForCausalLM,
        visual_tokenizer: LavitVisualTokenizer,
    ):
        super().__init__()
        self.register_modules(tokenizer=tokenizer, language_model=language_model, visual_tokenizer=visual_tokenizer)
        self.image_processor = LavitImageProcessor.from_visual_tokenizer_config(visual_tokenizer.config)
        self._lemmatizer = None

    @classmethod
    def extract_init_dict(cls, config_dict, **kwargs):
        """Ignore, silently, the entries of components this pipeline does not use: a converted folder's
        `model_index.json` describes the text-to-image pipeline (pixel decoder, UNet, VAE, scheduler)."""
        keep = set(cls.component_names())
        config_dict = {k: v for k, v in config_dict.items() if k.startswith("_") or k in keep}
        return super().extract_init_dict(config_dict, **kwargs)

    @property
    def processor(self) -> LavitProcessor:
        """The LaVIT sequence layout of this pipeline's tokenizer, image processor and language model."""
        return LavitProcessor(self.tokenizer, self.image_processor, self.language_model.config)

    # ------------------------------------------------------------------ inputs

    @staticmethod
    def _num_images(image) -> int:
        if isinstance(image, (list, tuple)) or (isinstance(image, torch.Tensor) and image.ndim == 4):
            return len(image)
        return 1

    @staticmethod
    def _prompt_per_image(prompt: str | list[str] | None, num_images: int) -> list[str] | None:
        """One prompt per image; None without a prompt (or an empty string)."""
        if not prompt:
            return None
        return [prompt] * num_images if isinstance(prompt, str) else list(prompt)

    def check_inputs(
        self,
        image,
        prompt,
        max_new_tokens,
        min_new_tokens,
        num_beams,
        do_sample,
        temperature,
        top_p,
        top_k,
        length_penalty,
        repetition_penalty,
        num_return_sequences,
        generator,
        streamer,
    ) -> list[str] | None:
        """Raise a clear error for any invalid argument, before any model runs. Returns the prompts, one per image
        (None without a prompt)."""
        num_images = self._num_images(image)
        if prompt is not None:
            if not isinstance(prompt, (str, list, tuple)) or not all(isinstance(p, str) for p in prompt):
                raise TypeError(f"`prompt` must be a string or a list of strings, got {type(prompt).__name__}.")
            if not isinstance(prompt, str) and len(prompt) != num_images:
                raise ValueError(
                    f"`prompt` has {len(prompt)} entries but `image` has {num_images}; pass one prompt per "
                    f"image, or a single string for all."
                )
        for name, value in (("num_beams", num_beams), ("num_return_sequences", num_return_sequences)):
            check_positive_int(name, value)
        check_token_limits(min_new_tokens, max_new_tokens)
        if not do_sample and num_return_sequences > num_beams:
            raise ValueError(
                f"`num_return_sequences` ({num_return_sequences}) must be at most `num_beams` ({num_beams}) without sampling."
            )
        check_sampling(do_sample, top_k, top_p, temperature)
        check_float("length_penalty", length_penalty)
        check_float("repetition_penalty", repetition_penalty)
        check_generator(generator, num_images)
        check_image_items(list(image) if isinstance(image, (list, tuple)) else [image])
        if streamer is not None and num_beams > 1:
            raise ValueError("`streamer` cannot be used with beam search (`num_beams` > 1).")
        prompts = self._prompt_per_image(prompt, num_images)
        self.check_context(prompts, max_new_tokens)
        return prompts

    def check_context(self, prompts: list[str] | None, max_new_tokens: int) -> None:
        """ValueError when the longest prompt, an image and `max_new_tokens` do not fit the language model's context."""
        check_context_fits(
            self.processor.text_ids,
            prompts,
            max_new_tokens,
            image_token_limit(self.visual_tokenizer.config),
            self.language_model.config.max_position_embeddings,
        )

    @classmethod
    def check_prompt_fits(cls, folder: str | os.PathLike, prompt, max_new_tokens: int) -> None:
        """`check_context` from a local pipeline folder's tokenizer and configs alone, before any model loads (a Hub
        id is checked once the pipeline is loaded)."""
        folder = Path(folder)
        if not folder.is_dir():
            return
        index_path = folder / "model_index.json"
        tokenizer_cls = resolve_component_class(
            "tokenizer", read_model_index(folder).get("tokenizer"), index_path, None
        )
        configs = {}
        for name in ("visual_tokenizer", "language_model"):
            try:
                configs[name] = json.loads((folder / name / "config.json").read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
                raise ValueError(
                    f"The component `{name}`: {folder / name / 'config.json'} is not readable ({error})."
                ) from None
        tokenizer = tokenizer_cls.from_pretrained(folder / "tokenizer")
        check_context_fits(
            lambda text: tokenizer(text, add_special_tokens=False).input_ids,
            [prompt],
            max_new_tokens,
            image_token_limit(configs["visual_tokenizer"]),
            configs["language_model"]["max_position_embeddings"],
        )

    def encode_images(
        self, image, generator: torch.Generator | list[torch.Generator] | None = None
    ) -> list[torch.Tensor]:
        """Images (one call to the visual tokenizer for the whole batch) -> per image (n_i, llm_dim) features."""
        pixel_values = self.image_processor.preprocess(image)
        pixel_values = pixel_values.to(self._execution_device, self.visual_tokenizer.dtype)
        return self.visual_tokenizer.encode_features(pixel_values, generator=generator)

    def prepare_inputs_embeds(
        self, features: list[torch.Tensor], prompt: str | list[str] | None = None, pad_prompt_before_image: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per image (n_i, D) features (+ a prompt for all, or one per image) -> the LLM input (B, L, D) and attention
        mask (B, L): `[IMG] features [/IMG] prompt`, laid out by `LavitProcessor.understanding_inputs`."""
        prompts = self._prompt_per_image(prompt, len(features))
        embeddings = self.language_model.get_input_embeddings()
        return self.processor.understanding_inputs(features, prompts, embeddings, pad_prompt_before_image)

    # ------------------------------------------------------------------ call

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        image: ImageInput,
        prompt: str | list[str] | None = None,
        max_new_tokens: int | None = None,
        min_new_tokens: int | None = None,
        num_beams: int | None = None,
        do_sample: bool | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        length_penalty: float | None = None,
        repetition_penalty: float | None = None,
        num_return_sequences: int | None = None,
        early_stopping: bool | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        streamer: BaseStreamer | None = None,
        return_dict: bool = True,
        pad_prompt_before_image: bool = False,
        generation_config: GenerationConfig | None = None,
        **generate_kwargs: Any,
    ) -> LavitUnderstandingPipelineOutput | tuple:
        r"""Generate text about images.

        Each generation setting below takes, in this order, the value passed here, the value `generation_config`
        sets, or the pipeline's default (in parentheses).

        Args:
            image: a path, PIL image (any mode or size), uint8 array, a list of them, or a preprocessed
                (B, 3, 224, 224) float tensor. The batch is tokenised in one call.
            prompt: text after each image: one string for all images, or one per image.
            max_new_tokens: most generated tokens (36).
            min_new_tokens: fewest generated tokens (8, or `max_new_tokens` when that is smaller).
            num_beams: beams of beam search (1: greedy or sampling).
            do_sample: sample instead of picking the most likely tokens (False).
            temperature: softmax temperature when sampling (1.0).
            top_p: nucleus sampling threshold (1.0: off).
            top_k: keep the k most likely tokens when sampling (50; 0: off).
            length_penalty: beam-search length penalty exponent (1.0).
            repetition_penalty: penalty on tokens already generated (1.0: off).
            num_return_sequences: sequences returned per image (1).
            early_stopping: stop beam search when `num_beams` candidates are finished (False).
            generator: a `torch.Generator`, or one per image. It seeds the Gumbel patch selection and, when
                sampling, the text sampling (torch's global RNG is reseeded from the first generator inside
                `torch.random.fork_rng`, leaving the global state as it was).
            streamer: a transformers streamer that receives the generated ids (not with beam search).
            return_dict: return the output class instead of a tuple.
            pad_prompt_before_image: put a padded prompt's pads before the image (as the original's VQA) instead of
                between image and text (as its captioning). With masked pads and mask-derived positions, both
                layouts compute the same result up to float rounding.
            generation_config: a transformers `GenerationConfig`; its other fields (`no_repeat_ngram_size`,
                `bad_words_ids`, ...) apply too.
            generate_kwargs: further arguments of transformers' `generate` (`no_repeat_ngram_size`,
                `stop_strings`, `logits_processor`, `stopping_criteria`, ...).

        Examples:

        Returns:
            The text and the generated ids: a `LavitUnderstandingPipelineOutput`, or the tuple `(text, sequences)`
                with `return_dict=False`. `text` has B × `num_return_sequences` entries, `sequences` is
                (B × num_return_sequences, T) and holds the generated ids only.
        """
        given = dict(
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            num_beams=num_beams,
            do_sample=do_sample,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            length_penalty=length_penalty,
            repetition_penalty=repetition_penalty,
            num_return_sequences=num_return_sequences,
            early_stopping=early_stopping,
        )
        settings = generation_settings(generation_config, GENERATION_DEFAULTS, given)
        if given["min_new_tokens"] is None and isinstance(settings["max_new_tokens"], int):
            settings["min_new_tokens"] = min(settings["min_new_tokens"], settings["max_new_tokens"])
        prompts = self.check_inputs(
            image,
            prompt,
            settings["max_new_tokens"],
            settings["min_new_tokens"],
            settings["num_beams"],
            settings["do_sample"],
            settings["temperature"],
            settings["top_p"],
            settings["top_k"],
            settings["length_penalty"],
            settings["repetition_penalty"],
            settings["num_return_sequences"],
            generator,
            streamer,
        )
        built = sorted(set(BUILT_INPUTS) & set(generate_kwargs))
        if built:
            raise TypeError(f"{built} are built by the pipeline from `image` and `prompt`; do not pass them.")
        features = self.encode_images(image, generator)
        embeddings = self.language_model.get_input_embeddings()
        inputs_embeds, attention_mask = self.processor.understanding_inputs(
            features, prompts, embeddings, pad_prompt_before_image
        )
        unused = (("temperature", "top_p", "top_k") if not settings["do_sample"] else ()) + (
            ("length_penalty", "early_stopping") if settings["num_beams"] == 1 else ()
        )
        settings = {k: v for k, v in settings.items() if k not in unused}

        config = copy.deepcopy(generation_config or self.language_model.generation_config)
        extra = config.update(**{**self._token_ids(), **settings, **generate_kwargs})  # -> the non-config arguments
        seeded = _seeded_sampling(generator if settings["do_sample"] else None, self._execution_device)
        with self.progress_bar(total=settings["max_new_tokens"], desc="text tokens") as progress, seeded:
            processors = [_SuppressIdRange(self.language_model.lavit_token_id_range), _ProgressProcessor(progress)]
            sequences = self.language_model.generate(
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                generation_config=config,
                logits_processor=LogitsProcessorList([*processors, *extra.pop("logits_processor", [])]),
                streamer=streamer,
                tokenizer=self.tokenizer,
                **extra,
            )
        self.maybe_free_model_hooks()
        sequences = sequences.cpu()
        text = [t.strip() for t in self.tokenizer.batch_decode(sequences, skip_special_tokens=True)]
        if not return_dict:
            return text, sequences
        return LavitUnderstandingPipelineOutput(text=text, sequences=sequences)

    def _token_ids(self) -> dict:
        return dict(
            bos_token_id=self.tokenizer.bos_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.processor.pad_token_id,
        )

    @staticmethod
    def _task_defaults(defaults: dict, kwargs: dict) -> dict:
        """`kwargs` over a task's default settings, leaving out the settings that `generation_config` sets."""
        configured = kwargs.get("generation_config")
        configured = configured.to_diff_dict() if configured is not None else {}
        if kwargs.get("streamer") is not None:  # streamers need greedy search or sampling
            defaults = {**defaults, "num_beams": 1}
        settings = {**{k: v for k, v in defaults.items() if k not in configured}, **kwargs}
        if "min_new_tokens" not in kwargs and isinstance(settings.get("max_new_tokens"), int):
            settings["min_new_tokens"] = min(settings.get("min_new_tokens", 0), settings["max_new_tokens"])
        return settings

    def caption(self, image, **kwargs) -> list[str]:
        """Captions with the original's defaults (beam search with 2 beams, 8–36 new tokens, no prompt), cut
        at the first '.'. Keyword arguments go to `__call__`; with a `streamer` the search is greedy (1 beam)."""
        kwargs = self._task_defaults(CAPTION_DEFAULTS, kwargs)
        return [postprocess_caption(t) for t in self(image, **kwargs).text]

    def answer(self, image, question: str | list[str], lemmatize: bool = False, **kwargs) -> list[str]:
        """Answers to `question` (one string for all images, or one per image), prompted as
        "Question: {} Answer:", with the original's defaults (5 beams, 2–10 new tokens, length penalty 0, early
        stopping) and post-processing. `lemmatize=True` lemmatises nouns and verbs with spaCy's
        `en_core_web_sm`, as the original does by default. Keyword arguments go to `__call__`; with a `streamer`
        the search is greedy (1 beam)."""
        questions = [question] if isinstance(question, str) else question
        if not isinstance(questions, (list, tuple)) or not all(isinstance(q, str) for q in questions):
            raise TypeError(f"`question` must be a string or a list of strings, got {type(question).__name__}.")
        if lemmatize and self._lemmatizer is None:
            self._lemmatizer = load_lemmatizer()
        prompt = VQA_PROMPT.format(question) if isinstance(question, str) else [VQA_PROMPT.format(q) for q in questions]
        kwargs = {"pad_prompt_before_image": True, **self._task_defaults(ANSWER_DEFAULTS, kwargs)}
        answers = [postprocess_answer(t) for t in self(image, prompt=prompt, **kwargs).text]
        return lemmatize_answers(answers, self._lemmatizer) if lemmatize else answers
