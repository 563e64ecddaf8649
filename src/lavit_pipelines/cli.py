"""`lavit`: generate, caption, ask, reconstruct, convert and train from the command line.

Without `--model`, a tiny LaVIT with random weights is built in code (cached after the first run): it
draws noise and is there to try the machinery. Real images need the converted release checkpoint.
Only argparse runs before a command: torch, diffusers and transformers are imported by the command itself.
"""

import argparse
import os
import sys
import tempfile
from pathlib import Path

TINY_NOTICE = (
    "note: no --model given, using the embedded tiny LaVIT with random weights: it draws noise and is for trying "
    "the machinery. For real images convert the release: lavit convert rain1011/LaVIT-7B-v2 lavit-7b-v2"
)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
DTYPES = ("float32", "bfloat16", "float16")


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

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", help="converted LaVIT folder or Hub repo id (default: the embedded tiny model)")
    common.add_argument("--dtype", choices=DTYPES, help="weights dtype (default: float32 on CPU, bfloat16 on GPU)")
    common.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    common.add_argument("--cpu-offload", action="store_true", help="enable_model_cpu_offload(): less GPU memory")
    common.add_argument("--seed", type=int, default=0, help="random seed (the same seed gives the same output)")

    parser = argparse.ArgumentParser(prog="lavit", description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    def add_command(name: str, **kwargs) -> argparse.ArgumentParser:
        return commands.add_parser(name, formatter_class=HelpFormatter, **kwargs)

    gen = add_command("generate", parents=[common], help="text (+ image) prompt -> image")
    gen.add_argument("prompt", nargs="?", help="the prompt; put <image> where each --image goes")
    gen.add_argument("--output", help="output image file (.png, .jpg, .webp); with --num-images N > 1 the files are "
                     "NAME-0.png ... NAME-{N-1}.png")
    gen.add_argument("--prompts", help="text file, one prompt per line (with --output-dir; shards across processes)")
    gen.add_argument("--output-dir", help="folder for --prompts outputs (00000.png, ...)")
    gen.add_argument("--image", nargs="+", default=[], help="prompt images, in the order of the <image> placeholders")
    gen.add_argument("--height", type=positive_int, help="image height, a multiple of 8 (default: the model's native size)")
    gen.add_argument("--width", type=positive_int, help="image width, a multiple of 8 (default: the model's native size)")
    gen.add_argument("--aspect-ratio", help="one of LaVIT's sizes: 1:1, 4:3, 3:2, 16:9, 2:3, 3:4")
    gen.add_argument("--steps", type=positive_int, default=25, help="denoising steps")
    gen.add_argument("--guidance-scale", type=float, default=7.0, help="decoder guidance")
    gen.add_argument("--llm-guidance-scale", type=float, help="visual-token guidance (default 4.0, 5.0 with images)")
    gen.add_argument("--num-images", type=positive_int, default=1, help="images per prompt (numbered NAME-i files when > 1)")
    gen.add_argument("--max-new-tokens", type=positive_int, default=200, help="most visual tokens per image")

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

    conv = add_command("convert", help="release checkpoint (folder or Hub id) -> converted folder")
    conv.add_argument("src", help="release folder or Hub id (rain1011/LaVIT-7B-v2)")
    conv.add_argument("dst", help="folder to write")
    conv.add_argument("--pixel-decoder", choices=("highres", "lowres"), default="highres",
                      help="SDXL (1024²) or SD-1.5 (512²) decoder")
    conv.add_argument("--dtype", choices=DTYPES, help="weights dtype (default: as stored)")
    conv.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")
    conv.add_argument("--safety-checker", action="store_true", help="include the release's SD safety checker")
    add_train_parser(commands)
    return parser


def add_train_parser(commands) -> None:
    """`lavit train STAGE --model BASE --data DATA --output OUT`, one option per `TrainingConfig` field."""
    import dataclasses
    import typing

    from .training.config import STAGES, TrainingConfig

    train = commands.add_parser("train", help="train or fine-tune one LaVIT stage (see docs/training.md)")
    train.add_argument("stage", choices=STAGES)
    for field in dataclasses.fields(TrainingConfig)[1:]:  # after `stage`
        flag = "--" + field.name.replace("_", "-")
        if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            train.add_argument(flag, required=True)
            continue
        default = field.default_factory() if field.default is dataclasses.MISSING else field.default
        if isinstance(default, bool):
            train.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        elif isinstance(default, list):
            train.add_argument(flag, nargs="+", default=default, help=f"(default: {' '.join(default)})")
        else:
            kind = type(default) if default is not None else next(t for t in typing.get_args(field.type) if t is not type(None))
            train.add_argument(flag, type=kind, default=default, help=f"(default: {default})")


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
            raise UsageError(f"--aspect-ratio must be one of {', '.join(ASPECT_RATIO_SIZES)}, got {args.aspect_ratio!r}")
        return ASPECT_RATIO_SIZES[args.aspect_ratio]
    for name, value in (("--height", args.height), ("--width", args.width)):
        if value is not None and value % 8:
            raise UsageError(f"{name} must be a multiple of 8, got {value}")
    return args.height, args.width


def check_common(args) -> None:
    """The options every model command shares: --device, and --seed within what `torch.Generator` takes."""
    check_device(getattr(args, "device", None))
    seed = getattr(args, "seed", None)
    if seed is not None and not -(2**63) <= seed < 2**64:
        raise UsageError(f"--seed must be an integer in [-2**63, 2**64), got {seed}")


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


def check_generate(args) -> None:
    image_size(args)
    check_floats(args, ("guidance_scale", "llm_guidance_scale"))
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
        return
    if not args.prompt:
        raise UsageError("a PROMPT (or --prompts FILE --output-dir DIR) is required")
    check_output(args.output, count=args.num_images)
    for path in args.image:
        check_image_file(path, "--image")
    if args.prompt.count("<image>") != len(args.image):
        raise UsageError(f"the prompt has {args.prompt.count('<image>')} <image> placeholders but {len(args.image)} --image files")


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
    dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    return device, getattr(torch, dtype)


def load_pipeline(pipeline_cls, args, device=None, **kwargs):
    """The pipeline from --model (or the embedded tiny model), on --device in --dtype."""
    if args.model:
        source = args.model
    else:
        from .tiny import tiny_pipeline_path

        print(TINY_NOTICE, file=sys.stderr)
        source = tiny_pipeline_path()
    default_device, dtype = resolve_device_and_dtype(args)
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

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        image.save(tmp, format=PIL.Image.registered_extensions()[path.suffix.lower()])
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def numbered(path: Path, index: int, count: int) -> Path:
    return path if count == 1 else path.with_name(f"{path.stem}-{index}{path.suffix}")


def generation_kwargs(args) -> dict:
    """The pipeline arguments shared by single and batch generation."""
    height, width = image_size(args)
    return dict(
        height=height, width=width, num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
        llm_guidance_scale=args.llm_guidance_scale, max_new_tokens=args.max_new_tokens,
        min_new_tokens=min(20, args.max_new_tokens),
    )


def run_generate(args) -> None:
    import torch

    from .pipelines.text2image import LavitText2ImagePipeline

    if args.prompts:
        return run_generate_many(args)
    pipe = load_pipeline(LavitText2ImagePipeline, args, **({} if args.image else {"visual_tokenizer": None}))
    out = pipe(
        args.prompt, image=args.image or None, num_images_per_prompt=args.num_images,
        generator=torch.Generator().manual_seed(args.seed), **generation_kwargs(args),
    )
    output = Path(args.output)
    for i, image in enumerate(out.images):
        save_image(image, numbered(output, i, len(out.images)))
        print(numbered(output, i, len(out.images)))


def run_generate_many(args) -> None:
    """Prompts of a file split across the processes of `accelerate launch`; image i is `<dir>/<i:05d>.png`,
    seeded with `seed + i` so the result does not depend on the number of processes."""
    import torch
    from accelerate import PartialState

    from .pipelines.text2image import LavitText2ImagePipeline

    state = PartialState()
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


def run_understanding(args) -> None:
    import torch

    from .pipelines.understanding import LavitUnderstandingPipeline

    images = args.image if args.command == "caption" else [args.image]
    for path in images:
        check_image_file(path, "IMAGE")
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
    out = pipe.reconstruct(args.image, num_inference_steps=args.steps, generator=torch.Generator().manual_seed(args.seed))
    save_image(out.images[0], output)
    print(output)


def run_convert(args) -> None:
    from .conversion import convert

    print(convert(args.src, args.dst, args.pixel_decoder, args.dtype, args.overwrite, args.safety_checker))


def run_train(args) -> None:
    from .training import TrainingConfig, train

    settings = {key: value for key, value in vars(args).items() if key != "command"}
    print(train(TrainingConfig(**settings)))


COMMANDS = {
    "generate": run_generate, "caption": run_understanding, "ask": run_understanding,
    "reconstruct": run_reconstruct, "convert": run_convert, "train": run_train,
}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_common(args)
        if args.command == "generate":
            check_generate(args)
        COMMANDS[args.command](args)
    except (UsageError, OSError, ValueError, TypeError, KeyError) as error:  # OSError: files, Hub, network
        print(f"lavit {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lavit {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
