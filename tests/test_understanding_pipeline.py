"""LavitUnderstandingPipeline: parity with the original's references, input handling, generation modes."""

import logging
import sys
import types

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import GenerationConfig
from transformers.generation.streamers import BaseStreamer

from lavit_pipelines import LavitUnderstandingPipeline, LavitUnderstandingPipelineOutput
from lavit_pipelines.pipelines.understanding import lemmatize_answers, postprocess_answer, postprocess_caption


@pytest.fixture(scope="module")
def pipe(converted_dir):
    pipe = LavitUnderstandingPipeline.from_pretrained(converted_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def seed(reference):
    return reference[0]["seed"]


@pytest.fixture(scope="module")
def pixel_values(reference):
    return reference[1]["pixel_values"]


@pytest.fixture(scope="module")
def image_paths(fixture_dir):
    return [str(fixture_dir / "reference" / f"image_{i}.png") for i in range(2)]


@pytest.fixture
def no_models(pipe, monkeypatch):
    """Makes any run of the visual tokenizer or the language model fail the test."""

    def boom(*args, **kwargs):
        raise AssertionError("a model ran before the inputs were validated")

    monkeypatch.setattr(pipe.visual_tokenizer, "encode_features", boom)
    monkeypatch.setattr(pipe.language_model, "generate", boom)


def greedy_caption_ids(reference):
    """Generated ids of the original's greedy captions (its leading start id 1 dropped)."""
    return torch.tensor([row[1:] for row in reference[0]["caption_greedy_token_ids"]])


# ------------------------------------------------------------------ parity with the original


def test_features_match_original(pipe, reference, seed, pixel_values):
    torch.manual_seed(seed + 7)
    features = pipe.visual_tokenizer.encode_features(pixel_values)
    for i, feature in enumerate(features):
        expected = reference[1][f"understanding_embeds_{i}"]
        assert feature.shape == expected.shape
        assert ((feature - expected).norm() / expected.norm()).item() < 1e-4


def test_inputs_embeds_match_original(pipe, reference):
    tensors = reference[1]
    features = [tensors["understanding_embeds_0"], tensors["understanding_embeds_1"]]
    embeds, mask = pipe.prepare_inputs_embeds(features)
    expected = tensors["understanding_inputs_embeds"]
    assert torch.allclose(embeds, expected, atol=1e-5, rtol=1e-4)
    assert torch.equal(mask, tensors["understanding_attention_mask"].long())


def test_greedy_caption_ids_match_original(pipe, reference, seed, image_paths):
    # From the image files (preprocessed exactly as the reference pixel values), Gumbel noise from `generator`.
    out = pipe(image_paths, max_new_tokens=12, min_new_tokens=8, generator=torch.Generator().manual_seed(seed + 7))
    assert isinstance(out, LavitUnderstandingPipelineOutput)
    assert torch.equal(out.sequences, greedy_caption_ids(reference))
    assert out.text == [t.strip() for t in pipe.tokenizer.batch_decode(out.sequences, skip_special_tokens=True)]


# ------------------------------------------------------------------ loading


def test_loads_only_its_components_quietly(converted_dir, tmp_path):
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    diffusers_logger = logging.getLogger("diffusers")
    diffusers_logger.addHandler(handler)
    try:
        pipe = LavitUnderstandingPipeline.from_pretrained(converted_dir)
        pipe.save_pretrained(tmp_path)
        reloaded = LavitUnderstandingPipeline.from_pretrained(tmp_path)
    finally:
        diffusers_logger.removeHandler(handler)
    assert [r.getMessage() for r in records] == []
    for loaded in (pipe, reloaded):
        assert sorted(loaded.components) == ["language_model", "tokenizer", "visual_tokenizer"]
        assert not any(hasattr(loaded, name) for name in ("pixel_decoder", "unet", "vae", "scheduler"))
    assert LavitUnderstandingPipeline.load_config(tmp_path)["_class_name"] == "LavitUnderstandingPipeline"
    weights, reloaded_weights = pipe.language_model.state_dict(), reloaded.language_model.state_dict()
    assert all(torch.equal(weights[k], reloaded_weights[k]) for k in weights)
    assert reloaded.image_processor.config.image_size == pipe.visual_tokenizer.config.image_size


# ------------------------------------------------------------------ inputs


def test_prompts_of_mixed_lengths(pipe, reference):
    tensors = reference[1]
    features = [tensors["understanding_embeds_0"], tensors["understanding_embeds_1"]]
    prompts = ["A photo", "A photo of something rather long"]
    lengths = [len(pipe.tokenizer(p, add_special_tokens=False).input_ids) for p in prompts]
    pads = max(lengths) - min(lengths)
    image_embeds, image_mask = pipe.prepare_inputs_embeds(features)
    table = pipe.language_model.get_input_embeddings().weight
    prompt_ids = pipe.tokenizer(prompts[0], add_special_tokens=False, return_tensors="pt").input_ids[0]
    width = image_embeds.shape[1]

    # As the original's captioning: [image] [prompt pads] [prompt].
    embeds, mask = pipe.prepare_inputs_embeds(features, prompts)
    assert embeds.shape[:2] == mask.shape == (2, width + max(lengths))
    assert torch.equal(embeds[:, :width], image_embeds) and torch.equal(mask[:, :width], image_mask)
    assert mask[0, width:].tolist() == [0] * pads + [1] * lengths[0] and mask[1, width:].all()
    assert torch.equal(embeds[0, width : width + pads], table[2].expand(pads, -1))
    assert torch.equal(embeds[0, width + pads :], table[prompt_ids])

    # As the original's VQA: [prompt pads] [image] [prompt].
    moved, moved_mask = pipe.prepare_inputs_embeds(features, prompts, pad_prompt_before_image=True)
    assert torch.equal(moved[0, :pads], table[2].expand(pads, -1)) and moved_mask[0, :pads].sum() == 0
    assert torch.equal(moved[0, pads : pads + width], image_embeds[0])
    assert torch.equal(moved_mask[0, pads : pads + width], image_mask[0])
    assert torch.equal(moved[0, pads + width :], table[prompt_ids])
    assert torch.equal(moved[1], embeds[1]) and torch.equal(moved_mask[1], mask[1])

    # Masked pads and mask-derived positions: both layouts generate the same text.
    generator = torch.Generator().manual_seed(0)
    pixels = tensors["pixel_values"]
    a = pipe(pixels, prompts, max_new_tokens=3, min_new_tokens=3, generator=generator.manual_seed(0)).sequences
    b = pipe(
        pixels,
        prompts,
        max_new_tokens=3,
        min_new_tokens=3,
        generator=generator.manual_seed(0),
        pad_prompt_before_image=True,
    )
    assert torch.equal(a, b.sequences)


def test_odd_images_in_one_batch(pipe, monkeypatch):
    rng = np.random.default_rng(0)
    rgb = PIL.Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8))
    images = [
        rgb.convert("L"),
        rgb.convert("P"),
        rgb.convert("RGBA"),
        rgb.convert("CMYK"),
        rgb.resize((3, 5)),
        rgb.resize((2000, 7)),
        np.asarray(rgb),
    ]
    calls = []
    encode = pipe.visual_tokenizer.encode_features
    monkeypatch.setattr(
        pipe.visual_tokenizer, "encode_features", lambda x, **kw: calls.append(x.shape) or encode(x, **kw)
    )
    out = pipe(images, max_new_tokens=2, min_new_tokens=2)
    assert calls == [(len(images), 3, 224, 224)]
    assert out.sequences.shape == (len(images), 2) and len(out.text) == len(images)
    assert out.sequences.max() < pipe.language_model.lavit_token_id_range.start


def test_single_path_and_preprocessed_tensor_agree(pipe, image_paths, pixel_values):
    from_path = pipe(image_paths[1], max_new_tokens=4, min_new_tokens=4, generator=torch.Generator().manual_seed(5))
    from_tensor = pipe(pixel_values[1:], max_new_tokens=4, min_new_tokens=4, generator=torch.Generator().manual_seed(5))
    assert torch.equal(from_path.sequences, from_tensor.sequences)
    assert from_path.sequences.shape == (1, 4)


# ------------------------------------------------------------------ generation modes


def test_sampling_is_reproducible_with_generator(pipe, pixel_values):
    def sample(seed):
        kwargs = dict(do_sample=True, top_k=0, temperature=1.5, max_new_tokens=6, min_new_tokens=6, return_dict=False)
        return pipe(pixel_values, generator=torch.Generator().manual_seed(seed), **kwargs)

    state = torch.get_rng_state()
    text, first = sample(11)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left as it was
    assert torch.equal(sample(11)[1], first)
    assert not torch.equal(sample(12)[1], first)
    assert isinstance(text, list) and len(text) == 2


def test_beam_search_and_multiple_returns(pipe, pixel_values):
    out = pipe(
        pixel_values, num_beams=2, num_return_sequences=2, max_new_tokens=4, min_new_tokens=4, length_penalty=0.5
    )
    assert out.sequences.shape == (4, 4) and len(out.text) == 4
    captions = pipe.caption(pixel_values[:1], max_new_tokens=9, generator=torch.Generator().manual_seed(1))
    assert len(captions) == 1 and "." not in captions[0] and captions[0] == captions[0].strip()


class Collect(BaseStreamer):
    def __init__(self):
        self.tokens, self.ended = [], False

    def put(self, value):
        self.tokens.append(value.reshape(-1))

    def end(self):
        self.ended = True


def test_streamer_receives_the_generated_tokens(pipe, pixel_values):
    streamer = Collect()
    out = pipe(pixel_values[:1], max_new_tokens=5, min_new_tokens=5, streamer=streamer)
    assert streamer.ended
    assert torch.equal(torch.cat(streamer.tokens), out.sequences[0])


def test_answer_prompt_and_defaults(pipe, pixel_values, monkeypatch):
    seen = {}
    call = type(pipe).__call__

    def spy(self, image, prompt=None, **kwargs):
        seen.update(prompt=prompt, **kwargs)
        return call(self, image, prompt, **{**kwargs, "num_beams": 2, "max_new_tokens": 3})

    monkeypatch.setattr(type(pipe), "__call__", spy)
    answers = pipe.answer(pixel_values, ["What is it?", "Why?"])
    assert seen["prompt"] == ["Question: What is it? Answer:", "Question: Why? Answer:"]
    assert (seen["num_beams"], seen["max_new_tokens"], seen["min_new_tokens"]) == (5, 10, 2)
    assert seen["length_penalty"] == 0 and seen["early_stopping"] and seen["pad_prompt_before_image"]
    assert len(answers) == 2 and all("," not in a and "." not in a for a in answers)
    pipe.answer(pixel_values, "What is it?")
    assert seen["prompt"] == "Question: What is it? Answer:"


def test_max_new_tokens_alone_clamps_the_minimum(pipe, pixel_values):
    assert pipe(pixel_values[:1], max_new_tokens=5).sequences.shape == (1, 5)
    assert len(pipe.caption(pixel_values[:1], max_new_tokens=3)) == 1


def test_one_generator_per_image(pipe, pixel_values):
    def generators():
        return [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]

    features = pipe.encode_images(pixel_values, generators())
    for row, (image, generator) in enumerate(zip(pixel_values, generators())):
        torch.testing.assert_close(features[row], pipe.encode_images(image[None], generator)[0])
    first = pipe(pixel_values, max_new_tokens=4, generator=generators()).sequences
    assert torch.equal(first, pipe(pixel_values, max_new_tokens=4, generator=generators()).sequences)


def test_caption_with_streamer_is_greedy(pipe, pixel_values):
    streamer = Collect()
    caption = pipe.caption(
        pixel_values[:1], max_new_tokens=4, streamer=streamer, generator=torch.Generator().manual_seed(0)
    )
    assert streamer.ended
    expected = pipe(pixel_values[:1], max_new_tokens=4, generator=torch.Generator().manual_seed(0)).text[0]
    assert caption[0] == expected.split(".")[0]


def has_repeats(row) -> bool:
    return len(set(row.tolist())) < len(row)


def test_generate_arguments_pass_through(pipe, pixel_values):
    def run(**kwargs):
        return pipe(pixel_values[:1], max_new_tokens=12, generator=torch.Generator().manual_seed(0), **kwargs)

    baseline = run().sequences
    assert has_repeats(baseline[0])  # so that the next check can fail
    assert not has_repeats(run(no_repeat_ngram_size=1).sequences[0])
    stop = pipe.tokenizer.convert_ids_to_tokens(int(baseline[0, 3])).lstrip("▁")
    stopped = run(stop_strings=[stop])
    assert stopped.sequences.shape[1] < 12 and stopped.text[0].endswith(stop)


def test_generation_config_sets_what_the_call_does_not(pipe, pixel_values):
    def run(**kwargs):
        return pipe(pixel_values, generator=torch.Generator().manual_seed(0), **kwargs).sequences

    config = GenerationConfig(max_new_tokens=3, num_beams=2, no_repeat_ngram_size=1)
    out = run(generation_config=config)
    assert out.shape[1] == 3  # the config's max_new_tokens (min clamped to it)
    assert torch.equal(out, run(max_new_tokens=3, num_beams=2, no_repeat_ngram_size=1))
    assert run(generation_config=config, max_new_tokens=5).shape[1] == 5  # the call wins


# ------------------------------------------------------------------ post-processing


def test_postprocessing_functions():
    assert postprocess_caption("  a dog in the snow. It runs.  ") == "a dog in the snow"
    assert postprocess_caption("no period") == "no period"
    assert postprocess_answer(" blue, mostly.\nquestion: x") == "blue"
    assert postprocess_answer("two\nLong answer: there are two") == "two"
    assert postprocess_answer("yes question: is it") == "yes "
    assert postprocess_answer("a cat Long answer: a cat on a mat") == "a cat "
    assert postprocess_answer("3.5 meters") == "3"


def test_caption_and_answer_postprocess_decoded_text(pipe, pixel_values, monkeypatch):
    def fake_call(self, image, prompt=None, **kwargs):
        return LavitUnderstandingPipelineOutput(
            text=["A dog. Running", "red, green\nQuestion:"], sequences=torch.zeros(2, 1)
        )

    monkeypatch.setattr(type(pipe), "__call__", fake_call)
    assert pipe.caption(pixel_values) == ["A dog", "red, green\nQuestion:"]
    assert pipe.answer(pixel_values, "?") == ["A dog", "red"]


def test_lemmatize_answers():
    class Token:
        def __init__(self, text, pos, lemma):
            self.text, self.pos_, self.lemma_ = text, pos, lemma

    lemmas = {"dogs": ("NOUN", "dog"), "running": ("VERB", "run"), "red": ("ADJ", "red")}
    nlp = lambda text: [Token(w, *lemmas.get(w, ("X", w + "?"))) for w in text.split()]  # noqa: E731
    assert lemmatize_answers(["Dogs running", "RED"], nlp) == ["dog run", "red"]


def test_lemmatize_without_spacy_fails_before_models(pipe, pixel_values, monkeypatch, no_models):
    monkeypatch.setitem(sys.modules, "spacy", None)
    with pytest.raises(ImportError, match="pip install spacy"):
        pipe.answer(pixel_values, "What?", lemmatize=True)

    def load(name):
        raise OSError(f"[E050] Can't find model '{name}'")

    monkeypatch.setitem(sys.modules, "spacy", types.SimpleNamespace(load=load))
    with pytest.raises(ValueError, match="en_core_web_sm"):
        pipe.answer(pixel_values, "What?", lemmatize=True)


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(prompt=3), TypeError, "prompt"),
        (dict(prompt=["a", 1]), TypeError, "prompt"),
        (dict(prompt=["only one"]), ValueError, "prompt"),
        (dict(max_new_tokens=0), ValueError, "max_new_tokens"),
        (dict(max_new_tokens=4, min_new_tokens=5), ValueError, "min_new_tokens"),
        (dict(num_beams=0), ValueError, "num_beams"),
        (dict(num_return_sequences=2), ValueError, "num_return_sequences"),
        (dict(do_sample=True, temperature=0.0), ValueError, "temperature"),
        (dict(do_sample=True, top_p=1.5), ValueError, "top_p"),
        (dict(do_sample=True, top_k=-1), ValueError, "top_k"),
        (dict(repetition_penalty=0), ValueError, "repetition_penalty"),
        (dict(generator=0), TypeError, "generator"),
        (dict(generator=[torch.Generator()]), ValueError, "generator"),
        (dict(inputs_embeds=torch.zeros(1, 1, 4)), TypeError, "inputs_embeds"),
        (dict(num_beams=2, streamer=BaseStreamer()), ValueError, "streamer"),
    ],
)
def test_invalid_arguments(pipe, pixel_values, no_models, kwargs, error, match):
    with pytest.raises(error, match=match):
        pipe(pixel_values, **kwargs)


def test_invalid_images(pipe, pixel_values, tmp_path, no_models):
    with pytest.raises(FileNotFoundError, match="image"):
        pipe(str(tmp_path / "missing.png"))
    with pytest.raises(ValueError, match="image"):
        pipe(pixel_values[:, :, :100])
    with pytest.raises(TypeError, match="image"):
        pipe([pixel_values[0].numpy()])
    with pytest.raises(TypeError, match="image"):
        pipe(None)
    with pytest.raises(TypeError, match="question"):
        pipe.answer(pixel_values, 5)
