"""New words for the LaVIT pipelines: diffusers' textual-inversion files, placed after LaVIT's vocabulary.

diffusers' `TextualInversionLoaderMixin.load_textual_inversion` resizes the text encoder to the tokenizer's
length plus the new tokens and lets the tokenizer number them after its own pieces. In LaVIT the language
model's vocabulary is `[text][IMG][/IMG][visual codes]`, longer than the tokenizer: that resize would cut off
`[IMG]`, `[/IMG]` and every visual id, and the new word would take `[IMG]`'s id. This loader reads the same
files (`learned_embeds.safetensors`, `{token: (D,) or (1, D) embedding}`, as diffusers' textual-inversion
script and `lavit train language-model --placeholder-token` write them) with diffusers' helpers, and adds each
word after the whole vocabulary (`tokenization.add_placeholder_tokens`); `unload_textual_inversion` removes them
again, as diffusers' does.
"""

import os

import torch
from diffusers.loaders import TextualInversionLoaderMixin
from diffusers.loaders.textual_inversion import load_textual_inversion_state_dicts

from ..tokenization import add_placeholder_tokens, remove_placeholder_tokens

LEARNED_EMBEDS = "learned_embeds.safetensors"


class LavitTextualInversionLoaderMixin(TextualInversionLoaderMixin):
    """`load_textual_inversion` and `unload_textual_inversion` for pipelines with a `tokenizer` and a LaVIT
    `language_model`."""

    def load_textual_inversion(
        self,
        pretrained_model_name_or_path: str | os.PathLike | list | dict | torch.Tensor,
        token: str | list[str] | None = None,
        **kwargs,
    ) -> list[int]:
        """Add the words of textual-inversion files (a folder holding `learned_embeds.safetensors`, a file via
        `weight_name=`, a Hub id, or a state dict) with their input embeddings; returns their new ids.

        The pipeline's `tokenizer` is replaced by one that knows the words; the language model grows by one
        embedding row per word (its output row is mean-initialised: text-to-image never samples it, and
        understanding may). ValueError when a word is already known or the embedding width differs.
        """
        sources = (
            pretrained_model_name_or_path
            if isinstance(pretrained_model_name_or_path, list)
            else [pretrained_model_name_or_path]
        )
        tokens = token if isinstance(token, list) else [token] * len(sources)
        language_model = self.language_model
        self._check_text_inv_inputs(self.tokenizer, language_model, sources, tokens)
        state_dicts = load_textual_inversion_state_dicts(sources, **kwargs)
        tokens, embeddings = self._retrieve_tokens_and_embeddings(tokens, state_dicts, self.tokenizer)
        width = language_model.get_input_embeddings().weight.shape[-1]
        embeddings = [embedding.reshape(-1, embedding.shape[-1]) for embedding in embeddings]
        if any(embedding.shape != (1, width) for embedding in embeddings):
            raise ValueError(
                f"Textual-inversion embeddings must be one vector of width {width} per token, got "
                f"{[tuple(embedding.shape) for embedding in embeddings]}."
            )
        tokenizer, ids = add_placeholder_tokens(self.tokenizer, language_model, tokens)
        weight = language_model.get_input_embeddings().weight
        with torch.no_grad():
            weight[ids] = torch.cat(embeddings).to(weight.device, weight.dtype)
        self.register_modules(tokenizer=tokenizer)
        return ids

    def unload_textual_inversion(self, tokens: str | list[str] | None = None) -> None:
        """Remove words that `load_textual_inversion` (or a subject fine-tune) added: `tokens`, by default every
        word after the language model's LaVIT ids. They leave the tokenizer (replaced by one without them) and
        their rows leave the language model's embeddings; the words loaded after them keep their embeddings and
        move down to close the gap, as in diffusers' `unload_textual_inversion`. Unloading every word gives back
        the tokenizer's vocabulary and the embeddings as they were before loading. ValueError naming a token that
        is not such a word."""
        tokens = [tokens] if isinstance(tokens, str) else tokens
        tokenizer, _ = remove_placeholder_tokens(self.tokenizer, self.language_model, tokens)
        self.register_modules(tokenizer=tokenizer)
