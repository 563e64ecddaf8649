"""The accelerate training loop every stage shares.

A stage (see `Stage`) owns a `module` whose forward takes `(batch, generators, step)` and returns a dict
with `loss` and metrics. The loop prepares it with accelerate (DDP/FSDP/DeepSpeed from the launch config,
mixed precision, gradient accumulation), saves `OUT/checkpoint-<step>` with `save_state`, resumes with
`load_state` and skips the batches already seen, logs to `OUT/logs.jsonl` and a progress bar, validates at
intervals and finally writes the trained pipeline folder.

Randomness of an example (Gumbel noise, diffusion noise and timestep, dropout decisions) comes from a
generator seeded by (seed, epoch, example index): a run is reproducible, a resumed run equals an
uninterrupted one, and the result does not depend on how the batch is split across processes.
"""

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
from accelerate.logging import get_logger
from accelerate.state import PartialState
from accelerate.utils import ProjectConfiguration, set_seed
from accelerate.utils import load as accelerate_load
from diffusers.optimization import get_scheduler
from diffusers.training_utils import cast_training_params
from tqdm.auto import tqdm

from ..pipelines.base import component_entries, first_line, stored_shapes
from ..staging import apply_umask
from .config import TrainingConfig
from .data import IndexedDataset, add_class_examples, collate, load_image_text_dataset
from .reporting import LOSS_PLOT, caption_grid, log_images, plot_losses, tracker_config

logger = get_logger(__name__)
LOGS = "logs.jsonl"
CONFIG = "training_config.json"
CHECKPOINT_PREFIX = "checkpoint-"
STAGING = ".pipeline-staging"
WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
VALIDATION_EPOCH = 2**32 - 1  # seeds the fixed validation batch apart from every training epoch
VALIDATION_IMAGES = 4  # most images in a validation grid


class Stage:
    """What a stage gives the loop. Subclasses set `module`, `components` (pipeline component name ->
    model, what the stage changes or needs) and `trained_components` (the names it writes)."""

    needed_components: tuple[str, ...] = ()
    trained_components: tuple[str, ...] = ()
    validation_images = "text-to-image"  # what the validation grids show; or "reconstruction"

    def __init__(self, config: TrainingConfig, components: dict, accelerator: Accelerator):
        self.config, self.components, self.accelerator = config, components, accelerator
        self._validation_pipeline = None

    def transform(self, image, text: str) -> dict:
        """One PIL image and its text -> the tensors (and text) of one example."""
        raise NotImplementedError

    def initialize(self, data: IndexedDataset) -> None:
        """Hook before training (and before a checkpoint is resumed) with the whole transformed dataset:
        data-dependent initialisation or caches; default none."""

    def parameters_to_train(self) -> list[torch.nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

    def after_optimizer_step(self, step: int) -> None:
        """Hook after each optimizer step (e.g. an EMA of the weights)."""

    def validate(self, batch: dict, generators: list, step: int, folder: Path) -> dict:
        """Metrics (and files written into `folder`, created on demand) on the fixed validation batch;
        default: the loss, without any update."""
        with torch.no_grad():
            out = self.module(batch, generators, step)
        return {"validation_loss": float(out["loss"])}

    def validation_pipeline(self):
        """A text-to-image pipeline on the stage's components as they are now and BASE's others (loaded once)."""
        if self._validation_pipeline is None:
            from ..pipelines.text2image import LavitText2ImagePipeline

            given = {k: v for k, v in self.components.items() if k in LavitText2ImagePipeline.component_names()}
            dtype = {"default": WEIGHT_DTYPES[self.config.mixed_precision], "vae": torch.float32}
            pipe = LavitText2ImagePipeline.from_pretrained(self.config.model, dtype=dtype, **given)
            pipe.set_progress_bar_config(disable=True)
            self._validation_pipeline = pipe.to(self.accelerator.device)
        return self._validation_pipeline

    def validation_grid(self, images: list, texts: list[str]):
        """Text-to-image from `texts` (or reconstructions of `images`), seeded by the run's seed, in a grid with
        their texts (and token counts) as captions."""
        pipe = self.validation_pipeline()
        generator = torch.Generator().manual_seed(self.config.seed)
        steps = self.config.validation_inference_steps
        if self.validation_images == "reconstruction":
            out = pipe.reconstruct(images, num_inference_steps=steps, generator=generator)
            texts = [f"{len(ids)} tokens: {text}" for ids, text in zip(out.visual_token_ids, texts)]
        else:
            out = pipe(texts, num_inference_steps=steps, generator=generator)
        return caption_grid(out.images, texts)

    def finish(self, output: Path) -> dict:
        """The trained components to write into the pipeline folder, after any LoRA files are saved."""
        return {name: self.components[name] for name in self.trained_components}


def lora_layers(model: torch.nn.Module) -> tuple[dict, dict]:
    """The peft LoRA weights of `model` in diffusers' format, and their LoraConfig as metadata."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    config = model.peft_config["default"].to_dict()
    config = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
    return convert_state_dict_to_diffusers(get_peft_model_state_dict(model)), config


def example_generators(seed: int, epoch: int, indices) -> list[torch.Generator]:
    """One CPU generator per example, seeded by (seed, epoch, example index)."""
    return [
        torch.Generator().manual_seed(int(np.random.SeedSequence([seed, epoch, int(i)]).generate_state(1)[0]))
        for i in indices
    ]


def check_output(output: Path, model: Path, resume: str | None) -> None:
    """The output folder must be new, empty, or (with resume) hold one of our runs; never the BASE folder."""
    if output.resolve() == model.resolve():
        raise ValueError(f"`output` must differ from `model` ({output}); the base folder is never overwritten.")
    if output.exists() and not output.is_dir():
        raise ValueError(f"`output`: {output} exists and is not a folder.")
    entries = sorted(p.name for p in output.iterdir()) if output.is_dir() else []
    if not entries:
        return
    ours = resume is not None and (output / CONFIG).is_file()
    if not ours:
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise ValueError(
            f"`output`: {output} already holds files ({shown}); choose a new or empty folder, or pass "
            f"resume_from_checkpoint to continue the run it holds."
        )


def find_checkpoint(output: Path, config: TrainingConfig) -> Path | None:
    """`latest` -> the newest `checkpoint-<step>` in output (None, said on one line, if there is none: a new run
    starts); a path -> that folder. ValueError when the run recorded there trained another stage."""
    resume = config.resume_from_checkpoint
    if resume is None:
        return None
    if resume != "latest":
        path = Path(resume)
        if not path.is_dir() or not checkpoint_step(path):
            raise FileNotFoundError(
                f"`resume_from_checkpoint`: no checkpoint folder ({CHECKPOINT_PREFIX}<step>) {resume!r}."
            )
    else:
        found = [p for p in output.glob(f"{CHECKPOINT_PREFIX}*") if checkpoint_step(p)]
        if not found:
            if PartialState().is_main_process:
                print(
                    f"resume_from_checkpoint=latest: {output} holds no checkpoint; starting a new training run.",
                    file=sys.stderr,
                )
            return None
        path = max(found, key=checkpoint_step)
    recorded = path.parent / CONFIG
    if recorded.is_file():
        try:
            stage = json.loads(recorded.read_text(encoding="utf-8")).get("stage")
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as error:
            raise ValueError(f"`resume_from_checkpoint`: {recorded} is not a training config ({error}).") from None
        if stage != config.stage:
            raise ValueError(
                f"`resume_from_checkpoint`: {path} is a checkpoint of the {stage} stage ({recorded}), "
                f"not of {config.stage}."
            )
    return path


def checkpoint_step(path: Path) -> int:
    """The step of `checkpoint-<step>` (0 for other names)."""
    suffix = path.name[len(CHECKPOINT_PREFIX) :]
    return int(suffix) if path.name.startswith(CHECKPOINT_PREFIX) and suffix.isdigit() else 0


def check_checkpoint(checkpoint: Path, module: torch.nn.Module) -> None:
    """ValueError naming the file when a file of `checkpoint` is unreadable (truncated, or a pickle that holds more
    than tensors: read as accelerate reads it, `weights_only`, memory-mapped) or its model weights are not those of
    `module` (another stage, other settings)."""
    expected = {key: tuple(value.shape) for key, value in module.state_dict().items()}
    for path in sorted(checkpoint.iterdir()):
        if path.suffix == ".safetensors":
            try:
                stored = stored_shapes("checkpoint", [path])
            except ValueError as error:
                raise ValueError(
                    f"`resume_from_checkpoint`: {path} is not readable ({first_line(error.__cause__)})."
                ) from None
            different = sorted(set(stored) ^ set(expected)) or sorted(k for k in stored if stored[k] != expected[k])
            if different:
                raise ValueError(
                    f"`resume_from_checkpoint`: {path} holds the weights of another model than this run "
                    f"trains ({different[0]} differs): another stage or other settings."
                )
        elif path.suffix in (".bin", ".pkl"):
            try:
                accelerate_load(path, map_location="cpu", mmap=True)
            except Exception as error:  # noqa: BLE001 - truncated or refused: name the file
                raise ValueError(f"`resume_from_checkpoint`: {path} is not readable ({first_line(error)}).") from None


def load_components(model: Path, names: tuple[str, ...], dtype: torch.dtype = torch.float32) -> dict:
    """The named components of the BASE pipeline folder (others are not loaded), in `dtype` (the VAE stays
    in float32, where SDXL's VAE does not overflow)."""
    from ..pipelines.text2image import LavitText2ImagePipeline

    index = json.loads((model / "model_index.json").read_text())
    skipped = {name: None for name in LavitText2ImagePipeline.component_names() if name not in names}
    missing = [name for name in names if index.get(name, [None])[0] is None]
    if missing:
        raise ValueError(f"`model`: {model} has no {', '.join(missing)} component, which this stage trains or needs.")
    pipe = LavitText2ImagePipeline.from_pretrained(model, dtype={"default": dtype, "vae": torch.float32}, **skipped)
    return {name: getattr(pipe, name) for name in names}


def per_example(generators: list, draw) -> torch.Tensor:
    """Concatenate `draw(generator)` over the examples' generators."""
    return torch.cat([draw(generator) for generator in generators])


def write_pipeline_folder(model: Path, output: Path, trained: dict) -> None:
    """OUT becomes a complete pipeline folder: the trained components saved, the others copied from BASE.
    Written into a staging folder first, then moved into place."""
    staging = output / STAGING
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    for name, entry in component_entries(json.loads((model / "model_index.json").read_text())).items():
        if entry[0] is None:
            continue
        if name in trained:
            trained[name].save_pretrained(staging / name)
        else:
            shutil.copytree(model / name, staging / name)
    shutil.copy2(model / "model_index.json", staging / "model_index.json")
    apply_umask(staging)
    for entry in staging.iterdir():
        target = output / entry.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(entry, target)
    staging.rmdir()


def rewrite_logs(path: Path, last_step: int) -> None:
    """Keep the log lines up to `last_step` (a resumed run appends from there; from step 0, none)."""
    if path.is_file():
        lines = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= last_step]
        path.write_text("".join(line + "\n" for line in lines) if last_step else "")


def prune_checkpoints(output: Path, limit: int | None) -> None:
    if limit is None:
        return
    found = sorted(output.glob(f"{CHECKPOINT_PREFIX}*"), key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))
    for old in found[: max(len(found) - limit, 0)]:
        shutil.rmtree(old)


def batches_from(dataloader, accelerator: Accelerator, seen: int):
    """Yield (epoch, batch) endlessly, continuing after the `seen` batches of the run so far (the order of an
    epoch is fixed by the seeded sampler, so the skipped batches are exactly those already trained on)."""
    epoch, skip = divmod(seen, len(dataloader))
    while True:
        dataloader.set_epoch(epoch)
        yield from (
            (epoch, batch) for batch in (accelerator.skip_first_batches(dataloader, skip) if skip else dataloader)
        )
        epoch, skip = epoch + 1, 0


def append_log(output: Path, row: dict) -> None:
    with open(output / LOGS, "a") as logs:
        logs.write(json.dumps(row) + "\n")


def save_checkpoint(accelerator: Accelerator, output: Path, step: int, limit: int | None) -> None:
    """`OUT/checkpoint-<step>` with accelerate's `save_state`, keeping the newest `limit`."""
    accelerator.wait_for_everyone()
    accelerator.save_state(str(output / f"{CHECKPOINT_PREFIX}{step}"))
    if accelerator.is_main_process:
        prune_checkpoints(output, limit)


def to_number(value) -> float | int:
    value = value.item() if isinstance(value, torch.Tensor) else value
    return round(value, 6) if isinstance(value, float) else value


def run(config: TrainingConfig, stage_cls: type[Stage]) -> Path:
    """Train one stage; returns OUT (a complete pipeline folder)."""
    model, output = Path(config.model), Path(config.output)
    check_output(output, model, config.resume_from_checkpoint)
    checkpoint = find_checkpoint(output, config)
    step = checkpoint_step(checkpoint) if checkpoint is not None else 0
    if step >= config.max_steps and (output / "model_index.json").is_file():
        if PartialState().is_main_process:
            print(
                f"{checkpoint} already reached max_steps={config.max_steps}: nothing to train, {output} is left as it is.",
                file=sys.stderr,
            )
        return output
    dataset = load_image_text_dataset(config.data, config.image_column, config.text_column)
    if config.class_data is not None:
        dataset = add_class_examples(dataset, config.class_data, config.image_column, config.text_column)
    accelerator = Accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision=config.mixed_precision,
        project_config=ProjectConfiguration(project_dir=str(output)),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=config.seed),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        log_with=config.report_to,
    )
    set_seed(config.seed)
    # Frozen weights in the mixed-precision dtype, trained ones in float32 (diffusers' training scripts' recipe).
    weight_dtype = WEIGHT_DTYPES[config.mixed_precision]
    stage = stage_cls(config, load_components(model, stage_cls.needed_components, weight_dtype), accelerator)
    cast_training_params(stage.module, torch.float32)
    data = IndexedDataset(dataset, stage.transform, config.image_column, config.text_column)
    stage.initialize(data)
    dataloader = torch.utils.data.DataLoader(data, batch_size=config.batch_size, shuffle=True, collate_fn=collate)
    optimizer = torch.optim.AdamW(
        stage.parameters_to_train(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    lr_scheduler = get_scheduler(
        config.lr_scheduler,
        optimizer,
        num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=config.max_steps * accelerator.num_processes,
    )
    module, optimizer, dataloader, lr_scheduler = accelerator.prepare(stage.module, optimizer, dataloader, lr_scheduler)
    accelerator.init_trackers(f"lavit-{config.stage}", config=tracker_config(config.to_dict()))

    if checkpoint is not None:
        check_checkpoint(checkpoint, accelerator.unwrap_model(module))
        accelerator.load_state(str(checkpoint))
    if accelerator.is_main_process:
        output.mkdir(parents=True, exist_ok=True)
        (output / CONFIG).write_text(json.dumps(config.to_dict(), indent=2))
        rewrite_logs(output / LOGS, step)
    logging_steps = 1 if config.max_steps <= 100 else config.logging_steps
    progress = tqdm(
        range(config.max_steps),
        initial=step,
        desc=f"train {config.stage}",
        disable=not accelerator.is_local_main_process,
    )
    if config.validation_steps:  # a fixed batch: the first examples
        validation_batch = collate([data[i] for i in range(min(config.batch_size, len(data)))])
        validation_examples = dataset.select(range(min(VALIDATION_IMAGES, len(data))))
    if config.validation_steps and step == 0 and accelerator.is_main_process:
        validate(stage, accelerator, validation_batch, validation_examples, 0, output)  # the baseline
    for epoch, batch in batches_from(dataloader, accelerator, step * config.gradient_accumulation_steps):
        if step >= config.max_steps:  # resumed from the last checkpoint of a run whose pipeline was never written
            break
        generators = example_generators(config.seed, epoch, batch["index"].tolist())
        with accelerator.accumulate(module):
            module.train()
            out = module(batch, generators, step)
            accelerator.backward(out["loss"])
            if accelerator.sync_gradients and config.max_grad_norm:
                accelerator.clip_grad_norm_(stage.parameters_to_train(), config.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
        if not accelerator.sync_gradients:
            continue
        step += 1
        progress.update(1)
        stage.after_optimizer_step(step)
        metrics = {k: to_number(accelerator.reduce(v.detach().float(), "mean")) for k, v in out.items()}
        progress.set_postfix(loss=metrics["loss"])
        if accelerator.is_main_process and (step % logging_steps == 0 or step == config.max_steps):
            row = {**metrics, "lr": lr_scheduler.get_last_lr()[0]}
            append_log(output, {"step": step, **row})
            accelerator.log(row, step=step)
        if config.validation_steps and step % config.validation_steps == 0 and accelerator.is_main_process:
            validate(stage, accelerator, validation_batch, validation_examples, step, output)
        if config.checkpoints_total_limit != 0 and (step % config.checkpointing_steps == 0 or step == config.max_steps):
            save_checkpoint(accelerator, output, step, config.checkpoints_total_limit)
        if step >= config.max_steps:
            break
    progress.close()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_pipeline_folder(model, output, stage.finish(output))
        plot_losses(output / LOGS, output / LOSS_PLOT)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return output


def validate(stage: Stage, accelerator: Accelerator, batch: dict, examples, step: int, output: Path) -> None:
    """Metrics on the fixed validation batch, appended to logs.jsonl; the grid of `examples` (the first dataset
    rows) as OUT/validation/step-<step>.png; both to the run's trackers."""
    module = accelerator.unwrap_model(stage.module)
    module.eval()
    generators = example_generators(stage.config.seed, VALIDATION_EPOCH, batch["index"].tolist())
    config, folder = stage.config, output / "validation"
    with accelerator.autocast():
        metrics = {k: to_number(v) for k, v in stage.validate(batch, generators, step, folder).items()}
        grid = stage.validation_grid(list(examples[config.image_column]), list(examples[config.text_column]))
    append_log(output, {"step": step, **metrics})
    folder.mkdir(exist_ok=True)
    grid.save(folder / f"step-{step}.png")
    accelerator.log(metrics, step=step)
    log_images(accelerator, "validation", grid, step)
