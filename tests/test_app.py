"""`lavit app`: a live server on 127.0.0.1 driven through gradio_client and a real headless Chromium (playwright).

Each endpoint's output is compared with what the pipeline gives for the same seed; bad input gets the CLI's
one-line message and the server keeps serving; 20 queued requests all complete, in order, memory flat.
The browser test needs Debian's `chromium` (`apt-get install -y chromium`): it fails where it is missing.
"""

import io
import os
import shutil
import socket
import struct
import tempfile
import time
import zlib
from argparse import Namespace
from pathlib import Path

import numpy as np
import PIL.Image
import psutil
import pytest
import torch
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from gradio_client.utils import Status

from lavit_pipelines.app import NATIVE_SIZE, LavitApp
from lavit_pipelines.cli import UsageError, check_image_file, check_prompt, image_size, load_pipeline
from lavit_pipelines.pipelines.text2image import LavitText2ImagePipeline
from lavit_pipelines.pipelines.understanding import postprocess_answer
from lavit_pipelines.worlds import shapes

STEPS = 4  # denoising steps of the fast requests
PROMPT = "a red circle in the center"
QUEUED = {Status.IN_QUEUE, Status.PROCESSING, Status.PROGRESS, Status.FINISHED}
CHROMIUM = "chromium"  # Debian's package; playwright's own browser download is not used


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(LavitApp, its URL): the app on the embedded demo model, live on 127.0.0.1 in this process."""
    pipe = load_pipeline(LavitText2ImagePipeline, Namespace(model=None, dtype=None, device="cpu", cpu_offload=False))
    pipe.set_progress_bar_config(disable=True)
    examples = tmp_path_factory.mktemp("examples")
    app = LavitApp(pipe, examples_folder=examples)
    blocks = app.blocks()
    blocks.launch(
        server_name="127.0.0.1",
        server_port=free_port(),
        prevent_thread_lock=True,
        quiet=True,
        allowed_paths=[str(examples)],
    )
    yield app, blocks.local_url
    blocks.close()


@pytest.fixture(scope="module")
def client(served) -> Client:
    return Client(served[1], verbose=False, download_files=tempfile.mkdtemp(prefix="lavit-app-client-"))


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> tuple[Path, shapes.Scene]:
    import random

    scene = shapes.pair_scene(random.Random(3))
    path = tmp_path_factory.mktemp("scene") / "scene.png"
    shapes.render(scene).save(path)
    return path, scene


def generate_args(prompt=PROMPT, seed=0, num_images=1, steps=STEPS, size=NATIVE_SIZE, height=0, width=0, images=()):
    return [prompt, [handle_file(str(p)) for p in images], seed, size, height, width, num_images, 4.0, 2.5, steps]


def pipeline_image(app: LavitApp, prompt: str, seed: int, steps: int, images=None) -> np.ndarray:
    generator = torch.Generator().manual_seed(seed)
    image = app.text2image(
        prompt, image=images, generator=generator, num_inference_steps=steps, guidance_scale=2.5, llm_guidance_scale=4.0
    ).images[0]
    return np.asarray(image)


def pixels(path) -> np.ndarray:
    return np.asarray(PIL.Image.open(path).convert("RGB"))


def test_generate_gives_the_pipelines_images_with_their_seeds(served, client):
    app, _ = served
    gallery, warning = client.predict(*generate_args(seed=5, num_images=2), api_name="/generate")
    assert [item["caption"] for item in gallery] == ["seed 5", "seed 6"]
    assert warning == ""
    for item, seed in zip(gallery, (5, 6)):
        np.testing.assert_array_equal(pixels(item["image"]), pipeline_image(app, PROMPT, seed, STEPS))


def test_compiled_app_draws_the_images_of_the_eager_one(served, aot_eager_compile):
    """`lavit app --compile`: the app's images come through the static cache and a compiled step (aot_eager here,
    to keep the test short), pixel for pixel the eager pipeline's."""
    app, _ = served
    compiling = LavitApp(app.text2image, compile=True)
    gallery, _ = compiling.generate(PROMPT, [], 5, NATIVE_SIZE, 0, 0, 1, 4.0, 2.5, STEPS)
    assert aot_eager_compile
    np.testing.assert_array_equal(np.asarray(gallery[0][0]), pipeline_image(app, PROMPT, 5, STEPS))


def test_generate_with_an_image_prompt_and_an_aspect_ratio_size(served, client, scene):
    app, _ = served
    prompt = "<image> a blue square"
    gallery, _ = client.predict(
        *generate_args(prompt, seed=2, height=32, width=48, images=[scene[0]]), api_name="/generate"
    )
    image = pixels(gallery[0]["image"])
    assert image.shape == (32, 48, 3)
    generator = torch.Generator().manual_seed(2)
    expected = app.text2image(
        prompt,
        image=[str(scene[0])],
        generator=generator,
        num_inference_steps=STEPS,
        height=32,
        width=48,
        guidance_scale=2.5,
        llm_guidance_scale=4.0,
    ).images[0]
    np.testing.assert_array_equal(image, np.asarray(expected))


def test_unseen_words_are_named_in_a_warning(client):
    _, warning = client.predict(*generate_args("a red dog beside a circle"), api_name="/generate")
    assert "'dog', 'beside'" in warning and "never trained" in warning
    _, warning = client.predict(*generate_args("a Red circle, in the CENTER."), api_name="/generate")
    assert warning == ""


def test_caption_ask_and_reconstruct_give_the_pipelines_outputs(served, client, scene):
    app, _ = served
    path, facts = scene
    expected = app.understanding.caption([str(path)], generator=torch.Generator().manual_seed(1))[0]
    assert client.predict(handle_file(str(path)), 1, api_name="/caption") == expected
    assert shapes.parse_caption(expected) is not None  # a caption of the world

    question, truth = facts.questions()[0]
    job = client.submit(handle_file(str(path)), question, 0, api_name="/ask")
    answer = job.result()
    greedy = app.understanding.answer(str(path), question, num_beams=1, generator=torch.Generator().manual_seed(0))[0]
    assert answer == greedy == truth
    *streamed, final = job.outputs()  # the text as it was generated, then the post-processed answer
    assert final == answer and postprocess_answer(streamed[-1]) == answer
    assert all(streamed[-1].startswith(partial) for partial in streamed)

    image, count = client.predict(handle_file(str(path)), 0, STEPS, api_name="/reconstruct")
    out = app.text2image.reconstruct(str(path), num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0))
    np.testing.assert_array_equal(pixels(image), np.asarray(out.images[0]))
    assert count == f"{len(out.visual_token_ids[0])} visual tokens"


def decompression_bomb(path: Path) -> Path:
    """A small PNG whose header claims 20000×20000 pixels (over twice PIL's decompression-bomb limit)."""
    buffer = io.BytesIO()
    PIL.Image.new("L", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    header = b"IHDR" + struct.pack(">II", 20000, 20000) + bytes(data[24:29])
    data[12:29], data[29:33] = header, struct.pack(">I", zlib.crc32(header))
    path.write_bytes(bytes(data))
    return path


def as_uploaded(error, path: Path) -> str:
    """The app's message about an upload, with the server's copy of the file named as the local `path`."""
    served = str(error.value).split("'")[1]
    return str(error.value).replace(served, str(path))


def cli_message(check, *args) -> str:
    with pytest.raises(UsageError) as error:
        check(*args)
    return str(error.value)


def test_bad_input_gets_the_cli_message_and_the_app_keeps_serving(served, client, tmp_path):
    not_image = tmp_path / "notes.png"
    not_image.write_text("not an image")
    bomb = decompression_bomb(tmp_path / "bomb.png")
    for path in (not_image, bomb):
        for api_name, args in (
            ("/caption", [0]),
            ("/ask", ["what color is the circle?", 0]),
            ("/reconstruct", [0, STEPS]),
        ):
            with pytest.raises(AppError) as error:
                client.predict(handle_file(str(path)), *args, api_name=api_name)
            assert as_uploaded(error, path) == cli_message(check_image_file, str(path), "IMAGE")
    assert "decompression bomb" in str(error.value)

    long_prompt = "a red circle " * 4000
    cases = [
        (generate_args(long_prompt), cli_message(check_prompt, long_prompt, [])),
        (generate_args(height=30), cli_message(image_size, Namespace(aspect_ratio=None, height=30, width=None))),
        (
            generate_args(width=100_000),
            cli_message(image_size, Namespace(aspect_ratio=None, height=None, width=100_000)),
        ),
        (
            generate_args(height=64, size="4:3"),
            cli_message(image_size, Namespace(aspect_ratio="4:3", height=64, width=None)),
        ),
        (generate_args("<image> a circle"), cli_message(check_prompt, "<image> a circle", [])),
        (generate_args(seed=2**64), "--seed must be an integer in [-2**63, 2**64), got 18446744073709551616"),
        (generate_args(num_images=2.5), "--num-images must be an integer in [1, 8], got 2.5"),
        (generate_args(num_images=100), "Value 100 is greater than maximum value 8"),  # Gradio's slider bound
    ]
    for args, message in cases:
        with pytest.raises(AppError) as error:
            client.predict(*args, api_name="/generate")
        assert str(error.value).startswith(message), (args[0][:20], message)
    with pytest.raises(AppError) as error:
        client.predict(*generate_args("<image>", images=[not_image]), api_name="/generate")
    assert as_uploaded(error, not_image) == cli_message(check_image_file, str(not_image), "--image")
    gallery, _ = client.predict(*generate_args(), api_name="/generate")  # still serving
    assert len(gallery) == 1


def test_twenty_concurrent_requests_complete_in_order_with_memory_flat(served, client):
    app, _ = served
    client.predict(*generate_args(steps=2), api_name="/generate")  # warm
    process = psutil.Process()
    before = process.memory_info().rss
    finished = []
    jobs = []
    for seed in range(20):  # each request joins the queue before the next is sent
        jobs.append(
            client.submit(
                *generate_args(seed=seed, steps=2),
                api_name="/generate",
                result_callbacks=[lambda *outputs, seed=seed: finished.append(seed)],
            )
        )
        while jobs[-1].status().code not in QUEUED:
            time.sleep(0.01)
    results = [job.result(timeout=300) for job in jobs]
    grown = process.memory_info().rss - before
    assert [gallery[0]["caption"] for gallery, _ in results] == [f"seed {seed}" for seed in range(20)]
    assert finished == list(range(20))
    np.testing.assert_array_equal(pixels(results[13][0][0]["image"]), pipeline_image(app, PROMPT, 13, 2))
    assert grown < 64 * 2**20, f"RSS grew {grown / 2**20:.1f} MiB over 20 requests"


def test_the_app_never_shares_and_binds_to_localhost_by_default():
    from lavit_pipelines.cli import build_parser

    args = build_parser().parse_args(["app"])
    assert (args.host, args.port, args.model) == ("127.0.0.1", 7860, None)


def test_browser_generates_the_pipelines_image(served, tmp_path):
    """Headless Chromium types a prompt, clicks Generate, waits for the image: the pipeline's for seed 0."""
    from playwright.sync_api import sync_playwright

    app, url = served
    chromium = shutil.which(CHROMIUM)
    assert chromium, "Chromium is missing: install Debian's package (apt-get install -y chromium)"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(url)
        page.get_by_label("Prompt").fill(PROMPT)
        page.get_by_role("button", name="Generate", exact=True).click()
        image = page.locator("img[src*='/file=']").first
        image.wait_for(timeout=120_000)
        served_png = page.request.get(image.get_attribute("src")).body()
        screenshot = Path(os.environ.get("LAVIT_APP_SCREENSHOT", tmp_path / "app.png"))
        page.screenshot(path=str(screenshot), full_page=True)
        browser.close()
    expected = pipeline_image(app, PROMPT, 0, 25)
    np.testing.assert_array_equal(pixels(io.BytesIO(served_png)), expected)
    assert PIL.Image.open(screenshot).size[0] == 1280
