"""Demo data sets for the built-in recipes, generated offline: no downloads, numpy only, deterministic per seed.

    rows = financial_sentiment(3000, seed=0)     # [{"text": "Net sales fell 12% ...", "label": 0}, ...]
    pairs = instruction_pairs(2000, seed=0)      # [{"instruction": ..., "response": ..., "category": ...}, ...]
    write_jsonl(rows, "data/sentiment.jsonl")
    rows = read_rows("data/sentiment.jsonl")     # or a .csv with a header row
    rows = read_json("data/chat.json")           # a JSON list of objects, or JSON lines

`financial_sentiment` writes financial-news-like sentences from templates (all of them written for this
module; the company names are made up). Labels are clean and balanced: 0 negative, 1 neutral, 2 positive
(`SENTIMENT_LABELS`). The task is learnable but not trivial: the three classes share their vocabulary (the same
metrics, amounts and periods appear in every class: "Net sales will be reported on ..." is neutral), and some
templates turn on negation, contrast or what moved ("despite", "did not improve", "costs fell" is good news,
"profit fell" bad), so no keyword list decides the label and a bag of words falls short of a model that reads
word order.

`instruction_pairs` makes a tiny causal-LM SFT task of deterministic skills (reverse words, add or subtract,
uppercase, sort numbers, the capital of a made-up country), each row tagged with its `category` so a recipe can
give sites a skewed mix of categories.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fl_plugins.errors import ConfigError
from fl_plugins.tasks.sentiment import sentence

__all__ = [
    "CAPITALS",
    "INSTRUCTION_CATEGORIES",
    "SENTIMENT_LABELS",
    "financial_sentiment",
    "instruction_pairs",
    "read_json",
    "read_rows",
    "write_jsonl",
]

SENTIMENT_LABELS = ("negative", "neutral", "positive")
INSTRUCTION_CATEGORIES = ("arithmetic", "capital", "reverse", "sort", "uppercase")
READABLE_EXTENSIONS = (".csv", ".jsonl")


def _check_n(n: int, fn: str) -> None:
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 0:
        raise ConfigError(f"{fn}: n must be an integer >= 0 (got {n!r})")


# ---------------------------------------------------------------------------------------------------------------
# Financial sentiment (the vocabulary, templates and sentence maker: sentiment.py).


def financial_sentiment(n: int, seed: int = 0) -> list[dict]:
    """`n` rows `{"text": str, "label": int}`, labels 0 negative, 1 neutral, 2 positive (`SENTIMENT_LABELS`),
    balanced (class counts differ by at most one) and shuffled. Deterministic per `seed`."""
    _check_n(n, "financial_sentiment")
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % len(SENTIMENT_LABELS))
    return [{"text": sentence(int(y), rng), "label": int(y)} for y in labels]


# ---------------------------------------------------------------------------------------------------------------
# Instruction pairs.

CAPITALS: Mapping[str, str] = {
    "Veloria": "Tashmere",
    "Korvana": "Elbrith",
    "Ostmark Isles": "Sundvik",
    "Brelland": "Haverton",
    "Quessa": "Marrow Bay",
    "Tallinor": "Estrid",
    "Dravenia": "Kolm",
    "Aurelia Minor": "Pellham",
    "Zantho": "Ubrin",
    "Merevia": "Castell",
    "Nordasca": "Frostholm",
    "Ilvaran": "Seppa",
    "Calderon Reach": "Windmere",
    "Pastoria": "Lunegard",
    "Yssel": "Orrin",
    "Gravonia": "Tebbet",
    "Harrowmere": "Quill",
    "Estvanya": "Dorsk",
    "Lumeria": "Halcyon",
    "Rovagne": "Saint Amory",
}
_WORDS = (
    "apple",
    "river",
    "stone",
    "cloud",
    "green",
    "tiger",
    "paper",
    "light",
    "music",
    "house",
    "bread",
    "ocean",
    "train",
    "glass",
    "sun",
    "moon",
    "tree",
    "bird",
    "chair",
    "table",
    "red",
    "blue",
    "fast",
    "slow",
    "happy",
    "small",
    "big",
    "cold",
    "warm",
    "book",
    "door",
    "road",
    "fish",
    "milk",
    "snow",
    "rain",
    "wind",
    "star",
    "hill",
    "lake",
    "city",
    "field",
    "horse",
    "candle",
    "garden",
    "window",
    "yellow",
    "silver",
)


def _pair(category: str, rng: np.random.Generator) -> tuple[str, str]:
    def words(lo: int, hi: int) -> list[str]:
        return [_WORDS[int(i)] for i in rng.integers(len(_WORDS), size=int(rng.integers(lo, hi + 1)))]

    def phrasing(*options: str) -> str:
        return options[int(rng.integers(len(options)))]

    if category == "arithmetic":
        a, b = (int(x) for x in rng.integers(0, 100, size=2))
        if rng.random() < 0.5:
            q = phrasing("Add {a} and {b}.", "What is {a} plus {b}?", "Compute {a} + {b}.")
            return q.format(a=a, b=b), str(a + b)
        a, b = max(a, b), min(a, b)  # no negative answers
        q = phrasing("Subtract {b} from {a}.", "What is {a} minus {b}?", "Compute {a} - {b}.")
        return q.format(a=a, b=b), str(a - b)
    if category == "capital":
        countries = list(CAPITALS)
        country = countries[int(rng.integers(len(countries)))]
        q = phrasing(
            "What is the capital of {c}?", "Name the capital city of {c}.", "Which city is the capital of {c}?"
        )
        return q.format(c=country), CAPITALS[country]
    if category == "reverse":
        w = words(3, 6)
        return phrasing("Reverse the words: ", "Write these words in reverse order: ") + " ".join(w), " ".join(w[::-1])
    if category == "sort":
        xs = [int(x) for x in rng.integers(0, 100, size=int(rng.integers(3, 7)))]
        return phrasing("Sort these numbers: ", "Sort in ascending order: ") + " ".join(map(str, xs)), " ".join(
            map(str, sorted(xs))
        )
    w = words(2, 5)  # uppercase
    return phrasing("Uppercase: ", "Write in capital letters: ") + " ".join(w), " ".join(w).upper()


def instruction_pairs(n: int, seed: int = 0) -> list[dict]:
    """`n` rows `{"instruction": str, "response": str, "category": str}` over `INSTRUCTION_CATEGORIES`, balanced
    (counts differ by at most one) and shuffled. Each response is a deterministic function of its instruction."""
    _check_n(n, "instruction_pairs")
    rng = np.random.default_rng(seed)
    cats = rng.permutation(np.arange(n) % len(INSTRUCTION_CATEGORIES))
    rows = []
    for c in cats:
        category = INSTRUCTION_CATEGORIES[int(c)]
        instruction, response = _pair(category, rng)
        rows.append({"instruction": instruction, "response": response, "category": category})
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Files.


def write_jsonl(rows: Iterable[Mapping[str, Any]], path: str | Path) -> Path:
    """Write `rows` to `path`, one JSON object a line (UTF-8), creating parent folders. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(dict(row), ensure_ascii=False) + "\n")
    return path


def read_rows(path: str | Path) -> list[dict]:
    """The rows of a `.jsonl` file (one JSON object a line; blank lines skipped) or a `.csv` file (a header row,
    read with the csv module; every value is a string, as CSV has no types), UTF-8 with or without a byte-order
    mark. Raises ConfigError naming the file (and the line) for a missing file, a bad line or an unsupported
    extension."""
    path = Path(path)
    ext = path.suffix.lower()
    if ext not in READABLE_EXTENSIONS:
        raise ConfigError(
            f"{path}: unsupported data file extension {ext or '(none)'!r}; supported: {', '.join(READABLE_EXTENSIONS)}"
        )
    if not path.is_file():
        raise ConfigError(f"{path}: data file not found; check the path (relative paths start at {Path.cwd()})")
    try:
        with path.open(encoding="utf-8-sig", newline="") as f:  # -sig: drops a byte-order mark (Excel's "CSV UTF-8")
            return _read_jsonl(f, path) if ext == ".jsonl" else _read_csv(f, path)
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save the file as UTF-8") from e


def read_json(path: str | Path) -> list[dict]:
    """The rows of a `.json` file: a JSON list of objects, or JSON lines (one object a line, as `.jsonl`).
    Raises ConfigError naming the file (and the item or line) for anything else."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # a leading byte-order mark is dropped
    except FileNotFoundError:
        raise ConfigError(f"{path}: data file not found; check the path") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save the file as UTF-8") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg != "Extra data":
            raise ConfigError(f"{path}:{e.lineno}: not valid JSON ({e.msg}, column {e.colno})") from e
        return _read_jsonl(text.splitlines(), path)  # JSON lines
    if not isinstance(data, list):
        raise ConfigError(
            f"{path}: holds one JSON {type(data).__name__}; a .json data file is a list of row objects or JSON lines "
            '(rows under a key, {"data": [...]}: save the list alone; a single row: name the file .jsonl)'
        )
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise ConfigError(
                f"{path}: item {i} is a {type(row).__name__}; a .json data file is a list of JSON objects"
            )
    return data


def _read_jsonl(f: Iterable[str], path: Path) -> list[dict]:
    rows = []
    for lineno, line in enumerate(f, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(
                f"{path}:{lineno}: not valid JSON ({e.msg}, column {e.colno}); "
                f"each line of a .jsonl file must be one JSON object"
            ) from e
        if not isinstance(row, dict):
            raise ConfigError(
                f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}; "
                f"each line of a .jsonl file must be one JSON object"
            ) from None
        rows.append(row)
    return rows


def _read_csv(f: Iterable[str], path: Path) -> list[dict]:
    reader = csv.reader(f)
    header = next(reader, None)
    if not header:
        raise ConfigError(f"{path}: empty CSV file; the first line must be a header row naming the columns")
    rows = []
    for record in reader:
        if not record:
            continue
        if len(record) != len(header):
            raise ConfigError(
                f"{path}:{reader.line_num}: {len(record)} fields but the header has {len(header)} "
                f"({', '.join(header)}); quote values that contain commas"
            )
        rows.append(dict(zip(header, record, strict=True)))
    return rows
