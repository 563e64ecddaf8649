"""Scores of LaVIT's evaluations: VQA accuracy (the official answer normalisation and leave-one-out formula, plus
the original's answer clean-up), GQA exact match, COCO caption metrics (pycocoevalcap) and FID (torchmetrics)."""

from __future__ import annotations

import contextlib
import re
import shutil
import sys
from pathlib import Path

import torch

# ------------------------------------------------------------------ VQA answer normalisation (official VQA eval)

CONTRACTIONS = {
    "aint": "ain't",
    "arent": "aren't",
    "cant": "can't",
    "couldve": "could've",
    "couldnt": "couldn't",
    "couldn'tve": "couldn't've",
    "couldnt've": "couldn't've",
    "didnt": "didn't",
    "doesnt": "doesn't",
    "dont": "don't",
    "hadnt": "hadn't",
    "hadnt've": "hadn't've",
    "hadn'tve": "hadn't've",
    "hasnt": "hasn't",
    "havent": "haven't",
    "hed": "he'd",
    "hed've": "he'd've",
    "he'dve": "he'd've",
    "hes": "he's",
    "howd": "how'd",
    "howll": "how'll",
    "hows": "how's",
    "Id've": "I'd've",
    "I'dve": "I'd've",
    "Im": "I'm",
    "Ive": "I've",
    "isnt": "isn't",
    "itd": "it'd",
    "itd've": "it'd've",
    "it'dve": "it'd've",
    "itll": "it'll",
    "let's": "let's",
    "maam": "ma'am",
    "mightnt": "mightn't",
    "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've",
    "mightve": "might've",
    "mustnt": "mustn't",
    "mustve": "must've",
    "neednt": "needn't",
    "notve": "not've",
    "oclock": "o'clock",
    "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at",
    "shant": "shan't",
    "shed've": "she'd've",
    "she'dve": "she'd've",
    "she's": "she's",
    "shouldve": "should've",
    "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll",
    "somebodys": "somebody's",
    "someoned": "someone'd",
    "someoned've": "someone'd've",
    "someone'dve": "someone'd've",
    "someonell": "someone'll",
    "someones": "someone's",
    "somethingd": "something'd",
    "somethingd've": "something'd've",
    "something'dve": "something'd've",
    "somethingll": "something'll",
    "thats": "that's",
    "thered": "there'd",
    "thered've": "there'd've",
    "there'dve": "there'd've",
    "therere": "there're",
    "theres": "there's",
    "theyd": "they'd",
    "theyd've": "they'd've",
    "they'dve": "they'd've",
    "theyll": "they'll",
    "theyre": "they're",
    "theyve": "they've",
    "twas": "'twas",
    "wasnt": "wasn't",
    "wed've": "we'd've",
    "we'dve": "we'd've",
    "weve": "we've",
    "werent": "weren't",
    "whatll": "what'll",
    "whatre": "what're",
    "whats": "what's",
    "whatve": "what've",
    "whens": "when's",
    "whered": "where'd",
    "wheres": "where's",
    "whereve": "where've",
    "whod": "who'd",
    "whod've": "who'd've",
    "who'dve": "who'd've",
    "wholl": "who'll",
    "whos": "who's",
    "whove": "who've",
    "whyll": "why'll",
    "whyre": "why're",
    "whys": "why's",
    "wont": "won't",
    "wouldve": "would've",
    "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've",
    "yall": "y'all",
    "yall'll": "y'all'll",
    "y'allll": "y'all'll",
    "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've",
    "youd": "you'd",
    "youd've": "you'd've",
    "you'dve": "you'd've",
    "youll": "you'll",
    "youre": "you're",
    "youve": "you've",
}
NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
ARTICLES = ("a", "an", "the")
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
# The official expression (its look-behind is written `(?!<=\d)`, which the scores depend on: kept as is).
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
# LaVIT's clean-up of predictions after the official normalisation: these answers mean "unanswerable", these
# leading words are dropped (in this order, each at most once).
UNANSWERABLE_STARTS = ("i don't know", "i do n't know", "i need to know")
DROPPED_PREFIXES = (
    "it's ",
    "it is ",
    "this is ",
    "that is ",
    "she's ",
    "she 's ",
    "she is ",
    "he's ",
    "he 's ",
    "he is ",
    "they are ",
    "they're ",
    "very ",
    "for ",
    "to ",
    "in ",
    "on ",
    "at ",
    "a ",
    "an ",
    "the ",
)


def process_punctuation(text: str) -> str:
    """The official step: punctuation removed (or turned into a space), periods not in numbers dropped, lowercase."""
    out = text
    for mark in PUNCTUATION:
        if mark + " " in text or " " + mark in text or COMMA_BETWEEN_DIGITS.search(text) is not None:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return PERIOD_STRIP.sub("", out, re.UNICODE).lower()  # sic: `re.UNICODE` lands in `count` (32), as officially


def process_digits_and_articles(text: str) -> str:
    """The official step: number words to digits, articles dropped, contractions restored."""
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES)


def lavit_answer_cleanup(answer: str) -> str:
    """The original's extra step on predictions: "don't know"s and "" become "unanswerable", leading filler
    ("it is ", "the ", ...) is dropped."""
    if answer.startswith(UNANSWERABLE_STARTS) or answer == "":
        answer = "unanswerable"
    for prefix in DROPPED_PREFIXES:
        if answer.startswith(prefix):
            answer = answer.split(prefix)[-1]
    return answer


def normalize_prediction(answer: str) -> str:
    """A predicted answer as the original scores it: whitespace, official normalisation, LaVIT's clean-up."""
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return lavit_answer_cleanup(process_digits_and_articles(process_punctuation(answer)))


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """Official VQA accuracy of one prediction in [0, 1]: the mean over the leave-one-out subsets of the human
    answers (each leaves out one answer) of min(1, matches / 3). The prediction is normalised with
    `normalize_prediction`; the human answers get the punctuation step only when they disagree (as officially)."""
    prediction = normalize_prediction(prediction)
    if len(set(answers)) > 1:
        answers = [process_punctuation(answer) for answer in answers]
    matches = [answer == prediction for answer in answers]
    total = sum(matches)
    return sum(min(1.0, (total - own) / 3) for own in matches) / len(answers)


def gqa_accuracy(prediction: str, answer: str) -> float:
    """GQA: 1 when the normalised prediction equals the ground-truth answer, else 0."""
    return float(normalize_prediction(prediction) == answer)


# ------------------------------------------------------------------ captions (pycocoevalcap)

CAPTION_METRICS = ("Bleu", "METEOR", "ROUGE_L", "CIDEr", "SPICE")


def spice_available() -> bool:
    """SPICE needs Stanford CoreNLP jars next to pycocoevalcap's SPICE (it would download them otherwise)."""
    from pycocoevalcap.spice import get_stanford_models

    return Path(get_stanford_models.SPICEDIR, get_stanford_models.SPICELIB, f"{get_stanford_models.JAR}.jar").is_file()


def check_caption_metrics(names: tuple[str, ...]) -> None:
    """ValueError for unknown metric names, ImportError / FileNotFoundError when pycocoevalcap or the Java it runs
    (its PTB tokenizer, METEOR, SPICE) is missing: checked before any model runs."""
    unknown = set(names) - set(CAPTION_METRICS)
    if unknown or not names:
        raise ValueError(f"caption metrics must be among {CAPTION_METRICS}, got {list(names)}")
    try:
        import pycocoevalcap  # noqa: F401
    except ImportError as error:
        raise ImportError(
            f"caption metrics need pycocoevalcap: pip install 'lavit-pipelines[evaluation]' ({error})"
        ) from None
    if shutil.which("java") is None:
        raise FileNotFoundError(
            "caption metrics need Java on PATH (pycocoevalcap's PTB tokenizer runs it): install a JRE"
        )


def caption_scorers(names: tuple[str, ...]) -> list:
    """(pycocoevalcap scorer, its metric names) for each of `names` (`CAPTION_METRICS`); SPICE is left out, with a
    notice on stderr, when its CoreNLP models are missing."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.spice.spice import Spice

    check_caption_metrics(names)
    if "SPICE" in names and not spice_available():
        print(
            "note: SPICE skipped: pycocoevalcap's Stanford CoreNLP models are missing (run pycocoevalcap's "
            "spice/get_stanford_models.py once with network access)",
            file=sys.stderr,
        )
        names = tuple(name for name in names if name != "SPICE")
    scorers = {
        "Bleu": lambda: (Bleu(4), ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"]),
        "METEOR": lambda: (Meteor(), ["METEOR"]),
        "ROUGE_L": lambda: (Rouge(), ["ROUGE_L"]),
        "CIDEr": lambda: (Cider(), ["CIDEr"]),
        "SPICE": lambda: (Spice(), ["SPICE"]),
    }
    return [scorers[name]() for name in CAPTION_METRICS if name in names]


def caption_scores(
    references: dict[int, list[str]], predictions: dict[int, str], names: tuple[str, ...] = CAPTION_METRICS
) -> dict[str, float]:
    """pycocoevalcap's COCO caption metrics (what `COCOEvalCap.evaluate` computes) over the predicted images: PTB
    tokenisation, then `names` of Bleu (Bleu_1..4), METEOR, ROUGE_L, CIDEr, SPICE. Needs Java."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    scorers = caption_scorers(names)
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": c} for c in references[i]] for i in predictions})
    res = tokenizer.tokenize({i: [{"caption": c}] for i, c in predictions.items()})
    scores = {}
    with contextlib.redirect_stdout(sys.stderr):  # the scorers print their progress
        for scorer, metric_names in scorers:
            score, _ = scorer.compute_score(gts, res)
            scores.update(zip(metric_names, score if len(metric_names) > 1 else [score]))
    return {name: float(value) for name, value in scores.items()}


# ------------------------------------------------------------------ FID (torchmetrics)

INCEPTION_HINT = (
    "FID needs the FID Inception weights as a local file (torch-fidelity's weights-inception-2015-12-05-6726825d.pth, "
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth) "
    "and `pip install torch-fidelity`; or pass any feature extractor module"
)


def fid_metric(feature: torch.nn.Module | str | Path):
    """torchmetrics' `FrechetInceptionDistance` for float images in [0, 1] (`normalize=True`). `feature`: a module
    mapping such (B, 3, H, W) images to (B, F) features, or the path of the 2048-feature FID Inception weights
    (images quantised to uint8 first, as the original); FileNotFoundError / ModuleNotFoundError saying what is
    needed."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    if isinstance(feature, torch.nn.Module):
        return FrechetInceptionDistance(feature=feature, normalize=True)
    if not Path(feature).is_file():
        raise FileNotFoundError(f"No Inception weights file at {str(feature)!r}: {INCEPTION_HINT}.")
    try:
        return FrechetInceptionDistance(feature=2048, normalize=True, feature_extractor_weights_path=str(feature))
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(f"{INCEPTION_HINT}.") from error


def frechet_distance(fid, real_batches, fake_batches) -> float:
    """FID between two streams of (B, 3, H, W) float images in [0, 1] (any sizes), with `fid` from `fid_metric`."""
    fid.reset()
    for batch in real_batches:
        fid.update(batch.to(fid.device), real=True)
    for batch in fake_batches:
        fid.update(batch.to(fid.device), real=False)
    return float(fid.compute())
