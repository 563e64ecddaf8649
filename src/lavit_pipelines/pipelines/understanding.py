"""LavitUnderstandingPipeline: images (+ text) -> LaVIT's stage-2 visual features -> LLaMA -> text."""

import contextlib

import torch
from diffusers import DiffusionPipeline
from diffusers.utils import replace_example_docstring
from transformers import LogitsProcessor, LogitsProcessorList, PreTrainedTokenizerBase
from transformers.generation.streamers import BaseStreamer

from ..generation import left_pad
from ..image_processor import LavitImageProcessor
from ..models.language_model import LavitForCausalLM
from ..models.visual_tokenizer import LavitVisualTokenizer
from .base import LavitPipelineMixin
from .lora import LANGUAGE_MODEL, LavitLoraLoaderMixin
from .outputs import LavitUnderstandingPipelineOutput
from .validation import check_image_items, check_positive_int, check_sampling, check_token_limits

VQA_PROMPT = "Question: {} Answer:"
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


@contextlib.contextmanager
def _seeded_sampling(generator: torch.Generator | None, device: torch.device):
    """`generate` samples from torch's global RNG: reseed it from a number drawn from `generator`, inside
    `fork_rng` so the caller's global RNG state is left as it was. No-op without a generator."""
    if generator is None:
        yield
        return
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    accelerated = device.type not in ("cpu", "meta")
    with torch.random.fork_rng(devices=[device] if accelerated else [], device_type=device.type if accelerated else "cuda"):
        torch.manual_seed(seed)
        yield


class LavitUnderstandingPipeline(LavitPipelineMixin, LavitLoraLoaderMixin, DiffusionPipeline):
    r"""Image captioning and visual question answering with LaVIT.

    Each image is tokenised with the stage-2 weights of the visual tokenizer into continuous LLM-space
    features of its kept patches; the language model reads `[IMG] features [/IMG]` (left-padded), then the
    prompt, and generates text with the visual ids suppressed.

    Args:
        tokenizer: LaVIT's LLaMA tokenizer. language_model: [`LavitForCausalLM`].
        visual_tokenizer: [`LavitVisualTokenizer`] (its `encode_features`).
    """

    model_cpu_offload_seq = "visual_tokenizer->language_model"
    _lora_loadable_modules = [LANGUAGE_MODEL]

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, language_model: LavitForCausalLM, visual_tokenizer: LavitVisualTokenizer
    ):
        super().__init__()
        self.register_modules(tokenizer=tokenizer, language_model=language_model, visual_tokenizer=visual_tokenizer)
        self.image_processor = LavitImageProcessor(
            **{k: visual_tokenizer.config[k] for k in ("image_size", "image_mean", "image_std")}
        )
        self._lemmatizer = None

    @classmethod
    def extract_init_dict(cls, config_dict, **kwargs):
        """Ignore, silently, the entries of components this pipeline does not use: a converted folder's
        `model_index.json` describes the text-to-image pipeline (pixel decoder, UNet, VAE, scheduler)."""
        keep = set(cls.component_names())
        config_dict = {k: v for k, v in config_dict.items() if k.startswith("_") or k in keep}
        return super().extract_init_dict(config_dict, **kwargs)

    @property
    def pad_token_id(self) -> int:
        """The id whose embedding pads the batch (the original pads with eos, id 2)."""
        pad = self.tokenizer.pad_token_id
        return self.tokenizer.eos_token_id if pad is None else pad

    # ------------------------------------------------------------------ inputs

    @staticmethod
    def _num_images(image) -> int:
        if isinstance(image, (list, tuple)) or (isinstance(image, torch.Tensor) and image.ndim == 4):
            return len(image)
        return 1

    def check_inputs(
        self, image, prompt, max_new_tokens, min_new_tokens, num_beams, do_sample, temperature, top_p, top_k,
        length_penalty, repetition_penalty, num_return_sequences, generator, streamer,
    ) -> None:
        """Raise a clear error for any invalid argument, before any model runs."""
        if prompt is not None:
            if not isinstance(prompt, (str, list, tuple)) or not all(isinstance(p, str) for p in prompt):
                raise TypeError(f"`prompt` must be a string or a list of strings, got {type(prompt).__name__}.")
            if not isinstance(prompt, str) and len(prompt) != self._num_images(image):
                raise ValueError(
                    f"`prompt` has {len(prompt)} entries but `image` has {self._num_images(image)}; pass one prompt per "
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
        if not isinstance(length_penalty, (int, float)):
            raise TypeError(f"`length_penalty` must be a number, got {type(length_penalty).__name__}.")
        if not isinstance(repetition_penalty, (int, float)) or repetition_penalty <= 0:
            raise ValueError(f"`repetition_penalty` must be a positive number, got {repetition_penalty!r}.")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"`generator` must be a single `torch.Generator`, got {type(generator).__name__}.")
        check_image_items(list(image) if isinstance(image, (list, tuple)) else [image])
        if streamer is not None and num_beams > 1:
            raise ValueError("`streamer` cannot be used with beam search (`num_beams` > 1).")

    def encode_images(self, image, generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """Images (one call to the visual tokenizer for the whole batch) -> per image (n_i, llm_dim) features."""
        pixel_values = self.image_processor.preprocess(image)
        pixel_values = pixel_values.to(self._execution_device, self.visual_tokenizer.dtype)
        return self.visual_tokenizer.encode_features(pixel_values, generator=generator)

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        embeddings = self.language_model.get_input_embeddings()
        return embeddings(ids.to(embeddings.weight.device))

    def prepare_inputs_embeds(
        self, features: list[torch.Tensor], prompt: str | list[str] | None = None, pad_prompt_before_image: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per image (n_i, D) features (+ prompts) -> the LLM input (B, L, D) and attention mask (B, L).

        Each row is `[emb([IMG])] features [emb([/IMG])]`, left-padded with the pad (eos) embedding and mask 0,
        followed by the prompt embeddings (no BOS), left-padded the same way. A padded prompt's pads stay
        between image and text (the original's `generate`), or move before the image with
        `pad_prompt_before_image=True` (the original's `predict_answers`).
        """
        config = self.language_model.config
        weight = self.language_model.get_input_embeddings().weight
        markers = self._embed(torch.tensor([config.image_start_token_id, config.image_end_token_id]))
        rows = [torch.cat([markers[:1], f.to(weight.device, weight.dtype), markers[1:]]) for f in features]
        pad = self._embed(torch.tensor([self.pad_token_id]))[0]
        length = max(len(row) for row in rows)
        embeds = pad.expand(len(rows), length, -1).clone()
        mask = torch.zeros(len(rows), length, dtype=torch.long, device=weight.device)
        for i, row in enumerate(rows):
            embeds[i, length - len(row):] = row
            mask[i, length - len(row):] = 1
        if prompt is None or prompt == "":
            return embeds, mask

        prompts = [prompt] * len(rows) if isinstance(prompt, str) else list(prompt)
        ids = [self.tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
        ids, prompt_mask = left_pad(ids, self.pad_token_id)
        prompt_embeds, prompt_mask = self._embed(ids), prompt_mask.to(weight.device)
        if not pad_prompt_before_image:
            return torch.cat([embeds, prompt_embeds], dim=1), torch.cat([mask, prompt_mask], dim=1)
        moved_embeds, moved_mask = [], []
        for image_embeds, image_mask, text_embeds, text_mask in zip(embeds, mask, prompt_embeds, prompt_mask):
            pads = int((text_mask == 0).sum())
            moved_embeds.append(torch.cat([text_embeds[:pads], image_embeds, text_embeds[pads:]]))
            moved_mask.append(torch.cat([text_mask[:pads], image_mask, text_mask[pads:]]))
        return torch.stack(moved_embeds), torch.stack(moved_mask)

    # ------------------------------------------------------------------ call

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        image,
        prompt: str | list[str] | None = None,
        max_new_tokens: int = 36,
        min_new_tokens: int = 8,
        num_beams: int = 1,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 50,
        length_penalty: float = 1.0,
        repetition_penalty: float = 1.0,
        num_return_sequences: int = 1,
        generator: torch.Generator | None = None,
        streamer: BaseStreamer | None = None,
        return_dict: bool = True,
        early_stopping: bool = False,
        pad_prompt_before_image: bool = False,
    ):
        r"""Generate text about images.

        Args:
            image: a path, PIL image (any mode or size), uint8 array, a list of them, or a preprocessed
                (B, 3, 224, 224) float tensor. The batch is tokenised in one call.
            prompt: text after each image: one string for all images, or one per image.
            max_new_tokens, min_new_tokens: bounds on the generated length.
            num_beams, do_sample, temperature, top_p, top_k, length_penalty, repetition_penalty,
                num_return_sequences, early_stopping: transformers' generation settings.
            generator: seeds the Gumbel patch selection directly and, when sampling, the text sampling (torch's
                global RNG is reseeded from it inside `torch.random.fork_rng`, leaving the global state as it was).
            streamer: a transformers streamer that receives the generated ids (not with beam search).
            return_dict: return the output class instead of a tuple.
            pad_prompt_before_image: put a padded prompt's pads before the image (as the original's VQA) instead of
                between image and text (as its captioning). With masked pads and mask-derived positions, both
                layouts compute the same result up to float rounding.

        Examples:

        Returns:
            [`LavitUnderstandingPipelineOutput`] (or a tuple `(text, sequences)`): `text` has B ×
            `num_return_sequences` entries, `sequences` (B × num_return_sequences, T) the generated ids only.
        """
        self.check_inputs(
            image, prompt, max_new_tokens, min_new_tokens, num_beams, do_sample, temperature, top_p, top_k,
            length_penalty, repetition_penalty, num_return_sequences, generator, streamer,
        )
        features = self.encode_images(image, generator)
        inputs_embeds, attention_mask = self.prepare_inputs_embeds(features, prompt, pad_prompt_before_image)

        kwargs = {"num_beams": num_beams, "do_sample": do_sample, "repetition_penalty": repetition_penalty}
        if do_sample:
            kwargs.update(temperature=temperature, top_p=top_p, top_k=top_k)
        if num_beams > 1:
            kwargs.update(length_penalty=length_penalty, early_stopping=early_stopping)
        seeded = _seeded_sampling(generator if do_sample else None, self._execution_device)
        with self.progress_bar(total=max_new_tokens) as progress, seeded:
            sequences = self.language_model.generate(
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                max_new_tokens=max_new_tokens,
                min_new_tokens=min_new_tokens,
                num_return_sequences=num_return_sequences,
                bos_token_id=self.tokenizer.bos_token_id,
                eos_token_id=self.tokenizer.eos_token_id,
                pad_token_id=self.pad_token_id,
                logits_processor=LogitsProcessorList(
                    [_SuppressIdRange(self.language_model.lavit_token_id_range), _ProgressProcessor(progress)]
                ),
                streamer=streamer,
                **kwargs,
            )
        self.maybe_free_model_hooks()
        sequences = sequences.cpu()
        text = [t.strip() for t in self.tokenizer.batch_decode(sequences, skip_special_tokens=True)]
        if not return_dict:
            return text, sequences
        return LavitUnderstandingPipelineOutput(text=text, sequences=sequences)

    def caption(self, image, **kwargs) -> list[str]:
        """Captions with the original's defaults (beam search with 2 beams, 8–36 new tokens, no prompt), cut
        at the first '.'. Keyword arguments go to `__call__`."""
        kwargs = {"num_beams": 2, "max_new_tokens": 36, "min_new_tokens": 8, **kwargs}
        return [postprocess_caption(t) for t in self(image, **kwargs).text]

    def answer(self, image, question: str | list[str], lemmatize: bool = False, **kwargs) -> list[str]:
        """Answers to `question` (one string for all images, or one per image), prompted as
        "Question: {} Answer:", with the original's defaults (5 beams, 2–10 new tokens, length penalty 0, early
        stopping) and post-processing. `lemmatize=True` lemmatises nouns and verbs with spaCy's
        `en_core_web_sm`, as the original does by default. Keyword arguments go to `__call__`."""
        questions = [question] if isinstance(question, str) else question
        if not isinstance(questions, (list, tuple)) or not all(isinstance(q, str) for q in questions):
            raise TypeError(f"`question` must be a string or a list of strings, got {type(question).__name__}.")
        if lemmatize and self._lemmatizer is None:
            self._lemmatizer = load_lemmatizer()
        prompt = VQA_PROMPT.format(question) if isinstance(question, str) else [VQA_PROMPT.format(q) for q in questions]
        kwargs = {
            "num_beams": 5, "max_new_tokens": 10, "min_new_tokens": 2, "length_penalty": 0.0, "early_stopping": True,
            "pad_prompt_before_image": True, **kwargs,
        }
        answers = [postprocess_answer(t) for t in self(image, prompt=prompt, **kwargs).text]
        return lemmatize_answers(answers, self._lemmatizer) if lemmatize else answers
