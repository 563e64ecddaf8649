"""LavitConfig / LavitForCausalLM and the LaVIT text tokenizer."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from lavit_pipelines import LavitConfig, LavitForCausalLM, load_lavit_tokenizer
from lavit_pipelines.models import language_model as language_model_module

TINY_IDS = dict(
    vocab_size=128, image_start_token_id=100, image_end_token_id=101, visual_token_offset=102, visual_vocab_size=26
)


def tiny_config(**overrides) -> LavitConfig:
    kwargs = dict(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        **TINY_IDS,
    )
    kwargs.update(overrides)
    return LavitConfig(**kwargs)


def tiny_model(**overrides) -> LavitForCausalLM:
    torch.manual_seed(0)
    return LavitForCausalLM(tiny_config(**overrides)).eval()


# --------------------------------------------------------------------------- config


def test_config_defaults_describe_the_release():
    config = LavitConfig()
    assert config.model_type == "llama"
    assert config.vocab_size == 48386
    assert (config.image_start_token_id, config.image_end_token_id) == (32000, 32001)
    assert config.visual_token_offset == 32002 and config.visual_vocab_size == 16384
    assert config.visual_token_id_range == range(32002, 48386)
    assert config.text_vocab_size == 32000


def test_config_round_trip_keeps_lavit_ids(tmp_path):
    config = tiny_config()
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "llama"
    for key, value in TINY_IDS.items():
        assert saved[key] == value
    for loader in (LavitConfig.from_pretrained, AutoConfig.from_pretrained):
        loaded = loader(tmp_path)
        assert isinstance(loaded, LlamaConfig)  # stock transformers reads a LLaMA config that carries the ids
        for key, value in TINY_IDS.items():
            assert getattr(loaded, key) == value
        assert loaded.hidden_size == 16 and loaded.num_hidden_layers == 2


def test_config_rejects_visual_ids_outside_vocabulary():
    with pytest.raises(Exception, match="visual ids"):
        LavitConfig(vocab_size=128)  # default ids 32000+ do not fit
    with pytest.raises(Exception, match="visual id range"):
        tiny_config(image_end_token_id=103)


def test_module_binds_pretrained_model_for_diffusers():
    from transformers import PreTrainedModel

    assert language_model_module.PreTrainedModel is PreTrainedModel
    assert issubclass(LavitForCausalLM, PreTrainedModel)


def test_nothing_registered_with_the_auto_classes():
    """A LLaMA config needs no registration: importing this package leaves transformers' mappings alone."""
    config = AutoConfig.for_model("llama", **{k: v for k, v in tiny_config().to_dict().items() if k != "model_type"})
    assert type(config) is LlamaConfig and config.visual_token_offset == 102
    assert type(AutoModelForCausalLM.from_config(config)) is LlamaForCausalLM


# --------------------------------------------------------------------------- model


def test_state_dict_keys_equal_llama():
    model = tiny_model()
    llama_config = LlamaConfig(
        **{k: v for k, v in tiny_config().to_dict().items() if k in LlamaConfig.__dataclass_fields__}
    )
    llama = LlamaForCausalLM(llama_config)
    assert model.state_dict().keys() == llama.state_dict().keys()
    for key, value in llama.state_dict().items():
        assert model.state_dict()[key].shape == value.shape


def test_lavit_model_matches_llama_with_same_weights():
    model = tiny_model()
    llama_config = LlamaConfig(
        **{k: v for k, v in model.config.to_dict().items() if k in LlamaConfig.__dataclass_fields__}
    )
    llama = LlamaForCausalLM(llama_config).eval()
    llama.load_state_dict(model.state_dict())
    ids = torch.tensor([[5, 17, 100, 110, 127, 101]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, llama(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_load_round_trip(tmp_path, dtype):
    model = tiny_model().to(dtype)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "llama"
    assert saved["architectures"] == ["LlamaForCausalLM"]

    ids = torch.tensor([[3, 9, 100, 102, 127, 101, 2]])
    with torch.no_grad():
        expected = model(ids).logits

    for loader in (LavitForCausalLM, AutoModelForCausalLM):
        loaded = loader.from_pretrained(tmp_path, dtype=dtype).eval()
        assert type(loaded) is (LavitForCausalLM if loader is LavitForCausalLM else LlamaForCausalLM)
        assert loaded.dtype == dtype
        assert (loaded.config.visual_token_offset, loaded.config.visual_vocab_size) == (102, 26)
        for key, value in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), key
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids).logits, expected, rtol=0, atol=0)


def test_folder_converted_with_the_old_model_type_still_loads(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "lavit"}))
    loaded = LavitForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.model_type == "llama" and loaded.config.visual_token_id_range == range(102, 128)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


STOCK_LOAD = """
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
assert not any(name.startswith("lavit_pipelines") for name in sys.modules), "lavit_pipelines was imported"
with torch.no_grad():
    logits = model(torch.tensor([[5, 17, 100, 110, 127, 101]])).logits
torch.save({"logits": logits, "class": type(model).__name__, "offset": model.config.visual_token_offset}, sys.argv[2])
"""


def test_stock_transformers_loads_the_converted_language_model(converted_dir, tmp_path):
    """A process that never imports this package loads `language_model/` with AutoModelForCausalLM."""
    folder = converted_dir / "language_model"
    subprocess.run(
        [sys.executable, "-c", STOCK_LOAD, str(folder), str(tmp_path / "out.pt")],
        check=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": ""},
    )
    stock = torch.load(tmp_path / "out.pt")
    ours = LavitForCausalLM.from_pretrained(folder).eval()
    assert stock["class"] == "LlamaForCausalLM" and stock["offset"] == ours.config.visual_token_offset
    with torch.no_grad():
        torch.testing.assert_close(
            stock["logits"], ours(torch.tensor([[5, 17, 100, 110, 127, 101]])).logits, rtol=0, atol=0
        )


def test_id_helpers():
    model = tiny_model()
    assert model.config.visual_token_id_range == range(102, 128)
    assert model.lavit_token_id_range == range(100, 128)
    ids = torch.tensor([5, 100, 102, 127, 101, 99, 115])
    assert model.is_visual_token(ids).tolist() == [False, False, True, True, False, False, True]
    assert model.token_ids_to_codes(ids).tolist() == [0, 25, 13]
    codes = torch.tensor([0, 7, 25])
    assert model.codes_to_token_ids(codes).tolist() == [102, 109, 127]
    assert torch.equal(model.token_ids_to_codes(model.codes_to_token_ids(codes)), codes)


def test_release_language_model_reproduces_reference_logits(checkpoint_dir, reference):
    reference_json, tensors = reference
    model = LavitForCausalLM.from_pretrained(checkpoint_dir / "language_model", dtype=torch.float32).eval()
    assert isinstance(model.config, LavitConfig)
    assert model.config.vocab_size == 48386
    assert model.config.visual_token_id_range == range(32002, 48386)

    llama_keys = torch.load(
        checkpoint_dir / "language_model" / "pytorch_model.bin", map_location="cpu", weights_only=True, mmap=True
    ).keys()
    assert set(model.state_dict().keys()) == set(llama_keys)

    ids = torch.tensor([reference_json["t2i_prompt_ids"] + [model.config.image_start_token_id]])
    with torch.no_grad():
        logits = model(ids).logits[0]
    expected = tensors["t2i_prompt_logits"]
    assert logits.shape == expected.shape == (13, 48386)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-3)


# --------------------------------------------------------------------------- tokenizer

PARITY_STRINGS = [
    "a sculpture of a duck made of wool",
    "It is running in the snow",
    "Question: what is it? Answer:",
    "Question:   what is it?  Answer: ",
    " leading space",
    "  two leading spaces",
    "multiple   spaces  here",
    "trailing space ",
    "trailing  \n",
    "line1\nline2\n\nline3",
    "x  \n  y",
    "tab\tseparated",
    "digits 12345 and 3.14",
    "Ünïcödé café naïve",
    "emoji 🦆🧶 done",
    "中文字符测试",
    "\u00a0nbsp\u3000ideographic",
    "e\u0301 combining",
    "",
    " ",
    "\n",
]


def slow_legacy_encode(sp, text: str) -> list[int]:
    """What transformers 4.33's slow LlamaTokenizer(legacy=True) did: split on special tokens, sp.encode the rest."""
    special = {"<unk>": 0, "<s>": 1, "</s>": 2}
    ids = []
    for chunk in re.split("(<unk>|<s>|</s>)", text):
        if chunk:
            ids += [special[chunk]] if chunk in special else sp.encode(chunk)
    return ids


@pytest.fixture(scope="module")
def sentencepiece_model(checkpoint_dir):
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=str(checkpoint_dir / "language_model" / "tokenizer.model"))


@pytest.fixture(scope="module")
def lavit_tokenizer(checkpoint_dir):
    return load_lavit_tokenizer(checkpoint_dir / "language_model")


@pytest.fixture(scope="module")
def saved_tokenizer_dir(lavit_tokenizer, tmp_path_factory):
    folder = tmp_path_factory.mktemp("converted") / "tokenizer"
    lavit_tokenizer.save_pretrained(folder)
    return folder


def _assert_parity(tokenizer, sp):
    for text in PARITY_STRINGS:
        assert tokenizer(text, add_special_tokens=False).input_ids == sp.encode(text), repr(text)
    for text in ("hello</s>world", "<s>x", "a <unk> b"):
        assert tokenizer(text, add_special_tokens=False).input_ids == slow_legacy_encode(sp, text), repr(text)
    rng = random.Random(0)
    alphabet = "ab cdé 1\n\t🦆▁  xyz.,?!"
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 30)))
        assert tokenizer(text, add_special_tokens=False).input_ids == sp.encode(text), repr(text)


def test_tokenizer_reference_prompt_ids(lavit_tokenizer, reference):
    reference_json, _ = reference
    ids = lavit_tokenizer(reference_json["t2i_prompt"], add_special_tokens=False).input_ids
    assert ids == reference_json["t2i_prompt_ids"] == [268, 696, 353, 452, 632, 351, 268, 26121, 2929, 351, 290, 25491]
    # the multimodal reference prompt ends with the ids of its text segment
    text_ids = lavit_tokenizer("It is running in the snow", add_special_tokens=False).input_ids
    assert reference_json["mm_prompt_token_ids"][-len(text_ids) :] == text_ids


def test_tokenizer_matches_sentencepiece(lavit_tokenizer, sentencepiece_model):
    _assert_parity(lavit_tokenizer, sentencepiece_model)


def test_tokenizer_padding_and_special_tokens(lavit_tokenizer):
    assert lavit_tokenizer.padding_side == "left"
    assert lavit_tokenizer.pad_token_id == 2
    assert (lavit_tokenizer.bos_token_id, lavit_tokenizer.eos_token_id, lavit_tokenizer.unk_token_id) == (1, 2, 0)
    assert lavit_tokenizer("a duck").input_ids[0] == 1  # add_special_tokens=True prepends BOS
    batch = lavit_tokenizer(["a duck", "a sculpture of a duck"], add_special_tokens=False, padding=True)
    short = lavit_tokenizer("a duck", add_special_tokens=False).input_ids
    pad = len(batch.input_ids[1]) - len(short)
    assert batch.input_ids[0] == [2] * pad + short
    assert batch.attention_mask[0] == [0] * pad + [1] * len(short)


def test_tokenizer_decoding_matches_sentencepiece(lavit_tokenizer, sentencepiece_model, reference):
    reference_json, _ = reference
    captions = reference_json["caption_greedy_token_ids"]
    decoded = lavit_tokenizer.batch_decode(captions, skip_special_tokens=True)
    assert decoded == [sentencepiece_model.decode([i for i in ids if i > 2]) for ids in captions]

    # leading '▁' pieces, byte fallback (valid UTF-8), special ids in the middle
    duck = [sentencepiece_model.piece_to_id(f"<0x{b:02X}>") for b in "🦆".encode()]
    space, word = sentencepiece_model.piece_to_id("▁"), sentencepiece_model.piece_to_id("▁a")
    cases = [
        [space, word],
        [space, space, word],
        [1, space, 13, word, 2],
        duck + [word],
        [word, 0, 2] + duck,
        [35, word],
    ]
    rng = random.Random(0)
    cases += [[rng.randrange(259, 32000) for _ in range(rng.randrange(1, 20))] for _ in range(200)]
    for ids in cases:
        assert lavit_tokenizer.decode(ids, skip_special_tokens=True) == sentencepiece_model.decode(
            [i for i in ids if i > 2]
        ), ids


def test_saved_tokenizer_round_trip(saved_tokenizer_dir, sentencepiece_model, reference):
    reference_json, _ = reference
    for loader in (PreTrainedTokenizerFast.from_pretrained, AutoTokenizer.from_pretrained, load_lavit_tokenizer):
        tokenizer = loader(saved_tokenizer_dir)
        assert tokenizer.padding_side == "left"
        assert tokenizer.pad_token_id == 2
        assert (
            tokenizer(reference_json["t2i_prompt"], add_special_tokens=False).input_ids
            == reference_json["t2i_prompt_ids"]
        )
        _assert_parity(tokenizer, sentencepiece_model)
