"""What the evaluations share: loading a model folder, atomic JSON output, and a resumable sharded loop.

`run_sharded` cuts the items into fixed batches (the same batches for any number of processes, so the predictions
do not depend on it), splits the batches between the processes of `accelerate launch`, appends each batch's
records to the process' own `partial/rank{k}.jsonl` as soon as it is done, gathers everything on the main process
and de-duplicates it by id. A rerun skips the ids already in the partial files (the output folder must be shared
by the processes).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import torch

PARTIAL = "partial"


def load_pipelines(model_path: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """(text-to-image pipeline with its visual tokenizer, understanding pipeline) sharing one set of weights."""
    from ..pipelines.text2image import LavitText2ImagePipeline
    from ..pipelines.understanding import LavitUnderstandingPipeline

    text2image = LavitText2ImagePipeline.from_pretrained(model_path, load_visual_tokenizer=True, dtype=dtype).to(device)
    understanding = LavitUnderstandingPipeline(text2image.tokenizer, text2image.language_model, text2image.visual_tokenizer)
    return text2image, understanding


def write_json(path: Path, data) -> None:
    """Write through a temporary file in the same folder: a failure never leaves a half-written file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_partial(output: Path, key: str) -> dict:
    """id -> record of every complete line in `output/partial/*.jsonl` (a line cut by an interruption is ignored)."""
    records = {}
    for path in sorted((output / PARTIAL).glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            records[record[key]] = record
    return records


def run_sharded(
    items: list[dict], key: str, predict: Callable[[list[dict], int], list[dict]], output: Path, batch_size: int,
    progress: bool = True,
) -> list[dict] | None:
    """Run `predict(batch, start)` (`start`: the index of the batch's first item, for seeding) over `items` sharded
    across processes; each returned record carries the item's `key`. Returns, on the main process, the records of
    all items in their order (None on the others)."""
    from accelerate import PartialState
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm

    state = PartialState()
    done = read_partial(output, key)
    state.wait_for_everyone()  # every process has read the same partial files before any writes
    batches = [
        (start, items[start : start + batch_size]) for start in range(0, len(items), batch_size)
        if any(item[key] not in done for item in items[start : start + batch_size])
    ]
    (output / PARTIAL).mkdir(parents=True, exist_ok=True)
    log = output / PARTIAL / f"rank{state.process_index}.jsonl"
    mine = []
    with state.split_between_processes(batches) as shard, log.open("a", encoding="utf-8") as handle:
        for start, batch in tqdm(shard, desc="batches", disable=not (progress and state.is_local_main_process)):
            records = predict(batch, start)
            handle.write("".join(json.dumps(record) + "\n" for record in records))
            handle.flush()
            mine += records
    gathered = gather_object(mine) if state.num_processes > 1 else mine
    if not state.is_main_process:
        return None
    done.update({record[key]: record for record in gathered})
    return [done[item[key]] for item in items]
