"""`lavit app`: a Gradio web app over one loaded LaVIT: Generate, Caption, Ask, Reconstruct.

Imported only by the `app` command (it needs the `app` extra). The app is a thin front end: each tab checks its
inputs with the CLI's own checks (same one-line messages, under the CLI's option names), then calls the
pipeline methods the CLI calls with the same arguments, so a tab and the matching `lavit` command give the same
output for the same seed. One model is in memory (the text-to-image pipeline and an understanding pipeline on
the same components); every tab is an API endpoint (`api_name`) and every request waits in Gradio's queue,
one running at a time (all events share one concurrency slot).
"""

from __future__ import annotations

import random
import tempfile
import threading
from argparse import Namespace
from contextlib import contextmanager
from pathlib import Path

import gradio as gr
import torch
from transformers import TextIteratorStreamer

from .cli import (
    UsageError,
    check_common,
    check_generation_settings,
    check_image_file,
    check_prompt,
    check_text,
    generation_kwargs,
    load_pipeline,
)
from .demo import default_model_path
from .pipelines.text2image import ASPECT_RATIO_SIZES, LavitText2ImagePipeline
from .pipelines.understanding import LavitUnderstandingPipeline
from .tokenization import unseen_words_warning
from .worlds import shapes

NATIVE_SIZE = "model's size"
MAX_IMAGES = 8  # images per Generate request
MAX_STEPS = 200  # denoising steps per request
QUEUE_SIZE = 64  # requests waiting at most; more are refused at once
STREAM_TIMEOUT_S = 600  # an Ask answer that stalls this long ends the request
TRACKED_PROGRESS = gr.Progress(track_tqdm=True)  # the default that makes Gradio show the pipelines' progress bars
DEMO_NOTE = (
    "**The embedded demo model knows one small world** (`lavit_pipelines.worlds.shapes`): a {shapes} in {colors} "
    "on a white {canvas}×{canvas} canvas, alone ({places}) or two different shapes side by side or stacked "
    "({relations}). Prompts are captions of that world (`a red circle in the center`, `a blue triangle above a "
    "yellow square`); words outside it get a warning. Questions: what color is the SHAPE?, how many shapes are "
    "there?, where is the SHAPE?, what shape is on the left?"
)
GENERIC_PROMPTS = ["a sculpture of a duck made of wool", "a lighthouse on a cliff at sunset, oil painting"]


@contextmanager
def shown_as_error():
    """A bad input (or a pipeline's refusal) becomes a one-line `gr.Error`; the app keeps serving."""
    try:
        yield
    except (UsageError, ValueError, TypeError, OSError) as error:
        raise gr.Error(str(error), print_exception=False) from error


def file_path(upload) -> str | None:
    """The server-side path of a `gr.File` upload (a path string, or an object with `.name`)."""
    return None if upload is None else str(getattr(upload, "name", upload))


def seeded(seed: float) -> torch.Generator:
    check_common(Namespace(seed=int(seed)))
    return torch.Generator().manual_seed(int(seed))


def check_count(value: float, name: str, most: int) -> int:
    """An integer in [1, most] (the app's bound on the work one request may ask for)."""
    if value is None or value != int(value) or not 1 <= value <= most:
        raise UsageError(f"{name} must be an integer in [1, {most}], got {value}")
    return int(value)


class LavitApp:
    """The tabs' handlers over one text-to-image pipeline (with its visual tokenizer) and an understanding
    pipeline that shares its tokenizer, language model and visual tokenizer."""

    def __init__(self, text2image: LavitText2ImagePipeline, examples_folder: Path | None = None, compile: bool = False):
        self.text2image = text2image
        self.compile = compile  # visual tokens through the static cache and a compiled step (`lavit app --compile`)
        self.understanding = LavitUnderstandingPipeline(
            tokenizer=text2image.tokenizer,
            language_model=text2image.language_model,
            visual_tokenizer=text2image.visual_tokenizer,
        )
        self.examples_folder = examples_folder  # None: not the demo model

    def generate(
        self,
        prompt: str,
        image_files,
        seed: float,
        size: str,
        height: float,
        width: float,
        num_images: float,
        llm_guidance_scale: float,
        guidance_scale: float,
        steps: float,
        progress=TRACKED_PROGRESS,
    ):
        """Images for `prompt` (with `<image>` placeholders for `image_files`), image i seeded with seed + i
        (`lavit generate --seed SEED+i` draws it): (gallery of (image, "seed S")), warning markdown)."""
        with shown_as_error():
            settings = Namespace(
                aspect_ratio=None if size == NATIVE_SIZE else size,
                height=int(height) or None,
                width=int(width) or None,
                guidance_scale=guidance_scale,
                llm_guidance_scale=llm_guidance_scale,
                steps=check_count(steps, "--steps", MAX_STEPS),
                max_new_tokens=None,
                compile=self.compile,
            )
            count = check_count(num_images, "--num-images", MAX_IMAGES)
            images = [file_path(f) for f in image_files or []]
            check_generation_settings(settings)
            if not prompt:
                raise UsageError("a PROMPT is required")
            check_prompt(prompt, images)
            generators = [seeded(seed + i) for i in range(count)]
            warning = unseen_words_warning(self.tokenizer, prompt)
            if warning:
                gr.Warning(warning)
            results = []
            for i, generator in enumerate(generators):
                image = self.text2image(
                    prompt, image=images or None, generator=generator, **generation_kwargs(settings)
                ).images[0]
                results.append((image, f"seed {int(seed) + i}"))
        return results, f"⚠️ {warning}" if warning else ""

    def caption(self, image_file, seed: float) -> str:
        """`lavit caption IMAGE --seed SEED`."""
        with shown_as_error():
            path = check_image_file(file_path(image_file) or "", "IMAGE")
            return self.understanding.caption([path], generator=seeded(seed))[0]

    def ask(self, image_file, question: str, seed: float):
        """The answer to `question`, streamed as it is generated (greedy search), then post-processed."""
        with shown_as_error():
            path = check_image_file(file_path(image_file) or "", "IMAGE")
            check_text(question, "QUESTION")
            generator = seeded(seed)
        streamer = TextIteratorStreamer(
            self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=STREAM_TIMEOUT_S
        )
        outcome = {}

        def run():
            try:
                outcome["answer"] = self.understanding.answer(path, question, streamer=streamer, generator=generator)[0]
            except Exception as error:  # noqa: BLE001 - raised again in the request's thread
                outcome["error"] = error
            finally:
                streamer.end()

        worker = threading.Thread(target=run)
        worker.start()
        text = ""
        for piece in streamer:
            text += piece
            yield text.strip()
        worker.join()
        if "error" in outcome:
            with shown_as_error():
                raise outcome["error"]
        yield outcome["answer"]

    def reconstruct(self, image_file, seed: float, steps: float, progress=TRACKED_PROGRESS):
        """`lavit reconstruct IMAGE --seed SEED --steps STEPS`: (image, "N visual tokens")."""
        with shown_as_error():
            path = check_image_file(file_path(image_file) or "", "IMAGE")
            out = self.text2image.reconstruct(
                path, num_inference_steps=check_count(steps, "--steps", MAX_STEPS), generator=seeded(seed)
            )
        return out.images[0], f"{len(out.visual_token_ids[0])} visual tokens"

    @property
    def tokenizer(self):
        return self.text2image.tokenizer

    # ------------------------------------------------------------------ examples

    def example_prompts(self) -> list[str]:
        if self.examples_folder is None:
            return GENERIC_PROMPTS
        rng = random.Random(0)
        return [shapes.single_scene(rng).caption for _ in range(3)] + [shapes.pair_scene(rng).caption for _ in range(2)]

    def example_scenes(self) -> list[tuple[str, str]]:
        """Rendered scenes of the demo world, each with a question it answers: (path, question); none for
        other models."""
        if self.examples_folder is None:
            return []
        rng = random.Random(1)
        examples = []
        for i, scene in enumerate((shapes.single_scene(rng), shapes.pair_scene(rng), shapes.single_scene(rng))):
            path = self.examples_folder / f"scene-{i}.png"
            shapes.render(scene).save(path)
            examples.append((str(path), scene.questions()[i % 2][0]))
        return examples

    # ------------------------------------------------------------------ layout

    def blocks(self) -> gr.Blocks:
        """The app: one tab per task, each an API endpoint (`/generate`, `/caption`, `/ask`, `/reconstruct`)."""
        native = self.text2image.unet.config.sample_size * self.text2image.vae_scale_factor
        scenes = self.example_scenes()
        run = dict(concurrency_id="model", concurrency_limit=1)
        with gr.Blocks(title="LaVIT") as blocks:
            gr.Markdown("# LaVIT\nText and images in, images and text out, through dynamic discrete visual tokens.")
            if self.examples_folder is not None:
                gr.Markdown(
                    DEMO_NOTE.format(
                        shapes=" or ".join(shapes.SHAPES),
                        colors=", ".join(shapes.COLORS),
                        canvas=shapes.CANVAS,
                        places=", ".join(shapes.PHRASES.values()),
                        relations=", ".join(shapes.RELATIONS.values()),
                    )
                )
            with gr.Tab("Generate"):
                with gr.Row():
                    with gr.Column():
                        prompt = gr.Textbox(label="Prompt", placeholder="put <image> where each image prompt goes")
                        prompt_images = gr.File(
                            label="Image prompts, in <image> order",
                            file_count="multiple",
                            file_types=["image"],
                            type="filepath",
                        )
                        with gr.Row():
                            seed = gr.Number(label="Seed", value=0, precision=0)
                            num_images = gr.Slider(
                                1, MAX_IMAGES, value=1, step=1, label="Images (seeds seed … seed+N-1)"
                            )
                        with gr.Row():
                            size = gr.Dropdown(
                                [NATIVE_SIZE, *ASPECT_RATIO_SIZES],
                                value=NATIVE_SIZE,
                                label=f"Aspect ratio (model's size: {native}×{native})",
                            )
                            height = gr.Number(label="Height (0: from the aspect ratio)", value=0, precision=0)
                            width = gr.Number(label="Width (0: from the aspect ratio)", value=0, precision=0)
                        with gr.Row():
                            llm_guidance = gr.Slider(0.5, 10, value=4.0, step=0.5, label="LLM guidance (visual tokens)")
                            guidance = gr.Slider(
                                0,
                                15,
                                value=self.text2image.config.default_guidance_scale,
                                step=0.5,
                                label="Decoder guidance",
                            )
                            steps = gr.Slider(1, MAX_STEPS, value=25, step=1, label="Denoising steps")
                        generate = gr.Button("Generate", variant="primary")
                    with gr.Column():
                        warning = gr.Markdown()
                        gallery = gr.Gallery(
                            label="Images", format="png", columns=2, buttons=["download", "download_all", "fullscreen"]
                        )
                gr.Examples([[p] for p in self.example_prompts()], inputs=[prompt], label="Example prompts")
                generate.click(
                    self.generate,
                    [prompt, prompt_images, seed, size, height, width, num_images, llm_guidance, guidance, steps],
                    [gallery, warning],
                    api_name="generate",
                    **run,
                )
            with gr.Tab("Caption"):
                with gr.Row():
                    caption_image = gr.File(label="Image", file_types=["image"], type="filepath")
                    with gr.Column():
                        caption_seed = gr.Number(label="Seed", value=0, precision=0)
                        caption_button = gr.Button("Caption", variant="primary")
                        caption = gr.Textbox(label="Caption")
                if scenes:
                    gr.Examples(
                        [[path] for path, _ in scenes], inputs=[caption_image], label="Scenes of the demo world"
                    )
                caption_button.click(self.caption, [caption_image, caption_seed], caption, api_name="caption", **run)
            with gr.Tab("Ask"):
                with gr.Row():
                    ask_image = gr.File(label="Image", file_types=["image"], type="filepath")
                    with gr.Column():
                        question = gr.Textbox(label="Question")
                        ask_seed = gr.Number(label="Seed", value=0, precision=0)
                        ask_button = gr.Button("Ask", variant="primary")
                        answer = gr.Textbox(label="Answer")
                if scenes:
                    gr.Examples(
                        [list(example) for example in scenes],
                        inputs=[ask_image, question],
                        label="Scenes of the demo world",
                    )
                ask_button.click(self.ask, [ask_image, question, ask_seed], answer, api_name="ask", **run)
            with gr.Tab("Reconstruct"):
                with gr.Row():
                    with gr.Column():
                        source = gr.File(label="Image", file_types=["image"], type="filepath")
                        with gr.Row():
                            reconstruct_seed = gr.Number(label="Seed", value=0, precision=0)
                            reconstruct_steps = gr.Slider(1, MAX_STEPS, value=50, step=1, label="Denoising steps")
                        reconstruct_button = gr.Button("Reconstruct", variant="primary")
                    with gr.Column():
                        token_count = gr.Markdown()
                        reconstruction = gr.Image(label="Image -> visual tokens -> image", format="png")
                if scenes:
                    gr.Examples([[path] for path, _ in scenes], inputs=[source], label="Scenes of the demo world")
                reconstruct_button.click(
                    self.reconstruct,
                    [source, reconstruct_seed, reconstruct_steps],
                    [reconstruction, token_count],
                    api_name="reconstruct",
                    **run,
                )
        return blocks.queue(max_size=QUEUE_SIZE)


def serve(args) -> None:
    """`lavit app`: load the model once and serve the app on `args.host:args.port` until interrupted (never
    through a public share link)."""
    text2image = load_pipeline(LavitText2ImagePipeline, args)
    demo_model = args.model is None or Path(args.model).resolve() == default_model_path().resolve()
    with tempfile.TemporaryDirectory(prefix="lavit-app-") as folder:
        app = LavitApp(text2image, examples_folder=Path(folder) if demo_model else None, compile=args.compile)
        app.blocks().launch(server_name=args.host, server_port=args.port, share=False, allowed_paths=[folder])
