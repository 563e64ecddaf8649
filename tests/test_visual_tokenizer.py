"""LavitVisualTokenizer: parity with the original LaVIT on the converted tiny checkpoint, and tiny models built in code."""

import pytest
import torch

from lavit_pipelines import LavitVisualTokenizer
from lavit_pipelines.tiny import build_tiny_components

IMG, IMG_END, OFFSET = 32000, 32001, 32002  # the fixture's LLM ids, only to read its references


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).abs().max() / expected.abs().max()).item()


def public_config(model) -> dict:
    """The model's config as saved (tuples as lists), without private entries."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in model.config.items() if not k.startswith("_")}


@pytest.fixture(scope="module")
def converted(converted_dir):
    return LavitVisualTokenizer.from_pretrained(converted_dir / "visual_tokenizer").eval()


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_components(seed=0)["visual_tokenizer"]


@pytest.fixture(scope="module")
def pixels():
    """Two different (2, 3, 224, 224) inputs."""
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))


# --------------------------------------------------------------------------- parity with the original


@torch.no_grad()
def test_encoder_and_predictor_match_reference(converted, reference):
    tensors = reference[1]
    features = converted.encoder(tensors["pixel_values"])
    assert features.shape == (2, 257, 176)
    assert relative_error(features, tensors["eva_features"]) < 1e-4
    logprobs = converted.token_predictor(features[:, 1:])
    assert relative_error(logprobs, tensors["predictor_logprobs"]) < 1e-4


@torch.no_grad()
def test_token_ids_match_reference(converted, reference):
    ref, tensors = reference
    expected = ref["image_token_ids"]
    for generator in (None, torch.Generator().manual_seed(ref["seed"] + 1)):
        if generator is None:
            torch.manual_seed(ref["seed"] + 1)
        codes = converted.tokenize(tensors["pixel_values"], generator=generator)
        assert [len(c) for c in codes] == ref["token_nums"]
        assert all(c.dtype == torch.long for c in codes)
        assert [[IMG] + (c + OFFSET).tolist() + [IMG_END] for c in codes] == expected


@torch.no_grad()
def test_understanding_features_match_reference(converted, reference):
    ref, tensors = reference
    torch.manual_seed(ref["seed"] + 7)
    features = converted.encode_features(tensors["pixel_values"])
    for i, feats in enumerate(features):
        expected = tensors[f"understanding_embeds_{i}"]
        assert feats.shape == expected.shape
        assert relative_error(feats, expected) < 1e-4


# --------------------------------------------------------------------------- tiny models built in code


@torch.no_grad()
def test_shapes(tiny, pixels):
    config = tiny.config
    assert tiny.encoder(pixels).shape == (2, 257, config.hidden_size)
    codes = tiny.tokenize(pixels, generator=torch.Generator().manual_seed(0))
    features = tiny.encode_features(pixels, generator=torch.Generator().manual_seed(0))
    assert len(codes) == len(features) == 2
    for c, f in zip(codes, features):
        assert c.ndim == 1 and 1 <= len(c) <= 256 and c.dtype == torch.long
        assert 0 <= c.min() and c.max() < config.codebook_size
        assert f.shape == (len(f), config.llm_hidden_size) and 1 <= len(f) <= 256
    assert tiny(pixels, generator=torch.Generator().manual_seed(0))[0].equal(codes[0])


@torch.no_grad()
def test_generator_determinism(tiny, pixels):
    def run(method, seed):
        return getattr(tiny, method)(pixels, generator=torch.Generator().manual_seed(seed))

    for method in ("tokenize", "encode_features"):
        first, again, other = run(method, 1), run(method, 1), run(method, 2)
        assert all(a.equal(b) for a, b in zip(first, again))
        assert any(len(a) != len(b) or not a.equal(b) for a, b in zip(first, other))
    # A generator per image gives each image what it gets alone with that generator.
    batched = tiny.tokenize(pixels, generator=[torch.Generator().manual_seed(s) for s in (3, 4)])
    for i, seed in enumerate((3, 4)):
        assert batched[i].equal(tiny.tokenize(pixels[i : i + 1], generator=torch.Generator().manual_seed(seed))[0])
    # The global RNG is used without a generator.
    torch.manual_seed(5)
    global_codes = tiny.tokenize(pixels)
    assert all(a.equal(b) for a, b in zip(global_codes, run("tokenize", 5)))


@torch.no_grad()
def test_dynamic_selection_follows_the_predictor(tiny, pixels):
    """The kept count is the number of patches whose Gumbel-perturbed argmax is 'keep'; biasing the
    predictor towards keep/drop moves it to all patches / the one likeliest patch (never none)."""
    bias = tiny.token_predictor.score_mlp[-1].bias
    original = bias.clone()
    try:
        bias.copy_(torch.tensor([50.0, -50.0]))
        assert [len(c) for c in tiny.tokenize(pixels, generator=torch.Generator().manual_seed(0))] == [256, 256]
        bias.copy_(torch.tensor([-50.0, 50.0]))
        assert [len(c) for c in tiny.tokenize(pixels, generator=torch.Generator().manual_seed(0))] == [1, 1]
    finally:
        bias.copy_(original)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_save_load_round_trip(tiny, pixels, tmp_path, dtype):
    tiny.save_pretrained(tmp_path)
    loaded = LavitVisualTokenizer.from_pretrained(tmp_path, dtype=dtype)
    assert public_config(loaded) == public_config(tiny)
    assert loaded.dtype == dtype
    # The token predictors stay in float32 (`_keep_in_fp32_modules`): the Gumbel selection needs it.
    assert loaded.token_predictor.input_proj.weight.dtype == torch.float32
    state = tiny.state_dict()
    for key, value in loaded.state_dict().items():
        assert value.float().equal(state[key].to(value.dtype).float()), key
    if dtype == torch.float32:
        generator = torch.Generator().manual_seed(0)
        expected = tiny.tokenize(pixels, generator=torch.Generator().manual_seed(0))
        assert all(a.equal(b) for a, b in zip(loaded.tokenize(pixels, generator=generator), expected))


@torch.no_grad()
def test_bfloat16_runs_close_to_float32(tiny, pixels):
    half = build_tiny_components(seed=0)["visual_tokenizer"].to(torch.bfloat16)
    assert half.encoder.patch_embedding.weight.dtype == torch.bfloat16
    features = half.encoder(pixels)  # float32 input is cast
    assert features.dtype == torch.bfloat16
    assert relative_error(features, tiny.encoder(pixels)) < 0.05
    codes = half.tokenize(pixels.bfloat16(), generator=torch.Generator().manual_seed(0))
    assert all(c.dtype == torch.long and c.max() < half.config.codebook_size for c in codes)
    feats = half.encode_features(pixels.bfloat16(), generator=torch.Generator().manual_seed(0))
    assert all(f.dtype == torch.bfloat16 and f.shape[1] == half.config.llm_hidden_size for f in feats)


def test_tiny_components_are_seeded():
    a, b, c = (build_tiny_components(seed=s)["visual_tokenizer"].state_dict() for s in (0, 0, 1))
    assert all(a[k].equal(b[k]) for k in a)
    assert not a["encoder.position_embedding"].equal(c["encoder.position_embedding"])
    # Nothing is left at a constant initialisation (no mapping can hide behind zeros).
    assert all(v.count_nonzero() for v in a.values())


def test_an_image_always_keeps_a_patch():
    """A draw that keeps no patch of an image keeps its likeliest one (zero visual tokens fit no decoder)."""
    from lavit_pipelines.models.visual_tokenizer import sample_keep_mask

    keep_logprob = torch.tensor([[-60.0, -50.0, -70.0], [60.0, 60.0, 60.0]])  # image 0 drops every patch, image 1 none
    logprobs = torch.stack([keep_logprob, torch.zeros_like(keep_logprob)], dim=-1).log_softmax(dim=-1)
    keep = sample_keep_mask(logprobs, generator=torch.Generator().manual_seed(0))
    assert keep[0].tolist() == [False, True, False] and keep[1].all()
