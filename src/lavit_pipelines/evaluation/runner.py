"""What the evaluations share: loading a model folder, atomic JSON output, and a resumable sharded loop.

`run_sharded` cuts the items into fixed batches (the same batches for any number of processes, so the
predictions do not depend on it), splits the batches between the processes of `accelerate launch`, appends each
batch's records to the process' own `partial/{stage}-rank{k}.jsonl` as soon as it is done, gathers everything on
the main process and de-duplicates it by id. A rerun skips the ids already in the partial files (the output folder must be shared
by the processes); `partial/run.json` records every setting that changes the results (the model, the images
folder, the hashes of the annotation files, seed, dtype, protocol), and a rerun with other settings is refused.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch

from ..distributed import process_state
from ..staging import write_atomically

PARTIAL = "partial"
RUN_CONFIG = "run.json"


def load_understanding(model_path: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32):
    from ..pipelines.understanding import LavitUnderstandingPipeline

    return LavitUnderstandingPipeline.from_pretrained(model_path, dtype=dtype).to(device)


def load_text2image(
    model_path: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32, visual_tokenizer: bool = False
):
    from ..pipelines.text2image import LavitText2ImagePipeline

    return LavitText2ImagePipeline.from_pretrained(
        model_path, dtype=dtype, **({} if visual_tokenizer else {"visual_tokenizer": None})
    ).to(device)


def load_pipelines(model_path: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """(text-to-image pipeline with its visual tokenizer, understanding pipeline) sharing one set of weights."""
    from ..pipelines.understanding import LavitUnderstandingPipeline

    text2image = load_text2image(model_path, device, dtype, visual_tokenizer=True)
    understanding = LavitUnderstandingPipeline(
        text2image.tokenizer, text2image.language_model, text2image.visual_tokenizer
    )
    return text2image, understanding


def write_json(path: Path, data) -> None:
    """Write through a temporary file in the same folder: a failure never leaves a half-written file."""
    write_atomically(path, lambda tmp: tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8"))


def read_json(path: str | Path, name: str):
    """The JSON in `path`; FileNotFoundError / ValueError naming the argument `name` and the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{name}: no such file {str(path)!r}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{name}: {path} is not valid JSON ({error})") from error


def check_entries(entries, fields: dict, path: str | Path, images: Path | None = None, key: str | None = None) -> None:
    """`entries` must be a non-empty JSON list of objects, each with every field of `fields` (name -> type or tuple
    of types; None and booleans never pass for another type), distinct `key` values, and an `image` that is a file
    inside `images` (when given). ValueError / FileNotFoundError naming the file, the entry (index and id) and the
    field otherwise."""
    if not isinstance(entries, list) or not entries or not all(isinstance(entry, dict) for entry in entries):
        raise ValueError(f"{path}: expected a non-empty JSON list of objects")
    seen = {}
    for index, entry in enumerate(entries):
        where = f"{path}: entry {index}" + (f" ({key} {entry[key]!r})" if key in entry else "")
        missing = [name for name in fields if name not in entry]
        if missing:
            raise ValueError(f"{where} has no {', '.join(map(repr, missing))}: {json.dumps(entry)[:200]}")
        for name, types in fields.items():
            types = types if isinstance(types, tuple) else (types,)
            value = entry[name]
            if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
                expected = " or ".join(t.__name__ for t in types)
                raise ValueError(f"{where}: {name!r} must be a {expected}, got {json.dumps(value)[:80]}")
        if key is not None:
            if entry[key] in seen:
                raise ValueError(f"{where}: duplicate {key!r} (entry {seen[entry[key]]} has it too)")
            seen[entry[key]] = index
        if images is not None:
            image = images / entry["image"]
            if Path(entry["image"]).is_absolute() or not image.resolve().is_relative_to(images.resolve()):
                raise ValueError(f"{where}: the image {entry['image']!r} lies outside --images {str(images)!r}")
            if not image.is_file():
                raise FileNotFoundError(f"{where}: no image file {str(image)!r}")


def check_output_folder(output: str | Path, inputs: dict) -> None:
    """ValueError, before any work, when `output` is a file, or is, holds or lies inside one of the `inputs`
    (option name -> file or folder, None for an option not given): results never replace or mix with inputs."""
    out = Path(output).resolve()
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output: {str(output)!r} is a file; expected a folder for the results")
    for name, path in inputs.items():
        if path is None:
            continue
        given = Path(path).resolve()
        if given == out or given.is_relative_to(out) or (given.is_dir() and out.is_relative_to(given)):
            raise ValueError(
                f"--output {str(output)!r} overlaps {name} {str(path)!r}; write the results to a folder "
                f"apart from the inputs"
            )


def file_digest(path: str | Path | None) -> str | None:
    """sha256 of a file's bytes (None for None): what a resumed run compares, whatever the file's name."""
    return None if path is None else hashlib.sha256(Path(path).read_bytes()).hexdigest()


def folder_identity(path: str | Path | None) -> str | None:
    """The absolute path of a local file or folder (a Hub id as it is; None for None)."""
    return None if path is None else str(Path(path).resolve()) if Path(path).exists() else str(path)


def understanding_record(
    task: str, model_path, images, annotations, ground_truth, seed: int, dtype, batch_size: int, **protocol
) -> dict:
    """What a captioning or VQA run records for a resume: the model and images folders, the annotation files'
    hashes, seed, dtype, batch size and the task's protocol settings."""
    return {
        "task": task,
        "model": folder_identity(model_path),
        "images": folder_identity(images),
        "annotations": file_digest(annotations),
        "ground_truth": file_digest(ground_truth),
        "seed": seed,
        "dtype": str(dtype),
        "batch_size": batch_size,
        **protocol,
    }


def check_run_config(output: Path, config: dict, write: bool = True) -> None:
    """ValueError naming each differing setting when `output/partial/run.json` records other settings than `config`
    (or `output/partial` holds results without a record); else record them there (with `write`)."""
    path = output / PARTIAL / RUN_CONFIG
    config = json.loads(json.dumps(config, default=str))
    if path.is_file():
        earlier = json.loads(path.read_text(encoding="utf-8"))
        changed = sorted(key for key in config.keys() | earlier.keys() if config.get(key) != earlier.get(key))
        if changed:
            shown = "; ".join(f"{key}: {earlier.get(key)!r} recorded, {config.get(key)!r} now" for key in changed)
            raise ValueError(
                f"{output} holds results of a run with other settings ({shown}); use another output folder"
            )
    elif any((output / PARTIAL).glob("*.jsonl")):
        raise ValueError(
            f"{output / PARTIAL} holds results without a record of their settings ({RUN_CONFIG}); use another output folder"
        )
    elif write:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, config)


def start_run(output: str | Path, config: dict) -> Path:
    """Create the output folder and check (and record) the run's settings there; before any model loads."""
    state = process_state()
    output = Path(output)
    if state.is_main_process:
        output.mkdir(parents=True, exist_ok=True)
    state.wait_for_everyone()
    check_run_config(output, config, write=state.is_main_process)
    return output


def read_partial(output: Path, key: str, stage: str) -> dict:
    """id -> record of every complete line in `output/partial/{stage}-rank*.jsonl` (a line cut by an interruption is
    ignored)."""
    records = {}
    for path in sorted((output / PARTIAL).glob(f"{stage}-rank*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            records[record[key]] = record
    return records


def unique_by(items: list[dict], key: str) -> list[dict]:
    """The first item of each `key`, in order."""
    unique = {}
    for item in items:
        unique.setdefault(item[key], item)
    return list(unique.values())


def run_sharded(
    items: list[dict],
    key: str,
    predict: Callable[[list[dict], int], list[dict]],
    output: Path,
    batch_size: int,
    stage: str = "predictions",
) -> list[dict] | None:
    """Run `predict(batch, start)` (`start`: the index of the batch's first item, for seeding) over the `items` with
    distinct `key`s, sharded across processes; each returned record carries its item's `key`. `stage` names the
    logs (one evaluation may have several stages). Call `start_run` first. Returns, on the main process, one
    record per distinct id in item order (None on the other processes)."""
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm

    state = process_state()
    items = unique_by(items, key)
    done = read_partial(output, key, stage)
    state.wait_for_everyone()  # every process has read the same partial files before any writes
    batches = [
        (start, items[start : start + batch_size])
        for start in range(0, len(items), batch_size)
        if any(item[key] not in done for item in items[start : start + batch_size])
    ]
    (output / PARTIAL).mkdir(parents=True, exist_ok=True)
    log = output / PARTIAL / f"{stage}-rank{state.process_index}.jsonl"
    mine = []
    cut = log.is_file() and log.read_bytes()[-1:] not in (b"", b"\n")  # an interrupted write: start a new line
    with state.split_between_processes(batches) as shard, log.open("a", encoding="utf-8") as handle:
        handle.write("\n" if cut else "")
        for start, batch in tqdm(shard, desc="batches", disable=not state.is_local_main_process):
            records = predict(batch, start)
            handle.write("".join(json.dumps(record) + "\n" for record in records))
            handle.flush()
            mine += records
    gathered = gather_object(mine) if state.num_processes > 1 else mine
    if not state.is_main_process:
        return None
    done.update({record[key]: record for record in gathered})
    return [done[item[key]] for item in items]
