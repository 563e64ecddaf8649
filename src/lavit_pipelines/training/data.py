"""Training data: an image folder with `metadata.jsonl` (the `datasets` imagefolder convention), a folder
saved with `Dataset.save_to_disk`, or a `datasets` name; the image folder is checked line by line first."""

import json
from collections.abc import Callable
from pathlib import Path

import PIL.Image
import torch

from .config import METADATA

PROMPT = "prompt"  # optional column: a text the language model reads, not learns, before `text`
PRIOR = "prior"  # column added with class examples: True for them (prior preservation), False for the data's own


def check_image_folder(folder: Path, text_column: str = "text") -> int:
    """Every line of `folder/metadata.jsonl` must be a JSON object whose `file_name` is a readable image in
    `folder` and whose `text_column` is a non-empty string (and `prompt`, when given, a string). Returns the number of examples; raises a
    ValueError/FileNotFoundError naming the file and line otherwise."""
    metadata = folder / METADATA
    if not metadata.is_file():
        raise FileNotFoundError(f"`data`: {folder} has no {METADATA} (lines of {{\"file_name\": ..., \"text\": ...}}).")
    count = 0
    for number, line in enumerate(metadata.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{metadata}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}: not a JSON object ({error.msg}).") from None
        if not isinstance(record, dict) or not isinstance(record.get("file_name"), str):
            raise ValueError(f"{where}: needs a string \"file_name\".")
        text = record.get(text_column)
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{where}: {record['file_name']!r} has no text (a non-empty string \"{text_column}\").")
        if not isinstance(record.get(PROMPT, ""), str):
            raise ValueError(f"{where}: \"{PROMPT}\" must be a string (the unlabelled text before \"{text_column}\").")
        image = folder / record["file_name"]
        if not image.is_file():
            raise FileNotFoundError(f"{where}: the image {str(image)!r} does not exist.")
        try:
            with PIL.Image.open(image) as opened:
                opened.verify()
        except (OSError, SyntaxError) as error:
            raise ValueError(f"{where}: {str(image)!r} is not a readable image ({error}).") from None
        count += 1
    if count == 0:
        raise ValueError(f"`data`: {metadata} lists no example.")
    return count


def load_image_text_dataset(data: str, image_column: str = "image", text_column: str = "text"):
    """`data` -> a `datasets.Dataset` with `image_column` (PIL images) and `text_column` (strings)."""
    import datasets

    folder = Path(data)
    if not folder.exists() and (data.startswith((".", "/", "~")) or data.count("/") != 1):
        raise FileNotFoundError(f"`data`: {data!r} is neither a folder nor a `datasets` name (owner/name).")
    if (folder / METADATA).is_file() or (folder.is_dir() and not (folder / "dataset_info.json").is_file()):
        check_image_folder(folder, text_column)
        dataset = datasets.load_dataset("imagefolder", data_dir=str(folder), split="train")
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
    parts = [part.select_columns(kept).add_column(PRIOR, [flag] * len(part)) for part, flag in ((dataset, False), (classes, True))]
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
        key: torch.stack([e[key] for e in examples]) if isinstance(examples[0][key], torch.Tensor)
        else [e[key] for e in examples]
        for key in examples[0]
    }
