"""LavitPixelDecoder: parity with the original tokenizer decoders (high-res and low-res), and tiny models built in code."""

import pytest
import torch

from lavit_pipelines import LavitPixelDecoder, LavitVisualTokenizer
from lavit_pipelines.models.pixel_decoder import check_visual_token_ids
from lavit_pipelines.tiny import build_tiny_components

OFFSET = 32002  # the fixture's first visual id, only to read its references


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).abs().max() / expected.abs().max()).item()


def codes_of(token_ids: list[int]) -> torch.Tensor:
    """Reference LLM ids -> visual codes (the non-visual [IMG]/[/IMG] dropped)."""
    ids = torch.tensor(token_ids)
    return ids[ids >= OFFSET] - OFFSET


@pytest.fixture(scope="module")
def highres(converted_dir):
    return LavitPixelDecoder.from_pretrained(converted_dir / "pixel_decoder").eval()


@pytest.fixture(scope="module")
def lowres(converted_lowres_dir):
    return LavitPixelDecoder.from_pretrained(converted_lowres_dir / "pixel_decoder").eval()


@pytest.fixture(scope="module")
def tiny():
    return {variant: build_tiny_components(variant, seed=0)["pixel_decoder"] for variant in ("highres", "lowres")}


def random_codes(lengths, codebook_size=512, seed=0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(codebook_size, (n,), generator=generator) for n in lengths]


# --------------------------------------------------------------------------- parity with the original


@torch.no_grad()
def test_highres_matches_reference_on_tokenized_images(highres, reference):
    ref, tensors = reference
    out = highres([codes_of(ids) for ids in ref["image_token_ids"]])
    assert out.prompt_embeds.shape == (2, 256, 80) and out.pooled_prompt_embeds.shape == (2, 48)
    assert relative_error(out.prompt_embeds, tensors["highres_prompt_embeds"]) < 1e-4
    assert relative_error(out.pooled_prompt_embeds, tensors["highres_pooled_prompt_embeds"]) < 1e-4


@torch.no_grad()
def test_highres_matches_reference_on_generated_tokens(highres, reference):
    ref, tensors = reference
    out = highres([codes_of(ref["t2i_greedy_token_ids"][0])])
    assert relative_error(out.prompt_embeds, tensors["t2i_prompt_embeds"]) < 1e-4
    assert relative_error(out.pooled_prompt_embeds, tensors["t2i_pooled_prompt_embeds"]) < 1e-4


@torch.no_grad()
def test_lowres_matches_reference(lowres, reference, checkpoint_dir):
    ref, tensors = reference
    out = lowres([codes_of(ref["t2i_greedy_token_ids"][0])])
    assert out.pooled_prompt_embeds is None
    assert relative_error(out.prompt_embeds, tensors["lowres_prompt_embeds"]) < 1e-4
    # Negative condition: the release's uncond_embeddings at the start of zeros, masked to its length.
    uncond = torch.load(checkpoint_dir / "pixel_decoding" / "uncond_embeddings.bin", weights_only=True)[0]
    n = len(uncond)
    assert out.negative_prompt_embeds[0, :n].equal(uncond)
    assert not out.negative_prompt_embeds[0, n:].any()
    assert out.negative_prompt_attention_mask[0].tolist() == [True] * n + [False] * (256 - n)
    assert out.prompt_attention_mask.all()


def test_decoders_own_the_tokenizer_codebook(highres, lowres, converted_dir):
    codebook = LavitVisualTokenizer.from_pretrained(converted_dir / "visual_tokenizer").codebook.weight
    assert highres.codebook.weight.equal(codebook) and lowres.codebook.weight.equal(codebook)


# --------------------------------------------------------------------------- tiny models built in code


@torch.no_grad()
def test_highres_outputs(tiny):
    decoder = tiny["highres"]
    out = decoder(random_codes([5, 30, 1]))
    assert out.prompt_embeds.shape == (3, 256, 80) and out.pooled_prompt_embeds.shape == (3, 48)
    assert not out.negative_prompt_embeds.any() and out.negative_prompt_embeds.shape == out.prompt_embeds.shape
    assert not out.negative_pooled_prompt_embeds.any() and out.negative_pooled_prompt_embeds.shape == (3, 48)
    assert out.prompt_attention_mask is None and out.negative_prompt_attention_mask is None


@torch.no_grad()
def test_lowres_outputs(tiny):
    decoder = tiny["lowres"]
    out = decoder(random_codes([5, 30]))
    assert out.prompt_embeds.shape == (2, 256, 32) and out.pooled_prompt_embeds is None
    negative = decoder.negative_condition
    assert negative.shape == (7, 32)
    assert out.negative_prompt_embeds[:, :7].equal(negative.expand(2, -1, -1))
    assert not out.negative_prompt_embeds[:, 7:].any()
    assert out.negative_prompt_attention_mask.sum(dim=1).tolist() == [7, 7]
    assert out.negative_prompt_attention_mask[:, :7].all() and out.prompt_attention_mask.all()


@pytest.mark.parametrize("variant", ["highres", "lowres"])
@torch.no_grad()
def test_padding_does_not_leak(tiny, variant):
    """A sequence decodes the same alone and in a zero-padded batch with a longer one; the codes matter."""
    decoder = tiny[variant]
    short, long = random_codes([7, 40], seed=1)
    batched = decoder([short, long])
    alone = decoder([short])
    assert relative_error(batched.prompt_embeds[:1], alone.prompt_embeds) < 1e-5
    if variant == "highres":
        assert relative_error(batched.pooled_prompt_embeds[:1], alone.pooled_prompt_embeds) < 1e-5
    changed = decoder([torch.cat([short[:-1], (short[-1:] + 1) % 512])])
    assert relative_error(changed.prompt_embeds, alone.prompt_embeds) > 1e-4
    # A (B, L) tensor is read as B sequences of L codes.
    as_tensor = decoder(torch.stack([short, short]))
    torch.testing.assert_close(as_tensor.prompt_embeds, alone.prompt_embeds.expand(2, -1, -1))


@pytest.mark.parametrize("variant", ["highres", "lowres"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_save_load_round_trip(tiny, tmp_path, variant, dtype):
    decoder = tiny[variant]
    decoder.save_pretrained(tmp_path)
    loaded = LavitPixelDecoder.from_pretrained(tmp_path, dtype=dtype)
    assert loaded.dtype == dtype and loaded.config.variant == variant
    state = decoder.state_dict()
    for key, value in loaded.state_dict().items():
        assert value.equal(state[key].to(value.dtype)), key
    codes = random_codes([12, 3])
    out, expected = loaded(codes), decoder(codes)
    assert out.prompt_embeds.dtype == dtype
    tolerance = 1e-6 if dtype == torch.float32 else 0.05
    assert relative_error(out.prompt_embeds, expected.prompt_embeds) < tolerance
    if variant == "highres":
        assert relative_error(out.pooled_prompt_embeds, expected.pooled_prompt_embeds) < tolerance
    else:
        assert relative_error(out.negative_prompt_embeds, expected.negative_prompt_embeds) < tolerance


@pytest.mark.parametrize(
    "ids, error, match",
    [
        ([], TypeError, "non-empty list"),
        ("codes", TypeError, "non-empty list"),
        ([torch.tensor([], dtype=torch.long)], ValueError, "1 to 256 codes"),
        ([torch.zeros(257, dtype=torch.long)], ValueError, "1 to 256 codes"),
        ([torch.tensor([0, 512])], ValueError, r"\[0, 512\).*\[0, 512\]"),
        ([torch.tensor([3]), torch.tensor([-1, 2])], ValueError, r"visual_token_ids\[1\]"),
        ([torch.tensor([1.0, 2.0])], TypeError, "integer tensor"),
        ([torch.zeros(2, 3, dtype=torch.long)], TypeError, "1-D"),
    ],
)
def test_invalid_token_ids(tiny, ids, error, match):
    with pytest.raises(error, match=match):
        check_visual_token_ids(ids, codebook_size=512, max_length=256)
    with pytest.raises(error, match=match):
        tiny["highres"](ids)


def test_valid_token_ids_forms():
    for ids in ([torch.tensor([0, 511])], [[1, 2, 3]], (torch.arange(256),), torch.zeros(2, 4, dtype=torch.int32)):
        check_visual_token_ids(ids, codebook_size=512, max_length=256)


def test_unknown_variant():
    with pytest.raises(ValueError, match="variant"):
        LavitPixelDecoder(variant="midres", hidden_size=88, num_layers=1, mlp_dim=8, output_dim=8)
