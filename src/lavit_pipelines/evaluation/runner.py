"""What the evaluations share: loading a model folder, atomic JSON output, and a resumable sharded loop.

`run_sharded` cuts the items into fixed batches (the same batches for any number of processes, so the
predictions do not depend on it), splits the batches between the processes of `accelerate launch`, appends each
batch's records to the process' own `partial/{stage}-rank{k}.jsonl` as soon as it is done, gathers everything on
the main process and de-duplicates it by id. A rerun skips the ids already in the partial files (the output folder must be shared
by the processes); `partial/run.json` records the settings, and a rerun with other settings is refused.
"""

from __future__ import annotations

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


def load_text2image(model_path: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32, visual_tokenizer: bool = False):
    from ..pipelines.text2image import LavitText2ImagePipeline

    return LavitText2ImagePipeline.from_pretrained(
        model_path, dtype=dtype, **({} if visual_tokenizer else {"visual_tokenizer": None})
    ).to(device)


def load_pipelines(model_path: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """(text-to-image pipeline with its visual tokenizer, understanding pipeline) sharing one set of weights."""
    from ..pipelines.understanding import LavitUnderstandingPipeline

    text2image = load_text2image(model_path, device, dtype, visual_tokenizer=True)
    understanding = LavitUnderstandingPipeline(text2image.tokenizer, text2image.language_model, text2image.visual_tokenizer)
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


def check_entries(entries, required: tuple[str, ...], path: str | Path, images: Path | None = None) -> None:
    """ValueError naming the file and entry of the first entry without a required key; FileNotFoundError for the
    first entry whose `image` is not a file under `images`."""
    if not isinstance(entries, list) or not entries or not all(isinstance(entry, dict) for entry in entries):
        raise ValueError(f"{path}: expected a non-empty JSON list of objects")
    for index, entry in enumerate(entries):
        missing = [key for key in required if key not in entry]
        if missing:
            raise ValueError(f"{path}: entry {index} has no {', '.join(map(repr, missing))}: {json.dumps(entry)[:200]}")
        if images is not None and not (images / entry["image"]).is_file():
            raise FileNotFoundError(f"{path}: entry {index}: no image file {str(images / entry['image'])!r}")


def check_run_config(output: Path, config: dict, write: bool = True) -> None:
    """ValueError when `output/partial/run.json` records other settings than `config`; else record them there
    (with `write`)."""
    path = output / PARTIAL / RUN_CONFIG
    config = json.loads(json.dumps(config, default=str))
    if path.is_file():
        earlier = json.loads(path.read_text(encoding="utf-8"))
        changed = sorted(key for key in config.keys() | earlier.keys() if config.get(key) != earlier.get(key))
        if changed:
            raise ValueError(
                f"{output} holds results of a run with other settings ({', '.join(changed)}); use another output folder"
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
    items: list[dict], key: str, predict: Callable[[list[dict], int], list[dict]], output: Path, batch_size: int,
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
        (start, items[start : start + batch_size]) for start in range(0, len(items), batch_size)
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
