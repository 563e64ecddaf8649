"""Stage 3: train the language model to write and read images, both directions mixed per example.

Generation example: `text [IMG] codes [/IMG]` (stage-1 visual ids; loss on the visual ids and `[/IMG]`; with
probability `text_dropout` the text is left out, which trains the bare `[IMG]` context that LaVIT's CFG
uses as its unconditional branch). Understanding example (probability `understanding_ratio`, and always
for an example with a `prompt`, e.g. `Question: {q} Answer:`): `[IMG] features [/IMG] prompt text </s>` with
the stage-2 features of the visual tokenizer's understanding head, which trains along (loss on the text and
`</s>`, not on the prompt). Examples are packed into rows of at most `max_length`
positions; positions restart at 0 for every example, so each attends only to itself. Full fine-tuning, or
peft LoRA on `lora_target_modules`, optionally with the embedding and output rows of the LaVIT ids trained.

Subject fine-tuning (DreamBooth and textual inversion, adapted): a `placeholder_token` added after the whole
vocabulary, its input embedding started from `initializer_token` and trained (alone with `textual_inversion`);
class examples (`class_data`, marked by the `prior` column) weigh `prior_loss_weight` per token in the loss.
"""

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..image_processor import LavitImageProcessor
from ..processing import LavitProcessor
from ..tokenization import add_placeholder_tokens
from .data import PRIOR, PROMPT
from .loop import Stage, lora_layers, per_example

IGNORE = -100
UNDERSTANDING_HEAD = ("understanding_predictor", "understanding_merger", "llm_projection")
INITIALIZATION_EXAMPLES = 64  # the examples whose merged features `init_understanding_head` standardises


def pack(examples: list[tuple[torch.Tensor, torch.Tensor]], max_length: int, packing: bool):
    """(embeds (n_i, D), labels (n_i,)) per example -> groups of example indices, one group per row: greedily
    filled up to `max_length` positions with packing, one example per row without."""
    rows, current, used = [], [], 0
    for i, (embeds, _) in enumerate(examples):
        if current and (not packing or used + len(embeds) > max_length):
            rows.append(current)
            current, used = [], 0
        current.append(i)
        used += len(embeds)
    return rows + [current]


def batch_rows(examples, rows, pad_embedding: torch.Tensor):
    """Rows of examples -> inputs_embeds (R, L, D), position_ids (R, L), labels (R, L). Positions restart
    at 0 for every example and for the padding at the end of a row, which is a block of its own."""
    length = max(sum(len(examples[i][0]) for i in row) for row in rows)
    embeds, positions, labels = [], [], []
    for row in rows:
        parts = [examples[i] for i in row]
        pad = length - sum(len(e) for e, _ in parts)
        embeds.append(torch.cat([e for e, _ in parts] + [pad_embedding.expand(pad, -1)]))
        positions.append(torch.cat([torch.arange(len(e)) for e, _ in parts] + [torch.arange(pad)]))
        labels.append(torch.cat([lab for _, lab in parts] + [torch.full((pad,), IGNORE)]))
    device = pad_embedding.device
    return torch.stack(embeds), torch.stack(positions).to(device), torch.stack(labels).to(device)


def packed_logits(language_model, embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Logits (R, L, V) of packed rows, each example attending only to itself. transformers builds that
    block-diagonal mask from the restarting `positions` only when no cache is in play: with one, every example
    would also see the examples before it in its row, at positions that look like its own."""
    return language_model(inputs_embeds=embeds, position_ids=positions, use_cache=False).logits


class LanguageModelTrainingModule(nn.Module):
    """The language model and the visual tokenizer (stage-1 part frozen; understanding head trainable)."""

    def __init__(self, language_model, visual_tokenizer, text_tokenizer, config):
        super().__init__()
        self.language_model, self.visual_tokenizer = language_model, visual_tokenizer
        self.text_tokenizer, self.config = text_tokenizer, config
        image_processor = LavitImageProcessor.from_visual_tokenizer_config(visual_tokenizer.config)
        self.processor = LavitProcessor(text_tokenizer, image_processor, language_model.config)

    def embed(self, ids: list[int]) -> torch.Tensor:
        embeddings = self.language_model.get_input_embeddings()
        return embeddings(torch.tensor(ids, device=embeddings.weight.device))

    def generation_example(self, text_ids: list[int], codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> embeds and labels of `text [IMG] codes [/IMG]`, labelled on `codes [/IMG]` only."""
        image_ids = self.processor.image_ids(self.language_model.codes_to_token_ids(codes))
        labels = [IGNORE] * (len(text_ids) + 1) + image_ids[1:]
        return self.embed(text_ids + image_ids), torch.tensor(labels)

    def understanding_example(self, features: torch.Tensor, prompt_ids: list[int], text_ids: list[int]):
        """-> embeds and labels of `[IMG] features [/IMG] prompt text </s>`, labelled on `text </s>` only."""
        text = text_ids + [self.text_tokenizer.eos_token_id]
        image = self.processor.image_embeds(features, self.language_model.get_input_embeddings())
        embeds = torch.cat([image, self.embed(prompt_ids + text)])
        return embeds, torch.tensor([IGNORE] * (len(features) + 2 + len(prompt_ids)) + text)

    def forward(self, batch: dict, generators: list, step: int) -> dict:
        config, pixels = self.config, batch["pixel_values"]
        prompts = batch.get(PROMPT, [""] * len(pixels))
        understand = per_example(generators, lambda g: torch.rand(1, generator=g)) < config.understanding_ratio
        understand |= torch.tensor([bool(prompt) for prompt in prompts])
        drop_text = per_example(generators, lambda g: torch.rand(1, generator=g)) < config.text_dropout
        picks = {flag: [i for i in range(len(pixels)) if bool(understand[i]) == flag] for flag in (True, False)}
        visual = {}
        if picks[False]:
            with torch.no_grad():
                codes = self.visual_tokenizer.tokenize(
                    pixels[picks[False]], generator=[generators[i] for i in picks[False]]
                )
            visual.update(zip(picks[False], codes))
        if picks[True]:
            features = self.visual_tokenizer.encode_features(
                pixels[picks[True]], generator=[generators[i] for i in picks[True]]
            )
            visual.update(zip(picks[True], features))
        examples = []
        for i, text in enumerate(batch["text"]):
            text_ids = self.processor.text_ids(text)
            if understand[i]:
                prompt_ids = self.processor.text_ids(prompts[i]) if prompts[i] else []
                embeds, labels = self.understanding_example(visual[i], prompt_ids, text_ids)
            else:
                embeds, labels = self.generation_example([] if drop_text[i] else text_ids, visual[i])
            examples.append((embeds[: config.max_length], labels[: config.max_length]))
        pad = self.embed([self.processor.pad_token_id])
        rows = pack(examples, config.max_length, config.packing)
        embeds, positions, labels = batch_rows(examples, rows, pad)
        logits = packed_logits(self.language_model, embeds, positions)[:, :-1].float()
        targets = labels[:, 1:]
        losses = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="none")
        counted = targets.flatten() != IGNORE
        is_visual = self.language_model.is_visual_token(targets.flatten()) | (
            targets.flatten() == self.language_model.config.image_end_token_id
        )
        prior = batch.get(PRIOR, torch.zeros(len(pixels), dtype=torch.bool))
        is_prior = (
            batch_rows([(e, prior[i].long().expand(len(e))) for i, (e, _) in enumerate(examples)], rows, pad)[2][
                :, 1:
            ].flatten()
            == 1
        )
        weights = torch.where(is_prior, config.prior_loss_weight, 1.0)
        metrics = {
            "loss": (weights * losses).sum() / counted.sum().clamp(min=1),
            "understanding_examples": understand.float().mean(),
        }
        parts = (("visual_loss", is_visual), ("text_loss", counted & ~is_visual), ("prior_loss", counted & is_prior))
        for name, mask in parts:
            metrics[name] = losses[mask].sum() / mask.sum().clamp(min=1)
        return metrics


def keep_rows_trainable(weight: nn.Parameter, rows: list[int]) -> None:
    """Train only `rows` of `weight`: the gradient of every other row is zeroed."""
    mask = torch.zeros(len(weight), 1, dtype=weight.dtype, device=weight.device)
    mask[rows] = 1
    weight.requires_grad_(True)
    weight.register_hook(lambda grad: grad * mask)


def add_subject_word(tokenizer, language_model, token: str, initializer: str):
    """Add `token` after the whole vocabulary, its input embedding the mean of those of `initializer`'s pieces
    (its output row mean-initialised). Returns (the extended tokenizer, the token's id)."""
    pieces = tokenizer(initializer, add_special_tokens=False).input_ids
    if not pieces:
        raise ValueError(f"`initializer_token` {initializer!r} gives no token.")
    tokenizer, (token_id,) = add_placeholder_tokens(tokenizer, language_model, [token])
    weight = language_model.get_input_embeddings().weight
    with torch.no_grad():
        weight[token_id] = weight[pieces].mean(dim=0)
    return tokenizer, token_id


class LanguageModelStage(Stage):
    needed_components = ("tokenizer", "language_model", "visual_tokenizer")

    def __init__(self, config, components, accelerator):
        super().__init__(config, components, accelerator)
        lm, visual_tokenizer = components["language_model"], components["visual_tokenizer"]
        visual_tokenizer.requires_grad_(False)
        if config.init_understanding_head:
            visual_tokenizer.understanding_predictor.load_state_dict(visual_tokenizer.token_predictor.state_dict())
            visual_tokenizer.understanding_merger.load_state_dict(visual_tokenizer.token_merger.state_dict())
        for name in UNDERSTANDING_HEAD:
            getattr(visual_tokenizer, name).requires_grad_(config.train_understanding_head)
        trained = ["visual_tokenizer"] if config.train_understanding_head or config.init_understanding_head else []
        input_rows, output_rows = [], []  # embedding rows trained under LoRA or textual inversion
        if config.placeholder_token is not None:
            tokenizer, self.placeholder_id = add_subject_word(
                components["tokenizer"], lm, config.placeholder_token, config.initializer_token
            )
            components["tokenizer"] = tokenizer
            input_rows.append(self.placeholder_id)
            trained += ["tokenizer", "language_model"]
        if config.train_visual_embeddings:
            input_rows += list(lm.lavit_token_id_range)
            output_rows += list(lm.lavit_token_id_range)
        if config.textual_inversion:
            lm.requires_grad_(False)
        elif config.lora:
            from peft import LoraConfig, inject_adapter_in_model

            lm.requires_grad_(False)
            lora = LoraConfig(
                r=config.lora_rank,
                lora_alpha=config.lora_alpha or config.lora_rank,
                init_lora_weights="gaussian",
                target_modules=config.lora_target_modules,
            )
            inject_adapter_in_model(lora, lm)
            if config.train_visual_embeddings:
                trained.append("language_model")
        else:
            lm.requires_grad_(True)
            trained.append("language_model")
            input_rows = output_rows = []  # every row trains
        for weight, rows in (
            (lm.get_input_embeddings().weight, input_rows),
            (lm.get_output_embeddings().weight, output_rows),
        ):
            if rows:
                keep_rows_trainable(weight, rows)
        trained = list(dict.fromkeys(trained))
        if config.gradient_checkpointing:
            lm.activation_checkpointing_enable({"use_reentrant": False})
            visual_tokenizer.enable_gradient_checkpointing()
        self.trained_components = tuple(trained)
        self.module = LanguageModelTrainingModule(lm, visual_tokenizer, components["tokenizer"], config)
        self.processor = self.module.processor.image_processor

    def transform(self, image, text: str) -> dict:
        return {"pixel_values": self.processor.preprocess(image)[0], "text": text}

    @torch.no_grad()
    def initialize(self, data) -> None:
        """With `init_understanding_head`, the LLM projection starts as a standardisation of the merged
        features of the data's first `INITIALIZATION_EXAMPLES` examples (mean removed, each channel divided by
        its spread, then a random projection at the scale of the LLM's input embeddings). Merged features share
        a large common part that would otherwise hide, in the LLM's RMS-normalised input, what differs between
        images."""
        if not self.config.init_understanding_head:
            return
        visual_tokenizer, lm = self.components["visual_tokenizer"], self.components["language_model"]
        projection = visual_tokenizer.llm_projection
        first = range(min(INITIALIZATION_EXAMPLES, len(data)))
        pixels = torch.stack([data[i]["pixel_values"] for i in first])
        pixels = pixels.to(projection.weight.device, visual_tokenizer.dtype)
        generator = torch.Generator().manual_seed(self.config.seed)
        head = (visual_tokenizer.understanding_predictor, visual_tokenizer.understanding_merger)
        merged = visual_tokenizer.merge_kept(pixels, *head, generator)[0].float()
        mean, spread = merged.mean(dim=0), merged.std(dim=0).clamp(min=1e-6)
        weight = projection.weight.float() / spread  # (out, in): each input channel divided by its spread
        scale = lm.get_input_embeddings().weight.float().std() / ((merged - mean) @ weight.T).std()
        projection.weight.copy_(weight * scale)
        projection.bias.copy_(-(weight * scale) @ mean)

    def validate(self, batch, generators, step, folder) -> dict:
        """The loss and a greedy caption of the first validation image."""
        from ..pipelines.understanding import LavitUnderstandingPipeline

        metrics = super().validate(batch, generators, step, folder)
        pipe = LavitUnderstandingPipeline(**{k: self.components[k] for k in self.needed_components})
        pipe.set_progress_bar_config(disable=True)
        caption = pipe(batch["pixel_values"][:1], max_new_tokens=16, generator=generators[0]).text[0]
        return {**metrics, "validation_caption": caption}

    def finish(self, output) -> dict:
        """With LoRA: the adapter goes to pytorch_lora_weights.safetensors, then leaves the model, whose
        (possibly trained) LaVIT embedding rows are saved with it. With a placeholder token: its input embedding
        goes to learned_embeds.safetensors (diffusers' textual-inversion file), and the tokenizer and the
        language model that know it to OUT's pipeline folder."""
        if self.config.placeholder_token is not None:
            from safetensors.torch import save_file

            from ..pipelines.textual_inversion import LEARNED_EMBEDS

            row = self.components["language_model"].get_input_embeddings().weight[self.placeholder_id]
            save_file(
                {self.config.placeholder_token: row.detach().float().cpu().clone()}, Path(output) / LEARNED_EMBEDS
            )
        if self.config.lora and not self.config.textual_inversion:
            from diffusers.utils.peft_utils import recurse_remove_peft_layers

            from ..pipelines.understanding import LavitUnderstandingPipeline

            lm = self.components["language_model"]
            layers, metadata = lora_layers(lm)
            LavitUnderstandingPipeline.save_lora_weights(
                output, language_model_lora_layers=layers, language_model_lora_adapter_metadata=metadata
            )
            recurse_remove_peft_layers(lm)
            del lm.peft_config
        return super().finish(output)
