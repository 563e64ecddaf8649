"""LaVIT's text tokenizer with the exact behaviour of the original slow LLaMA tokenizer.

The original code uses transformers 4.33's sentencepiece ``LlamaTokenizer(use_fast=False)`` with
``legacy=True``: every text span between special tokens is ``SentencePieceProcessor.encode(span)``,
and decoding is ``SentencePieceProcessor.decode(pieces)``. transformers 5's ``LlamaTokenizer`` is
built on ``tokenizers`` with a ``Metaspace`` pre-tokenizer; it differs from sentencepiece in two
ways that this module fixes:

* a text that starts with a space: sentencepiece adds its dummy prefix ``▁`` anyway
  (``" a"`` → ``"▁▁a"``), ``Metaspace`` does not (``"▁a"``);
* the model's normalizer spec: when ``remove_extra_whitespaces`` is set (it is in the tiny test
  checkpoint, not in LLaMA's), sentencepiece drops leading spaces, trailing ``▁`` and collapses runs of
  spaces, both when encoding and (leading ``▁``) when decoding.

``load_lavit_tokenizer`` rebuilds the ``tokenizers`` pipeline from the sentencepiece model's
normalizer spec (normalizer instead of pre-tokenizer, matching decoder) and returns a plain
``PreTrainedTokenizerFast`` with ``padding_side="left"`` and ``pad_token = eos`` (id 2), as LaVIT
uses it. ``save_pretrained`` writes a ``tokenizer.json`` that ``PreTrainedTokenizerFast`` (and
``AutoTokenizer``) load back unchanged. Do not reload it with ``LlamaTokenizer.from_pretrained``:
that class rebuilds its own normalizer and pre-tokenizer and loses the fix.

Known remaining difference: a run of byte-fallback tokens that is not valid UTF-8 decodes to one
U+FFFD per byte token (``tokenizers``), where sentencepiece replaces per invalid sequence
(``[<0xF0>, <0x61>]`` → ``"��"`` instead of ``"�a"``).
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, processors
from transformers import LlamaTokenizer, PreTrainedTokenizerFast
from transformers.utils import cached_file

__all__ = [
    "load_lavit_tokenizer",
    "build_sentencepiece_exact_tokenizer",
    "build_llama_style_tokenizer",
    "add_placeholder_tokens",
    "remove_placeholder_tokens",
    "unseen_words",
    "unseen_words_warning",
]

_SPIECE_UNDERLINE = "▁"
SPECIALS = ("<unk>", "<s>", "</s>")
# tokenizer_config.json classes whose tokenizer.json is loaded as saved (no rebuilt pipeline)
_BACKEND_CLASSES = {"PreTrainedTokenizerFast", "TokenizersBackend"}
# tokenizer_config.json key: the words of the model's training text (declared by models with a small vocabulary)
KNOWN_WORDS = "known_words"
# hub / cache arguments understood by `cached_file`
_FILE_KWARGS = ("cache_dir", "force_download", "proxies", "token", "revision", "local_files_only", "subfolder")


def _sentencepiece_proto(model_file: str):
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    with open(model_file, "rb") as handle:
        proto.ParseFromString(handle.read())
    return proto


def _normalizer_and_decoder(proto):
    """`tokenizers` normalizer and decoder that reproduce a sentencepiece model's normalization."""
    normalizer_spec = proto.normalizer_spec
    if proto.trainer_spec.treat_whitespace_as_suffix:
        raise NotImplementedError("sentencepiece models with treat_whitespace_as_suffix are not supported")
    steps = []
    if normalizer_spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(normalizer_spec.precompiled_charsmap))
    if normalizer_spec.remove_extra_whitespaces:
        # sentencepiece: skip leading spaces, collapse runs of spaces ('\A'/'\z' because '^'/'$' are line anchors)
        steps += [normalizers.Replace(Regex(r"\A +"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if normalizer_spec.add_dummy_prefix:
        steps.append(normalizers.Prepend(_SPIECE_UNDERLINE))  # no-op on an empty string, like sentencepiece
    if normalizer_spec.escape_whitespaces:
        steps.append(normalizers.Replace(" ", _SPIECE_UNDERLINE))
    if normalizer_spec.remove_extra_whitespaces:
        # sentencepiece drops trailing whitespace symbols after escaping (a literal trailing '▁' too)
        steps.append(normalizers.Replace(Regex(_SPIECE_UNDERLINE + r"+\z"), ""))

    decode_steps = [decoders.ByteFallback(), decoders.Fuse()]
    if normalizer_spec.add_dummy_prefix:
        # sentencepiece removes the dummy prefix of the first piece; with remove_extra_whitespaces it keeps
        # removing leading '▁' until some text was produced. Byte-fallback spaces (<0x20>) are kept.
        pattern = _SPIECE_UNDERLINE + ("+" if normalizer_spec.remove_extra_whitespaces else "")
        decode_steps.append(decoders.Replace(Regex(r"\A" + pattern), ""))
    if normalizer_spec.escape_whitespaces:
        decode_steps.append(decoders.Replace(_SPIECE_UNDERLINE, " "))
    return normalizers.Sequence(steps), decoders.Sequence(decode_steps)


def _special(token) -> AddedToken | None:
    if token is None:
        return None
    return AddedToken(str(token), lstrip=False, rstrip=False, normalized=False, special=True)


def build_sentencepiece_exact_tokenizer(
    folder: str, model_file: str | None = None, **kwargs
) -> PreTrainedTokenizerFast:
    """Build the exact LaVIT tokenizer from a folder with ``tokenizer.model`` (+ ``tokenizer_config.json``)."""
    model_file = model_file or os.path.join(folder, "tokenizer.model")
    llama = LlamaTokenizer.from_pretrained(folder, legacy=True, **kwargs)
    # Special tokens are matched on the raw text, as the slow tokenizer's trie did. (A `normalized=True`
    # token would also stop being skipped by `decode(skip_special_tokens=True)` once the normalizer changes.)
    serialized = json.loads(llama.backend_tokenizer.to_str())
    for added in serialized.get("added_tokens", []):
        added["normalized"] = False
    backend = Tokenizer.from_str(json.dumps(serialized))
    normalizer, decoder = _normalizer_and_decoder(_sentencepiece_proto(model_file))
    backend.normalizer = normalizer
    backend.pre_tokenizer = None  # sentencepiece BPE merges over the whole normalized text
    backend.decoder = decoder
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=_special(llama.bos_token),
        eos_token=_special(llama.eos_token),
        unk_token=_special(llama.unk_token),
        pad_token=_special(llama.pad_token if llama.pad_token is not None else llama.eos_token),
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=llama.model_max_length,
        legacy=True,
    )


def _optional_file(path_or_folder: str, filename: str, file_kwargs: dict) -> str | None:
    return cached_file(
        path_or_folder,
        filename,
        _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False,
        **file_kwargs,
    )


def load_lavit_tokenizer(path_or_folder: str | os.PathLike, **kwargs) -> PreTrainedTokenizerFast:
    """Load LaVIT's text tokenizer with the original (sentencepiece, legacy) ids.

    ``path_or_folder`` is a local folder or a Hub repository id (pass ``subfolder=`` for e.g. the
    release's ``language_model``). Two layouts are understood:

    * a folder saved by this function's tokenizer (``tokenizer.json`` with ``tokenizer_class``
      ``TokenizersBackend``/``PreTrainedTokenizerFast``): loaded as saved;
    * the release layout (``tokenizer.model`` + ``tokenizer_config.json``): rebuilt so that encoding
      equals ``SentencePieceProcessor.encode`` and decoding ``SentencePieceProcessor.decode``.

    The result pads on the left with ``</s>`` (id 2) unless ``padding_side`` / ``pad_token`` are given.
    Prompts are tokenized with ``add_special_tokens=False`` in LaVIT (no BOS).
    """
    path_or_folder = os.fspath(path_or_folder)
    padding_side = kwargs.pop("padding_side", "left")
    pad_token = kwargs.pop("pad_token", None)
    file_kwargs = {key: kwargs[key] for key in _FILE_KWARGS if key in kwargs}

    tokenizer = None
    config_file = _optional_file(path_or_folder, "tokenizer_config.json", file_kwargs)
    tokenizer_class = None
    if config_file is not None:
        with open(config_file, encoding="utf-8") as handle:
            tokenizer_class = json.load(handle).get("tokenizer_class")
    if tokenizer_class in _BACKEND_CLASSES and _optional_file(path_or_folder, "tokenizer.json", file_kwargs):
        tokenizer = PreTrainedTokenizerFast.from_pretrained(path_or_folder, **kwargs)
    else:
        model_file = _optional_file(path_or_folder, "tokenizer.model", file_kwargs)
        if model_file is None:
            raise OSError(
                f"{path_or_folder} has neither a saved LaVIT tokenizer.json nor a sentencepiece tokenizer.model"
            )
        tokenizer = build_sentencepiece_exact_tokenizer(path_or_folder, model_file=model_file, **kwargs)

    tokenizer.padding_side = padding_side
    if pad_token is not None:
        tokenizer.pad_token = pad_token
    elif tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _train_merges(corpus: str, num_merges: int) -> list[tuple[str, str]]:
    """Deterministic BPE merges over the corpus' words (each with its sentencepiece '▁' prefix)."""
    words = Counter(tuple("▁" + word) for word in corpus.split())
    merges = []
    for _ in range(num_merges):
        pairs = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))  # most frequent, ties by text
        merges.append(best)
        merged = Counter()
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                if word[i : i + 2] == best:
                    out.append(best[0] + best[1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += count
        words = merged
    return merges


def words(text: str) -> list[str]:
    """The lower-case words of `text` (letters, digits, apostrophes), in order; `<image>`-style tags left out."""
    return re.findall(r"[a-z0-9']+", re.sub(r"<[^<>\s]*>", " ", text.lower()))


def unseen_words(tokenizer, prompt: str) -> list[str]:
    """The words of `prompt` (once each, in order) outside the `known_words` that the tokenizer's config declares
    (the words its model was trained on) and its added tokens (e.g. a subject's placeholder word); [] when it
    declares none, as LaVIT-7B's does not."""
    known = tokenizer.init_kwargs.get(KNOWN_WORDS)
    if not known:
        return []
    known = set(words(" ".join([*known, *tokenizer.get_added_vocab()])))
    return [word for word in dict.fromkeys(words(prompt)) if word not in known]


def unseen_words_warning(tokenizer, prompt: str) -> str | None:
    """A one-line warning naming the prompt's `unseen_words`, or None when there are none."""
    unseen = unseen_words(tokenizer, prompt)
    if not unseen:
        return None
    return (
        f"the model was never trained on the words {', '.join(map(repr, unseen))}: expect a picture of something else"
    )


def build_llama_style_tokenizer(
    corpus: str, num_merges: int, known_words: list[str] | None = None
) -> PreTrainedTokenizerFast:
    """LLaMA-style byte-fallback BPE trained on `corpus`: `<unk>`=0, `<s>`=1, `</s>`=2, 256 byte tokens, the
    corpus characters, then up to `num_merges` merges. Pads on the left with `</s>`; `add_special_tokens=True`
    prepends `<s>` like LLaMA. `known_words` (saved in tokenizer_config.json) declares the model's vocabulary
    for `unseen_words`."""
    merges = _train_merges(corpus, num_merges)
    pieces = list(SPECIALS) + [f"<0x{b:02X}>" for b in range(256)] + sorted(set("▁" + corpus.replace(" ", "▁")))
    pieces += [a + b for a, b in merges if a + b not in pieces]
    vocab = {piece: i for i, piece in enumerate(dict.fromkeys(pieces))}
    backend = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in SPECIALS])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="</s>",
        padding_side="left",
        clean_up_tokenization_spaces=False,
        **({KNOWN_WORDS: known_words} if known_words else {}),
    )


def _edited(tokenizer: PreTrainedTokenizerFast, edit) -> PreTrainedTokenizerFast:
    """A copy of `tokenizer` whose saved `tokenizer.json` content went through `edit(content)` (in place)."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        path = os.path.join(folder, "tokenizer.json")
        with open(path, encoding="utf-8") as file:
            content = json.load(file)
        if not isinstance(content["model"].get("vocab"), dict):
            raise ValueError(
                f"placeholder tokens need a tokenizer model with a vocabulary dict, not {content['model']['type']}."
            )
        edit(content)
        with open(path, "w", encoding="utf-8") as file:
            json.dump(content, file, ensure_ascii=False)
        return type(tokenizer).from_pretrained(folder)


def add_placeholder_tokens(tokenizer: PreTrainedTokenizerFast, language_model, tokens: list[str]):
    """Add new words after the whole vocabulary of `language_model` ([text][IMG][/IMG][visual codes][new]).

    The tokenizer would number an added token right after its own pieces, which in LaVIT are followed by
    `[IMG]`, `[/IMG]` and the visual ids; so each word first enters the tokenizer model's vocabulary with the
    id after the language model's last one, then becomes an added token (matched as a whole, as diffusers'
    textual inversion adds its tokens). The language model's embeddings grow by `len(tokens)` rows (transformers'
    mean-initialised resize). Returns (a new tokenizer, the new ids); `tokenizer` is left unchanged.
    ValueError when a token is already a word of the tokenizer or its model has no vocabulary dict.
    """
    known = tokenizer.get_vocab()
    for token in tokens:
        if not token or token != token.strip() or token in known:
            raise ValueError(f"placeholder token {token!r} must be a new word without spaces around it.")
    first = language_model.config.vocab_size
    ids = list(range(first, first + len(tokens)))
    extended = _edited(tokenizer, lambda content: content["model"]["vocab"].update(zip(tokens, ids)))
    extended.add_tokens(tokens)
    if [extended.convert_tokens_to_ids(token) for token in tokens] != ids:
        raise ValueError(f"the tokenizer did not number {tokens} as {ids}.")
    language_model.resize_token_embeddings(first + len(tokens))
    return extended, ids


def remove_placeholder_tokens(tokenizer: PreTrainedTokenizerFast, language_model, tokens: list[str] | None = None):
    """Undo `add_placeholder_tokens` for `tokens` (default: every word after the LaVIT ids): they leave a copy of
    the tokenizer and their rows leave the language model's input and output embeddings; the words after them
    move down, so the added ids stay contiguous (as diffusers' `unload_textual_inversion` renumbers the remaining
    words). Returns (the new tokenizer, the removed ids). ValueError naming a token that is not an added word."""
    import torch

    words = {token_id: token for token, token_id in tokenizer.get_added_vocab().items()}
    added = {token_id: words[token_id] for token_id in language_model.added_token_id_range}
    removed_words = list(added.values()) if tokens is None else tokens
    unknown = [token for token in removed_words if token not in added.values()]
    if unknown:
        raise ValueError(
            f"{unknown} are not words added after the language model's vocabulary (added: {list(added.values())})."
        )
    removed = [token_id for token_id, token in added.items() if token in removed_words]
    kept = {token: token_id for token_id, token in added.items() if token_id not in removed}
    renumbered = dict(zip(kept, language_model.added_token_id_range))

    def edit(content: dict) -> None:
        vocab = content["model"]["vocab"]
        for token in added.values():
            vocab.pop(token)
        vocab.update(renumbered)
        content["added_tokens"] = [entry for entry in content["added_tokens"] if entry["content"] not in removed_words]
        for entry in content["added_tokens"]:
            entry["id"] = renumbered.get(entry["content"], entry["id"])

    order = [i for i in range(language_model.config.vocab_size) if i not in removed] + removed
    with torch.no_grad():
        for layer in (language_model.get_input_embeddings(), language_model.get_output_embeddings()):
            layer.weight.copy_(layer.weight[order])
    language_model.resize_token_embeddings(len(order) - len(removed))
    return _edited(tokenizer, edit), removed
