"""`lavit`: generate, caption, ask, reconstruct, convert and train from the command line.

Without `--model`, the embedded demo LaVIT (`lavit_pipelines.default_model_path()`) runs: a small model trained
on the shapes world (coloured circles, squares and triangles on white). Real images need the converted release
checkpoint.
Only argparse runs before a command: torch, diffusers and transformers are imported by the command itself.
"""

import argparse
import os
import sys
import tempfile
from pathlib import Path

from .quantization import QUANTIZATION_SCHEMES, check_quantization

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
DTYPES = ("float32", "bfloat16", "float16")
MAX_PROMPT_CHARS = 10_000
MAX_IMAGE_SIDE = 4096


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except None (the option's help says what happens without it)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


class UsageError(Exception):
    """A bad argument: reported in one line, exit code 2, nothing written."""


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    loading = argparse.ArgumentParser(add_help=False)
    loading.add_argument(
        "--model", help="converted LaVIT folder or Hub repo id (default: the embedded shapes-world demo model)"
    )
    loading.add_argument(
        "--dtype", choices=DTYPES, help="weights dtype (default: float32 on CPU, bfloat16 on GPU or with --quantize)"
    )
    loading.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    loading.add_argument("--cpu-offload", action="store_true", help="enable_model_cpu_offload(): less GPU memory")
    loading.add_argument(
        "--quantize",
        choices=QUANTIZATION_SCHEMES,
        help="load the language model and the UNet quantized, weight-only: int8 (torchao; CPU and GPU), "
        "int4 (torchao; GPU), nf4 (bitsandbytes; GPU); default dtype then bfloat16 (docs/memory.md)",
    )
    common = argparse.ArgumentParser(add_help=False, parents=[loading])
    common.add_argument("--seed", type=int, default=0, help="random seed (the same seed gives the same output)")

    parser = argparse.ArgumentParser(prog="lavit", description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    def add_command(name: str, **kwargs) -> argparse.ArgumentParser:
        return commands.add_parser(name, formatter_class=HelpFormatter, **kwargs)

    gen = add_command("generate", parents=[common], help="text (+ image) prompt -> image")
    gen.add_argument("prompt", nargs="?", help="the prompt; put <image> where each --image goes")
    gen.add_argument(
        "--output",
        help="output image file (.png, .jpg, .webp); with --num-images N > 1 the files are "
        "NAME-0.png ... NAME-{N-1}.png",
    )
    gen.add_argument("--prompts", help="text file, one prompt per line (with --output-dir; shards across processes)")
    gen.add_argument("--output-dir", help="folder for --prompts outputs (00000.png, ...)")
    gen.add_argument("--image", nargs="+", default=[], help="prompt images, in the order of the <image> placeholders")
    gen.add_argument(
        "--height", type=positive_int, help="image height, a multiple of 8 (default: the model's native size)"
    )
    gen.add_argument(
        "--width", type=positive_int, help="image width, a multiple of 8 (default: the model's native size)"
    )
    gen.add_argument("--aspect-ratio", help="one of LaVIT's sizes: 1:1, 4:3, 3:2, 16:9, 2:3, 3:4")
    gen.add_argument("--steps", type=positive_int, default=25, help="denoising steps")
    gen.add_argument(
        "--guidance-scale",
        type=float,
        help="decoder guidance (default: the model's: 7.0 for LaVIT, 2.5 for the demo model)",
    )
    gen.add_argument("--llm-guidance-scale", type=float, help="visual-token guidance (default 4.0, 5.0 with images)")
    gen.add_argument(
        "--num-images", type=positive_int, default=1, help="images per prompt (numbered NAME-i files when > 1)"
    )
    gen.add_argument("--max-new-tokens", type=positive_int, help="most visual tokens per image (default: the model's)")

    cap = add_command("caption", parents=[common], help="images -> one caption per line, in order")
    cap.add_argument("image", nargs="+", help="image files, captioned in one batch")
    ask = add_command("ask", parents=[common], help="image + question -> answer")
    ask.add_argument("image", help="image file")
    ask.add_argument("question")
    for sub in (gen, cap, ask):
        sub.add_argument("--lora", help="LoRA folder or file to apply (e.g. the output of `lavit train ... --lora`)")
    rec = add_command("reconstruct", parents=[common], help="image -> visual tokens -> image")
    rec.add_argument("image", help="image file")
    rec.add_argument("--output", required=True, help="output image file (.png, .jpg, .webp)")
    rec.add_argument("--steps", type=positive_int, default=50, help="denoising steps")

    app = add_command("app", parents=[loading], help="web app (Gradio) on one loaded model; needs the `app` extra")
    app.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    app.add_argument("--port", type=positive_int, default=7860, help="port to listen on")
    for sub in (gen, app):
        sub.add_argument(
            "--compile",
            action="store_true",
            help="visual tokens with a static KV cache and a torch.compile'd decoding step: the same tokens, faster "
            "after a first image that compiles (on the CPU, what makes --quantize int8 pay; docs/memory.md)",
        )

    conv = add_command("convert", help="release checkpoint (folder or Hub id) -> converted folder")
    conv.add_argument("src", help="release folder or Hub id (rain1011/LaVIT-7B-v2)")
    conv.add_argument("dst", help="folder to write")
    conv.add_argument(
        "--pixel-decoder",
        choices=("highres", "lowres"),
        default="highres",
        help="SDXL (1024²) or SD-1.5 (512²) decoder",
    )
    conv.add_argument("--dtype", choices=DTYPES, help="weights dtype (default: as stored)")
    conv.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")
    conv.add_argument("--safety-checker", action="store_true", help="include the release's SD safety checker")
    add_train_parser(commands)
    add_evaluate_parser(commands)
    return parser


def add_dataclass_options(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    """One option per field of the dataclass `cls` (required where it has no default), with the field's help text."""
    import dataclasses
    import typing

    for field in dataclasses.fields(cls):
        if field.name in skip:
            continue
        flag, help = "--" + field.name.replace("_", "-"), field.metadata.get("help", " ")
        if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            parser.add_argument(flag, required=True, help=help)
            continue
        default = field.default_factory() if field.default is dataclasses.MISSING else field.default
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help)
        elif isinstance(default, list):
            parser.add_argument(flag, nargs="+", default=default, help=help)
        else:
            kind = (
                type(default)
                if default is not None
                else next(t for t in typing.get_args(field.type) if t is not type(None))
            )
            parser.add_argument(flag, type=kind, default=default, help=help)


def add_train_parser(commands) -> None:
    """`lavit train STAGE --model BASE --data DATA --output OUT`, one option per `TrainingConfig` field; and
    `lavit train subject --model BASE --images DIR --token WORD --class-word WORD --output OUT` (`SubjectConfig`)."""
    from .training.config import STAGES, TrainingConfig
    from .training.subject import SubjectConfig

    train = commands.add_parser(
        "train", formatter_class=HelpFormatter, help="train or fine-tune one LaVIT stage (see docs/training.md)"
    )
    stages = train.add_subparsers(dest="stage", required=True, metavar="{" + ",".join((*STAGES, "subject")) + "}")
    for stage in STAGES:
        add_dataclass_options(
            stages.add_parser(stage, formatter_class=HelpFormatter, help=f"train the {stage} stage"),
            TrainingConfig,
            skip=("stage",),
        )
    subject = stages.add_parser(
        "subject",
        formatter_class=HelpFormatter,
        help="teach the model a new word from a few images (see docs/subject.md)",
    )
    add_dataclass_options(subject, SubjectConfig)


def add_evaluate_parser(commands) -> None:
    """`lavit evaluate {caption,vqa,t2i,shapes}`: the benchmarks of `lavit_pipelines.evaluation`."""
    evaluate = commands.add_parser(
        "evaluate",
        formatter_class=HelpFormatter,
        help="LaVIT's zero-shot benchmarks and the shapes world (accelerate launch for many processes)",
    )
    tasks = evaluate.add_subparsers(dest="task", required=True)
    model = argparse.ArgumentParser(add_help=False)
    model.add_argument(
        "--model",
        help="the converted LaVIT folder (or Hub repo id) to evaluate (default: the embedded shapes-world demo model)",
    )
    model.add_argument("--dtype", choices=DTYPES, help="default: float32 on CPU, bfloat16 on GPU")
    model.add_argument("--device", help="default: cuda if available; under accelerate launch, each process' device")
    model.add_argument("--seed", type=int, default=0, help="base seed of the batches (see docs/evaluation.md)")
    data = argparse.ArgumentParser(add_help=False, parents=[model])
    data.add_argument("--annotations", required=True, help="annotation JSON (see docs/evaluation.md)")
    data.add_argument("--images", default=".", help="folder the annotations' image paths are relative to")
    data.add_argument(
        "--output", required=True, help="results folder: predictions.json, metrics.json (a rerun resumes)"
    )
    data.add_argument("--limit", type=positive_int, help="evaluate only the first N entries")

    cap = tasks.add_parser(
        "caption",
        formatter_class=HelpFormatter,
        parents=[data],
        help="captioning: COCO Karpathy test, NoCaps, Flickr30K",
    )
    cap.add_argument("--ground-truth", required=True, help="COCO-format caption file")
    cap.add_argument("--batch-size", type=positive_int, default=8)
    cap.add_argument(
        "--metrics",
        nargs="+",
        default=["Bleu", "METEOR", "ROUGE_L", "CIDEr", "SPICE"],
        choices=("Bleu", "METEOR", "ROUGE_L", "CIDEr", "SPICE"),
        help="pycocoevalcap metrics",
    )
    vqa = tasks.add_parser("vqa", formatter_class=HelpFormatter, parents=[data], help="VQA: VQAv2, OK-VQA, VizWiz, GQA")
    vqa.add_argument("--dataset", choices=("vqav2", "okvqa", "vizwiz", "gqa"), default="vqav2")
    vqa.add_argument(
        "--ground-truth", help="official VQA annotations, when --annotations is an official questions file"
    )
    vqa.add_argument(
        "--no-lemmatize", action="store_true", help="skip the original's spaCy lemmatisation (a deviation)"
    )
    vqa.add_argument("--batch-size", type=positive_int, default=8)
    t2i = tasks.add_parser(
        "t2i",
        formatter_class=HelpFormatter,
        parents=[data],
        help="text-to-image: FID (and CLIP score) on COCO captions",
    )
    t2i.add_argument("--clip", help="local transformers CLIP folder (ViT-L/14 in the paper) to pick the best image")
    t2i.add_argument("--inception-weights", help="FID Inception weights file (torch-fidelity's), needs torch-fidelity")
    t2i.add_argument("--no-fid", action="store_true", help="generate (and CLIP-score) only")
    t2i.add_argument("--num-images", type=positive_int, default=4, help="images per caption, re-ranked by --clip")
    t2i.add_argument("--resolution", type=positive_int, default=512, help="real images are resized to this for FID")
    t2i.add_argument("--steps", type=positive_int, default=50, help="denoising steps")
    t2i.add_argument("--max-new-tokens", type=positive_int, help="most visual tokens per image (default: the model's)")
    t2i.add_argument("--batch-size", type=positive_int, default=1, help="captions per batch")

    shapes = tasks.add_parser(
        "shapes",
        formatter_class=HelpFormatter,
        parents=[model],
        help="generation, caption and VQA accuracy on the shapes world",
    )
    shapes.add_argument("--output", required=True, help="folder for the images, predictions.json and metrics.json")
    shapes.add_argument(
        "--num-prompts", type=positive_int, default=60, help="generation prompts (half of them two-object)"
    )
    shapes.add_argument("--num-scenes", type=positive_int, default=60, help="held-out scenes to caption and question")
    shapes.add_argument("--batch-size", type=positive_int, default=8)
    shapes.add_argument("--steps", type=positive_int, default=25, help="denoising steps of the generation")
    shapes.add_argument(
        "--max-new-tokens", type=positive_int, help="most visual tokens per image (default: the model's)"
    )


# ------------------------------------------------------------------ argument checks (before loading anything)


def check_writable_folder(folder: Path, name: str) -> None:
    """UsageError unless a file can be created in `folder` (tried, then removed: permissions alone do not tell)."""
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".lavit-write-test-"):
            pass
    except OSError as error:
        raise UsageError(f"{name}: cannot write in folder {str(folder)!r} ({error.strerror or error})") from error


def check_output(path: str | None, name: str = "--output", count: int = 1) -> Path:
    """The output image path (and its `count` numbered siblings): a known image suffix, in an existing writable
    folder, not an existing folder itself."""
    if not path:
        raise UsageError(f"{name} is required")
    out = Path(path)
    if out.suffix.lower() not in IMAGE_SUFFIXES:
        raise UsageError(f"{name} must end in one of {sorted(IMAGE_SUFFIXES)}, got {path!r}")
    if not out.parent.is_dir():
        raise UsageError(f"{name}: folder {str(out.parent)!r} does not exist")
    for target in {numbered(out, i, count) for i in range(count)}:
        if target.is_dir():
            raise UsageError(f"{name}: {str(target)!r} is a folder, expected an image file path")
    check_writable_folder(out.parent, name)
    return out


def check_output_dir(path: str, name: str = "--output-dir") -> None:
    """An existing writable folder, or a path whose nearest existing parent is a writable folder."""
    folder = Path(path).absolute()
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise UsageError(f"{name}: {str(existing)!r} exists and is not a folder")
    check_writable_folder(existing, name)


def check_image_file(path: str, name: str) -> str:
    """An image file PIL can decode (not truncated, within its decompression-bomb limit, not empty)."""
    from .image_processor import open_image_file

    if not os.path.isfile(path):
        raise UsageError(f"{name}: no such file {path!r}")
    try:
        open_image_file(path, name).close()
    except ValueError as error:
        raise UsageError(str(error)) from error
    return path


def check_device(device: str | None) -> None:
    """UsageError unless `device` names a torch device that this machine has (cuda:N within the GPU count)."""
    if device is None:
        return
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError) as error:
        raise UsageError(f"--device must be a torch device such as cpu, cuda or cuda:1, got {device!r}") from error
    if parsed.type == "cpu":
        return
    backend = getattr(torch, parsed.type, None) if parsed.type != "mps" else torch.backends.mps
    if not getattr(backend, "is_available", lambda: False)():
        raise UsageError(f"--device {device}: no {parsed.type} device is available on this machine")
    count = getattr(backend, "device_count", lambda: 1)()
    if parsed.index is not None and parsed.index >= count:
        raise UsageError(f"--device {device}: this machine has {count} {parsed.type} device(s)")


def image_size(args) -> tuple[int | None, int | None]:
    """--height/--width or --aspect-ratio -> (height, width), None meaning the model's default."""
    from .pipelines.text2image import ASPECT_RATIO_SIZES

    if args.aspect_ratio:
        if args.height or args.width:
            raise UsageError("give either --aspect-ratio or --height/--width, not both")
        if args.aspect_ratio not in ASPECT_RATIO_SIZES:
            raise UsageError(
                f"--aspect-ratio must be one of {', '.join(ASPECT_RATIO_SIZES)}, got {args.aspect_ratio!r}"
            )
        return ASPECT_RATIO_SIZES[args.aspect_ratio]
    for name, value in (("--height", args.height), ("--width", args.width)):
        if value is not None and (value % 8 or not 0 < value <= MAX_IMAGE_SIDE):
            raise UsageError(f"{name} must be a multiple of 8 in [8, {MAX_IMAGE_SIDE}], got {value}")
    return args.height, args.width


def check_common(args) -> None:
    """The options every model command shares: --device, and --seed within what `torch.Generator` takes."""
    check_device(getattr(args, "device", None))
    seed = getattr(args, "seed", None)
    if seed is not None and not -(2**63) <= seed < 2**64:
        raise UsageError(f"--seed must be an integer in [-2**63, 2**64), got {seed}")
    if getattr(args, "quantize", None):
        check_quantization(args.quantize, resolve_device_and_dtype(args)[0])


def check_floats(args, names: tuple[str, ...]) -> None:
    """The pipelines' own float checks (finite, in range), reported with the option's name."""
    from .pipelines.validation import check_float

    for name in names:
        value = getattr(args, name)
        if value is not None:
            try:
                check_float(name, value, label="--" + name.replace("_", "-"))
            except ValueError as error:
                raise UsageError(str(error).rstrip(".")) from error


def check_generation_settings(args) -> None:
    """--height/--width/--aspect-ratio and the guidance scales."""
    image_size(args)
    check_floats(args, ("guidance_scale", "llm_guidance_scale"))


def check_text(text: str, name: str) -> None:
    if len(text) > MAX_PROMPT_CHARS:
        raise UsageError(f"{name} must be at most {MAX_PROMPT_CHARS} characters, got {len(text)}")


def check_prompt(prompt: str, images: list[str]) -> None:
    """The prompt's length, and one decodable --image file per `<image>` placeholder."""
    check_text(prompt, "PROMPT")
    for path in images:
        check_image_file(path, "--image")
    if prompt.count("<image>") != len(images):
        raise UsageError(
            f"the prompt has {prompt.count('<image>')} <image> placeholders but {len(images)} --image files"
        )


def check_generate(args) -> None:
    """The paths first (before torch is imported: a wrong --output costs nothing), then sizes and floats."""
    if args.prompts:
        if args.prompt or args.output or args.image:
            raise UsageError("--prompts takes no PROMPT, --output or --image; use --output-dir")
        if not args.output_dir:
            raise UsageError("--prompts needs --output-dir")
        if not os.path.isfile(args.prompts):
            raise UsageError(f"--prompts: no such file {args.prompts!r}")
        if not read_prompts(args.prompts):
            raise UsageError(f"--prompts: {args.prompts!r} holds no prompt")
        check_output_dir(args.output_dir)
    else:
        if not args.prompt:
            raise UsageError("a PROMPT (or --prompts FILE --output-dir DIR) is required")
        check_output(args.output, count=args.num_images)
        check_prompt(args.prompt, args.image)
    check_generation_settings(args)


def read_prompts(path: str) -> list[str]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise UsageError(f"--prompts: {path!r} is not UTF-8 text ({error.reason} at byte {error.start})") from error
    return [line.strip() for line in text.splitlines() if line.strip()]


# ------------------------------------------------------------------ running


def resolve_device_and_dtype(args):
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bfloat16" if device.startswith("cuda") or getattr(args, "quantize", None) else "float32")
    return device, getattr(torch, dtype)


def model_source(args) -> str:
    """--model, or the embedded demo model."""
    from .demo import default_model_path

    return args.model or str(default_model_path())


def load_pipeline(pipeline_cls, args, device=None, **kwargs):
    """The pipeline from --model (or the embedded demo model), on --device in --dtype, --quantize'd."""
    from .quantization import pipeline_quantization_config

    source = model_source(args)
    default_device, dtype = resolve_device_and_dtype(args)
    if getattr(args, "lora", None):
        pipeline_cls.checked_lora_state_dict(args.lora)  # before any model loads
    if getattr(args, "quantize", None):
        kwargs["quantization_config"] = pipeline_quantization_config(
            args.quantize, pipeline_cls.component_names(), device or default_device
        )
    pipe = pipeline_cls.from_pretrained(source, dtype=dtype, **kwargs)
    if getattr(args, "lora", None):
        pipe.load_lora_weights(args.lora)
    if args.cpu_offload:
        pipe.enable_model_cpu_offload(device=device or default_device)
    else:
        pipe.to(device or default_device)
    return pipe


def save_image(image, path: Path) -> None:
    """Write through a temporary file in the same folder, so a failure leaves no partial file."""
    import PIL.Image

    from .staging import write_atomically

    write_atomically(path, lambda tmp: image.save(tmp, format=PIL.Image.registered_extensions()[path.suffix.lower()]))


def numbered(path: Path, index: int, count: int) -> Path:
    return path if count == 1 else path.with_name(f"{path.stem}-{index}{path.suffix}")


def generation_kwargs(args) -> dict:
    """The pipeline arguments shared by single and batch generation."""
    height, width = image_size(args)
    return dict(
        height=height,
        width=width,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        llm_guidance_scale=args.llm_guidance_scale,
        max_new_tokens=args.max_new_tokens,
        llm_decoding_kwargs={"cache_implementation": "static", "compile": True} if args.compile else None,
    )


def run_generate(args) -> None:
    import torch

    from .pipelines.text2image import LavitText2ImagePipeline
    from .tokenization import unseen_words_warning

    if args.prompts:
        return run_generate_many(args)
    pipe = load_pipeline(LavitText2ImagePipeline, args, **({} if args.image else {"visual_tokenizer": None}))
    warning = unseen_words_warning(pipe.tokenizer, args.prompt)
    if warning:
        print(f"lavit generate: warning: {warning}", file=sys.stderr)
    out = pipe(
        args.prompt,
        image=args.image or None,
        num_images_per_prompt=args.num_images,
        generator=torch.Generator().manual_seed(args.seed),
        **generation_kwargs(args),
    )
    output = Path(args.output)
    for i, image in enumerate(out.images):
        save_image(image, numbered(output, i, len(out.images)))
        print(numbered(output, i, len(out.images)))


def run_generate_many(args) -> None:
    """Prompts of a file split across the processes of `accelerate launch`; image i is `<dir>/<i:05d>.png`,
    seeded with `seed + i` so the result does not depend on the number of processes."""
    import torch

    from .distributed import leave_together, process_state
    from .pipelines.text2image import LavitText2ImagePipeline

    state = process_state()
    prompts = list(enumerate(read_prompts(args.prompts)))
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline(LavitText2ImagePipeline, args, device=args.device or str(state.device))
    pipe.set_progress_bar_config(disable=not state.is_local_main_process)
    with state.split_between_processes(prompts) as mine:
        for index, prompt in mine:
            generator = torch.Generator().manual_seed(args.seed + index)
            image = pipe(prompt, generator=generator, **generation_kwargs(args)).images[0]
            save_image(image, out_dir / f"{index:05d}.png")
            print(out_dir / f"{index:05d}.png")
    leave_together(state)


def run_understanding(args) -> None:
    import torch

    from .pipelines.understanding import (
        ANSWER_DEFAULTS,
        VQA_PROMPT,
        LavitUnderstandingPipeline,
    )

    images = args.image if args.command == "caption" else [args.image]
    for path in images:
        check_image_file(path, "IMAGE")
    if args.command == "ask":  # a question too long for the context is refused before the models load
        LavitUnderstandingPipeline.check_prompt_fits(
            model_source(args), VQA_PROMPT.format(args.question), ANSWER_DEFAULTS["max_new_tokens"]
        )
    pipe = load_pipeline(LavitUnderstandingPipeline, args)
    generator = torch.Generator().manual_seed(args.seed)
    if args.command == "caption":
        print("\n".join(pipe.caption(images, generator=generator)))
    else:
        print(pipe.answer(args.image, args.question, generator=generator)[0])


def run_reconstruct(args) -> None:
    import torch

    from .pipelines.text2image import LavitText2ImagePipeline

    check_image_file(args.image, "IMAGE")
    output = check_output(args.output)
    pipe = load_pipeline(LavitText2ImagePipeline, args)
    out = pipe.reconstruct(
        args.image, num_inference_steps=args.steps, generator=torch.Generator().manual_seed(args.seed)
    )
    save_image(out.images[0], output)
    print(output)


def run_app(args) -> None:
    try:
        from .app import serve
    except ImportError as error:
        raise ImportError(f"{error.msg}; install the app extra: pip install 'lavit-pipelines[app]'") from error
    serve(args)


def run_evaluate(args) -> None:
    """One evaluation; under `accelerate launch` each process takes its share and the main one prints the metrics."""
    import json

    from .distributed import leave_together, process_state

    args.model = model_source(args)
    state = process_state()
    device, dtype = resolve_device_and_dtype(args)
    device = args.device or (str(state.device) if state.num_processes > 1 else device)
    metrics = EVALUATIONS[args.task](args, device, dtype)
    if state.is_main_process:
        print(json.dumps(metrics, indent=1))
    leave_together(state)


def evaluation_generation_kwargs(args) -> dict:
    """--steps, and --max-new-tokens when given (min_new_tokens: LaVIT's 20, or fewer when the maximum is lower);
    without it the protocol's or the model's limits hold."""
    kwargs = {"num_inference_steps": args.steps}
    if args.max_new_tokens is not None:
        kwargs.update(max_new_tokens=args.max_new_tokens, min_new_tokens=min(20, args.max_new_tokens))
    return kwargs


def evaluate_caption(args, device, dtype):
    from .evaluation.captioning import evaluate_captioning

    return evaluate_captioning(
        args.model,
        annotations=args.annotations,
        images=args.images,
        ground_truth=args.ground_truth,
        output=args.output,
        batch_size=args.batch_size,
        seed=args.seed,
        device=device,
        dtype=dtype,
        limit=args.limit,
        metrics=tuple(args.metrics),
    )


def evaluate_vqa(args, device, dtype):
    from .evaluation.vqa import evaluate_vqa as run

    return run(
        args.model,
        annotations=args.annotations,
        images=args.images,
        output=args.output,
        dataset=args.dataset,
        ground_truth=args.ground_truth,
        lemmatize=not args.no_lemmatize,
        batch_size=args.batch_size,
        seed=args.seed,
        device=device,
        dtype=dtype,
        limit=args.limit,
    )


def evaluate_t2i(args, device, dtype):
    from .evaluation.metrics import INCEPTION_HINT
    from .evaluation.text_to_image import evaluate_text_to_image

    if not (args.inception_weights or args.no_fid):
        raise UsageError(f"{INCEPTION_HINT}: pass --inception-weights FILE, or --no-fid")
    return evaluate_text_to_image(
        args.model,
        annotations=args.annotations,
        output=args.output,
        images=args.images,
        clip=args.clip,
        fid_feature=None if args.no_fid else args.inception_weights,
        num_images=args.num_images,
        resolution=args.resolution,
        batch_size=args.batch_size,
        seed=args.seed,
        device=device,
        dtype=dtype,
        limit=args.limit,
        generation_kwargs=evaluation_generation_kwargs(args),
    )


def evaluate_shapes(args, device, dtype):
    from .evaluation.shapes import evaluate_shapes as run

    return run(
        args.model,
        output=args.output,
        num_prompts=args.num_prompts,
        num_scenes=args.num_scenes,
        seed=args.seed,
        batch_size=args.batch_size,
        device=device,
        dtype=dtype,
        generation_kwargs=evaluation_generation_kwargs(args),
    )


EVALUATIONS = {"caption": evaluate_caption, "vqa": evaluate_vqa, "t2i": evaluate_t2i, "shapes": evaluate_shapes}


def run_convert(args) -> None:
    from .conversion import convert

    print(convert(args.src, args.dst, args.pixel_decoder, args.dtype, args.overwrite, args.safety_checker))


def run_train(args) -> None:
    settings = {key: value for key, value in vars(args).items() if key != "command"}
    if args.stage == "subject":
        from .training.subject import SubjectConfig, train_subject

        del settings["stage"]
        print(train_subject(SubjectConfig(**settings)))
        return
    from .training import TrainingConfig, train

    print(train(TrainingConfig(**settings)))


COMMANDS = {
    "generate": run_generate,
    "caption": run_understanding,
    "ask": run_understanding,
    "reconstruct": run_reconstruct,
    "app": run_app,
    "convert": run_convert,
    "train": run_train,
    "evaluate": run_evaluate,
}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_common(args)
        if args.command == "generate":
            check_generate(args)
        COMMANDS[args.command](args)
    except (UsageError, OSError, ValueError, TypeError, KeyError, ImportError) as error:  # OSError: files, Hub, network
        print(f"lavit {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lavit {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
