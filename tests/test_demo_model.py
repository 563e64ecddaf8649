"""The embedded demo model (`lavit_pipelines.default_model_path()`): it draws what it is asked, reads what it
sees, and its recipe still runs."""

import json
import random

import pytest
import torch

from lavit_pipelines import LavitText2ImagePipeline, LavitUnderstandingPipeline, default_model_path
from lavit_pipelines.demo.recipe import Recipe, RecipeRun
from lavit_pipelines.worlds import shapes

# Prompts and seeds checked on the shipped weights (the pipelines are deterministic for a seed).
PROMPTS = ["a red circle in the center", "a blue square on the left", "a yellow triangle at the top", "a green circle on the right"]


@pytest.fixture(scope="module")
def t2i():
    return LavitText2ImagePipeline.from_pretrained(default_model_path(), load_visual_tokenizer=True)


@pytest.fixture(scope="module")
def understanding():
    return LavitUnderstandingPipeline.from_pretrained(default_model_path())


def test_default_model_is_a_small_pipeline_folder():
    folder = default_model_path()
    assert (folder / "model_index.json").is_file()
    assert sum(f.stat().st_size for f in folder.rglob("*.safetensors")) <= 30 * 2**20
    assert not list(folder.rglob("*.bin"))


@pytest.mark.parametrize("prompt", PROMPTS)
def test_generates_the_colour_shape_and_place_asked_for(t2i, prompt):
    image = t2i(prompt, generator=torch.Generator().manual_seed(0)).images[0]
    facts = shapes.parse_caption(prompt)
    seen = shapes.analyze(image)
    assert len(seen) == 1
    assert (seen[0].color, seen[0].shape, seen[0].position) == (*facts.objects[0], facts.position)


def scenes(seed: int, count: int) -> list[shapes.Scene]:
    rng = random.Random(seed)
    return [shapes.random_scene(rng) for _ in range(count)]


def test_answers_use_the_worlds_words(understanding):
    """The shipped model's understanding is weak (see docs/demo-model.md); what holds: answers are words of the
    world's answer vocabulary for each kind of question."""
    held_out = scenes(seed=12345, count=4)
    images = [shapes.render(scene) for scene in held_out]
    generator = torch.Generator().manual_seed(0)
    colors = understanding.answer(images, [scene.questions()[0][0] for scene in held_out], generator=generator)
    assert set(colors) <= set(shapes.COLORS), colors
    counts = understanding.answer(images, "how many shapes are there?", generator=generator)
    assert set(counts) <= {"one", "two"}, counts


def test_reconstruction_and_image_prompt_keep_the_colour(t2i):
    scene = shapes.single_scene(random.Random(7), shape="square", color="blue", position="center")
    image = shapes.render(scene)
    reconstructed = t2i.reconstruct(image, num_inference_steps=10, generator=torch.Generator().manual_seed(0)).images[0]
    assert [o.color for o in shapes.analyze(reconstructed)] == ["blue"]
    prompted = t2i("<image>", image=image, num_inference_steps=10, generator=torch.Generator().manual_seed(0))
    assert prompted.images[0].size == (64, 64) and len(prompted.visual_token_ids[0]) >= 1


def test_recipe_first_steps_build_a_loadable_model(tmp_path):
    """A tiny fraction of every stage of the recipe, end to end; then a second run reuses every stage."""
    recipe = Recipe().scaled(0.004)
    model = RecipeRun(recipe, tmp_path).run()
    pipe = LavitText2ImagePipeline.from_pretrained(model, load_visual_tokenizer=True)
    assert pipe.visual_tokenizer.config.codebook_size == pipe.language_model.config.visual_vocab_size
    log = [json.loads(line) for line in (tmp_path / "recipe.jsonl").read_text().splitlines()]
    done = [r["stage"] for r in log if r["status"] == "done"]
    # the autoencoder trains in a second process, beside the vision encoder
    assert set(done[2:4]) == {"autoencoder", "vision-encoder"}
    assert done[:2] + done[4:] == ["data", "data-language", "base", "visual-tokenizer", "pixel-decoder", "language-model", "model"]
    RecipeRun(recipe, tmp_path).run()
    again = [json.loads(line) for line in (tmp_path / "recipe.jsonl").read_text().splitlines()][len(log):]
    assert {r["status"] for r in again} == {"already done"}
