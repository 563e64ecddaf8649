"""`lavit`: generate, caption, ask, reconstruct and convert from the command line.

Without `--model`, the embedded demo LaVIT (`lavit_pipelines.default_model_path()`) runs: a small model trained
on the shapes world (coloured circles, squares and triangles on white). Real images need the converted release
checkpoint.
"""

import argparse
import os
import sys
from pathlib import Path

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
DTYPES = ("float32", "bfloat16", "float16")


class UsageError(Exception):
    """A bad argument: reported in one line, exit code 2, nothing written."""


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", help="converted LaVIT folder or Hub repo id (default: the embedded shapes-world demo model)")
    common.add_argument("--dtype", choices=DTYPES, help="weights dtype (default: float32 on CPU, bfloat16 on GPU)")
    common.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    common.add_argument("--cpu-offload", action="store_true", help="enable_model_cpu_offload(): less GPU memory")
    common.add_argument("--seed", type=int, default=0, help="random seed (the same seed gives the same output)")

    parser = argparse.ArgumentParser(prog="lavit", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", parents=[common], help="text (+ image) prompt -> image")
    gen.add_argument("prompt", nargs="?", help="the prompt; put <image> where each --image goes")
    gen.add_argument("--output", help="output image file (.png, .jpg, .webp)")
    gen.add_argument("--prompts", help="text file, one prompt per line (with --output-dir; shards across processes)")
    gen.add_argument("--output-dir", help="folder for --prompts outputs (00000.png, ...)")
    gen.add_argument("--image", nargs="+", default=[], help="prompt images, in the order of the <image> placeholders")
    gen.add_argument("--height", type=positive_int)
    gen.add_argument("--width", type=positive_int)
    gen.add_argument("--aspect-ratio", help="one of LaVIT's sizes: 1:1, 4:3, 3:2, 16:9, 2:3, 3:4")
    gen.add_argument("--steps", type=positive_int, default=25, help="denoising steps")
    gen.add_argument("--guidance-scale", type=float, default=7.0, help="decoder guidance")
    gen.add_argument("--llm-guidance-scale", type=float, help="visual-token guidance (default 4.0, 5.0 with images)")
    gen.add_argument("--num-images", type=positive_int, default=1, help="images per prompt")
    gen.add_argument("--max-new-tokens", type=positive_int, help="most visual tokens per image (default: the model's)")

    cap = commands.add_parser("caption", parents=[common], help="image -> caption")
    cap.add_argument("image")
    ask = commands.add_parser("ask", parents=[common], help="image + question -> answer")
    ask.add_argument("image")
    ask.add_argument("question")
    rec = commands.add_parser("reconstruct", parents=[common], help="image -> visual tokens -> image")
    rec.add_argument("image")
    rec.add_argument("--output", required=True)
    rec.add_argument("--steps", type=positive_int, default=50)

    conv = commands.add_parser("convert", help="release checkpoint (folder or Hub id) -> converted folder")
    conv.add_argument("src")
    conv.add_argument("dst")
    conv.add_argument("--pixel-decoder", choices=("highres", "lowres"), default="highres")
    conv.add_argument("--dtype", choices=DTYPES)
    conv.add_argument("--overwrite", action="store_true")
    conv.add_argument("--safety-checker", action="store_true", help="include the release's SD safety checker")
    add_evaluate_parser(commands, common)
    return parser


def add_evaluate_parser(commands, common: argparse.ArgumentParser) -> None:
    """`lavit evaluate {caption,vqa,t2i,shapes}`: the benchmarks of `lavit_pipelines.evaluation`."""
    evaluate = commands.add_parser("evaluate", help="LaVIT's zero-shot benchmarks and the shapes world (accelerate launch for many processes)")
    tasks = evaluate.add_subparsers(dest="task", required=True)
    data = argparse.ArgumentParser(add_help=False, parents=[common])
    data.add_argument("--annotations", required=True, help="annotation JSON (see docs/evaluation.md)")
    data.add_argument("--images", default=".", help="folder the annotations' image paths are relative to (default: .)")
    data.add_argument("--output", required=True, help="results folder: predictions.json, metrics.json (a rerun resumes)")
    data.add_argument("--limit", type=positive_int, help="evaluate only the first N entries")

    cap = tasks.add_parser("caption", parents=[data], help="captioning: COCO Karpathy test, NoCaps, Flickr30K")
    cap.add_argument("--ground-truth", required=True, help="COCO-format caption file")
    cap.add_argument("--batch-size", type=positive_int, default=8)
    cap.add_argument("--metrics", nargs="+", default=["Bleu", "METEOR", "ROUGE_L", "CIDEr", "SPICE"],
                     choices=("Bleu", "METEOR", "ROUGE_L", "CIDEr", "SPICE"), help="pycocoevalcap metrics (default: all)")
    vqa = tasks.add_parser("vqa", parents=[data], help="VQA: VQAv2, OK-VQA, VizWiz, GQA")
    vqa.add_argument("--dataset", choices=("vqav2", "okvqa", "vizwiz", "gqa"), default="vqav2")
    vqa.add_argument("--ground-truth", help="official VQA annotations, when --annotations is an official questions file")
    vqa.add_argument("--no-lemmatize", action="store_true", help="skip the original's spaCy lemmatisation (a deviation)")
    vqa.add_argument("--batch-size", type=positive_int, default=8)
    t2i = tasks.add_parser("t2i", parents=[data], help="text-to-image: FID (and CLIP score) on COCO captions")
    t2i.add_argument("--clip", help="local transformers CLIP folder (ViT-L/14 in the paper) to pick the best image")
    t2i.add_argument("--inception-weights", help="FID Inception weights file (torch-fidelity's), needs torch-fidelity")
    t2i.add_argument("--no-fid", action="store_true", help="generate (and CLIP-score) only")
    t2i.add_argument("--num-images", type=positive_int, default=4, help="images per caption, re-ranked by --clip")
    t2i.add_argument("--resolution", type=positive_int, default=512, help="real images are resized to this for FID")
    t2i.add_argument("--steps", type=positive_int, default=50, help="denoising steps")
    t2i.add_argument("--max-new-tokens", type=positive_int, default=200, help="most visual tokens per image")
    t2i.add_argument("--batch-size", type=positive_int, default=1, help="captions per batch")

    shapes = tasks.add_parser("shapes", parents=[common], help="generation, caption and VQA accuracy on the shapes world")
    shapes.add_argument("--output", required=True, help="folder for the images, predictions.json and metrics.json")
    shapes.add_argument("--num-prompts", type=positive_int, default=60, help="generation prompts (half of them two-object)")
    shapes.add_argument("--num-scenes", type=positive_int, default=60, help="held-out scenes to caption and question")
    shapes.add_argument("--batch-size", type=positive_int, default=8)
    shapes.add_argument("--steps", type=positive_int, default=25, help="denoising steps of the generation")
    shapes.add_argument("--max-new-tokens", type=positive_int, default=200, help="most visual tokens per image")


# ------------------------------------------------------------------ argument checks (before loading anything)


def check_output(path: str | None, name: str = "--output") -> Path:
    if not path:
        raise UsageError(f"{name} is required")
    out = Path(path)
    if out.suffix.lower() not in IMAGE_SUFFIXES:
        raise UsageError(f"{name} must end in one of {sorted(IMAGE_SUFFIXES)}, got {path!r}")
    if not out.parent.is_dir():
        raise UsageError(f"{name}: folder {str(out.parent)!r} does not exist")
    return out


def check_image_file(path: str, name: str) -> str:
    if not os.path.isfile(path):
        raise UsageError(f"{name}: no such file {path!r}")
    return path


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


def check_generate(args) -> None:
    image_size(args)
    if args.guidance_scale < 0:
        raise UsageError(f"--guidance-scale must be non-negative, got {args.guidance_scale}")
    if args.llm_guidance_scale is not None and args.llm_guidance_scale <= 0:
        raise UsageError(f"--llm-guidance-scale must be positive, got {args.llm_guidance_scale}")
    if args.prompts:
        if args.prompt or args.output or args.image:
            raise UsageError("--prompts takes no PROMPT, --output or --image; use --output-dir")
        if not args.output_dir:
            raise UsageError("--prompts needs --output-dir")
        if not os.path.isfile(args.prompts):
            raise UsageError(f"--prompts: no such file {args.prompts!r}")
        if not read_prompts(args.prompts):
            raise UsageError(f"--prompts: {args.prompts!r} holds no prompt")
        return
    if not args.prompt:
        raise UsageError("a PROMPT (or --prompts FILE --output-dir DIR) is required")
    check_output(args.output)
    for path in args.image:
        check_image_file(path, "--image")
    if args.prompt.count("<image>") != len(args.image):
        raise UsageError(f"the prompt has {args.prompt.count('<image>')} <image> placeholders but {len(args.image)} --image files")


def read_prompts(path: str) -> list[str]:
    return [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


# ------------------------------------------------------------------ running


def resolve_device_and_dtype(args):
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    return device, getattr(torch, dtype)


def load_pipeline(pipeline_cls, args, device=None, **kwargs):
    """The pipeline from --model (or the embedded demo model), on --device in --dtype."""
    from .demo import default_model_path

    source = args.model or default_model_path()
    default_device, dtype = resolve_device_and_dtype(args)
    pipe = pipeline_cls.from_pretrained(source, dtype=dtype, **kwargs)
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
    )


def run_generate(args) -> None:
    import torch

    from .pipelines.text2image import LavitText2ImagePipeline

    if args.prompts:
        return run_generate_many(args)
    pipe = load_pipeline(LavitText2ImagePipeline, args, load_visual_tokenizer=bool(args.image))
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

    check_image_file(args.image, "IMAGE")
    pipe = load_pipeline(LavitUnderstandingPipeline, args)
    generator = torch.Generator().manual_seed(args.seed)
    if args.command == "caption":
        print(pipe.caption(args.image, generator=generator)[0])
    else:
        print(pipe.answer(args.image, args.question, generator=generator)[0])


def run_reconstruct(args) -> None:
    import torch

    from .pipelines.text2image import LavitText2ImagePipeline

    check_image_file(args.image, "IMAGE")
    output = check_output(args.output)
    pipe = load_pipeline(LavitText2ImagePipeline, args, load_visual_tokenizer=True)
    out = pipe.reconstruct(args.image, num_inference_steps=args.steps, generator=torch.Generator().manual_seed(args.seed))
    save_image(out.images[0], output)
    print(output)


def run_evaluate(args) -> None:
    """One evaluation; under `accelerate launch` each process takes its share and the main one prints the metrics."""
    import json

    from .evaluation.runner import process_state

    if not args.model:
        raise UsageError("--model is required: a converted LaVIT folder or Hub repo id")
    state = process_state()
    device, dtype = resolve_device_and_dtype(args)
    device = args.device or (str(state.device) if state.num_processes > 1 else device)
    metrics = EVALUATIONS[args.task](args, device, dtype)
    if state.is_main_process:
        print(json.dumps(metrics, indent=1))


def evaluation_generation_kwargs(args) -> dict:
    """--steps and --max-new-tokens (min_new_tokens: LaVIT's 20, or fewer when the maximum is lower)."""
    return {"num_inference_steps": args.steps, "max_new_tokens": args.max_new_tokens, "min_new_tokens": min(20, args.max_new_tokens)}


def evaluate_caption(args, device, dtype):
    from .evaluation.captioning import evaluate_captioning

    return evaluate_captioning(
        args.model, args.annotations, args.images, args.ground_truth, args.output, args.batch_size, args.seed,
        device, dtype, args.limit, tuple(args.metrics),
    )


def evaluate_vqa(args, device, dtype):
    from .evaluation.vqa import evaluate_vqa as run

    return run(
        args.model, args.annotations, args.images, args.output, args.dataset, args.ground_truth,
        not args.no_lemmatize, args.batch_size, args.seed, device, dtype, args.limit,
    )


def evaluate_t2i(args, device, dtype):
    from .evaluation.metrics import INCEPTION_HINT
    from .evaluation.text_to_image import evaluate_text_to_image

    if not (args.inception_weights or args.no_fid):
        raise UsageError(f"{INCEPTION_HINT}: pass --inception-weights FILE, or --no-fid")
    return evaluate_text_to_image(
        args.model, args.annotations, args.output, args.images, args.clip, None if args.no_fid else args.inception_weights,
        args.num_images, args.resolution, args.batch_size, args.seed, device, dtype, args.limit,
        generation_kwargs=evaluation_generation_kwargs(args),
    )


def evaluate_shapes(args, device, dtype):
    from .evaluation.shapes import evaluate_shapes as run

    return run(
        args.model, args.output, args.num_prompts, args.num_scenes, args.seed, args.batch_size, device, dtype,
        generation_kwargs=evaluation_generation_kwargs(args),
    )


EVALUATIONS = {"caption": evaluate_caption, "vqa": evaluate_vqa, "t2i": evaluate_t2i, "shapes": evaluate_shapes}


def run_convert(args) -> None:
    from .conversion import convert

    print(convert(args.src, args.dst, args.pixel_decoder, args.dtype, args.overwrite, args.safety_checker))


COMMANDS = {
    "generate": run_generate, "caption": run_understanding, "ask": run_understanding,
    "reconstruct": run_reconstruct, "convert": run_convert, "evaluate": run_evaluate,
}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
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
