"""Training data: an image folder with `metadata.jsonl` (the `datasets` imagefolder convention), a folder
saved with `Dataset.save_to_disk`, or a `datasets` name; the image folder is checked line by line first and gives
exactly the examples it lists."""

import json
import os
from collections.abc import Callable
from pathlib import Path

import PIL.Image
import torch

from .config import METADATA

PROMPT = "prompt"  # optional column: a text the language model reads, not learns, before `text`
PRIOR = "prior"  # column added with class examples: True for them (prior preservation), False for the data's own


def read_metadata(folder: Path, text_column: str = "text") -> list[dict]:
    """The examples of `folder/metadata.jsonl`, each a JSON object whose `file_name` is a readable image inside
    `folder` (no `..`, absolute path or symlink leading out; at most PIL's decompression-bomb limit of pixels) and
    whose `text_column` is a non-empty string (and `prompt`, when given, a string); `file_name` becomes the image's
    path. ValueError/FileNotFoundError naming the file and line otherwise."""
    metadata = folder / METADATA
    if not metadata.is_file():
        raise FileNotFoundError(f'`data`: {folder} has no {METADATA} (lines of {{"file_name": ..., "text": ...}}).')
    root = folder.resolve()
    records = []
    for number, raw in enumerate(metadata.read_bytes().splitlines(), start=1):
        where = f"{metadata}:{number}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise ValueError(f"{where}: not UTF-8 text ({error.reason} at byte {error.start}).") from None
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}: not a JSON object ({error.msg}).") from None
        if not isinstance(record, dict) or not isinstance(record.get("file_name"), str):
            raise ValueError(f'{where}: needs a string "file_name".')
        text = record.get(text_column)
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f'{where}: {record["file_name"]!r} has no text (a non-empty string "{text_column}").')
        if not isinstance(record.get(PROMPT, ""), str):
            raise ValueError(f'{where}: "{PROMPT}" must be a string (the unlabelled text before "{text_column}").')
        image = folder / record["file_name"]
        if os.path.isabs(record["file_name"]) or not image.resolve().is_relative_to(root):
            raise ValueError(
                f"{where}: the image {record['file_name']!r} lies outside the data folder {str(folder)!r}."
            )
        if not image.is_file():
            raise FileNotFoundError(f"{where}: the image {str(image)!r} does not exist.")
        check_image(image, where)
        records.append({**record, "file_name": str(image)})
    if not records:
        raise ValueError(f"`data`: {metadata} lists no example.")
    return records


def check_image(image: Path, where: str) -> None:
    """ValueError naming `where` unless `image` is an image PIL reads, of at most `PIL.Image.MAX_IMAGE_PIXELS`."""
    try:
        with PIL.Image.open(image) as opened:
            pixels = opened.size[0] * opened.size[1]
            if PIL.Image.MAX_IMAGE_PIXELS and pixels > PIL.Image.MAX_IMAGE_PIXELS:
                raise PIL.Image.DecompressionBombError(
                    f"{pixels} pixels, over PIL's decompression-bomb limit of {PIL.Image.MAX_IMAGE_PIXELS}"
                )
            opened.verify()
    except (OSError, SyntaxError, PIL.Image.DecompressionBombError) as error:
        raise ValueError(f"{where}: {str(image)!r} is not a readable image ({error}).") from None


def load_image_text_dataset(data: str, image_column: str = "image", text_column: str = "text"):
    """`data` -> a `datasets.Dataset` with `image_column` (PIL images) and `text_column` (strings). An image
    folder gives exactly the examples its metadata.jsonl lists (other files in it, such as a run's output
    written inside it, are never read)."""
    import datasets

    folder = Path(data)
    if not folder.exists() and (data.startswith((".", "/", "~")) or data.count("/") != 1):
        raise FileNotFoundError(f"`data`: {data!r} is neither a folder nor a `datasets` name (owner/name).")
    if (folder / METADATA).is_file() or (folder.is_dir() and not (folder / "dataset_info.json").is_file()):
        records = read_metadata(folder, text_column)
        columns = {key: [record.get(key) for record in records] for key in dict.fromkeys(k for r in records for k in r)}
        dataset = datasets.Dataset.from_dict({image_column: columns.pop("file_name"), **columns})
        dataset = dataset.cast_column(image_column, datasets.Image())
    elif folder.is_dir():
        dataset = datasets.load_from_disk(str(folder))
    else:
        dataset = datasets.load_dataset(data, split="train")
    if isinstance(dataset, datasets.DatasetDict):
        dataset = dataset["train"]
    for column in (image_column, text_column):
        if column not in dataset.column_names:
            raise ValueError(f"`data`: {data!r} has no column {column!r} (columns: {dataset.column_names}).")
    return dataset


def add_class_examples(dataset, class_data: str, image_column: str = "image", text_column: str = "text"):
    """The examples of `dataset` followed by those of `class_data` (any `data` form), with a boolean `PRIOR`
    column that marks the class examples. Columns other than the image, the text and `PROMPT` are dropped."""
    import datasets

    classes = load_image_text_dataset(class_data, image_column, text_column)
    kept = [c for c in (image_column, text_column, PROMPT) if c in dataset.column_names and c in classes.column_names]
    parts = [
        part.select_columns(kept).add_column(PRIOR, [flag] * len(part))
        for part, flag in ((dataset, False), (classes, True))
    ]
    parts[1] = parts[1].cast(parts[0].features)
    return datasets.concatenate_datasets(parts)


class IndexedDataset(torch.utils.data.Dataset):
    """Examples `{"index": i, **transform(image, text)}`, plus `"prompt"` and `"prior"` when the dataset has those
    columns; the index seeds the example's randomness."""

    def __init__(self, dataset, transform: Callable, image_column: str = "image", text_column: str = "text"):
        self.dataset, self.transform = dataset, transform
        self.image_column, self.text_column = image_column, text_column

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        example = self.dataset[index]
        image = example[self.image_column]
        image = image.convert("RGB") if isinstance(image, PIL.Image.Image) else PIL.Image.open(image).convert("RGB")
        item = {"index": torch.tensor(index), **self.transform(image, example[self.text_column])}
        if PROMPT in example:
            item[PROMPT] = example[PROMPT] or ""
        if PRIOR in example:
            item[PRIOR] = torch.tensor(example[PRIOR])
        return item


def collate(examples: list[dict]) -> dict:
    """Stack tensors, keep other values (texts) as lists."""
    return {
        key: torch.stack([e[key] for e in examples])
        if isinstance(examples[0][key], torch.Tensor)
        else [e[key] for e in examples]
        for key in examples[0]
    }
