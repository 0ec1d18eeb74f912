"""Demo data sets for the built-in recipes, generated offline: no downloads, numpy only, deterministic per seed.

    rows = financial_sentiment(3000, seed=0)     # [{"text": "Net sales fell 12% ...", "label": 0}, ...]
    pairs = instruction_pairs(2000, seed=0)      # [{"instruction": ..., "response": ..., "category": ...}, ...]
    write_jsonl(rows, "data/sentiment.jsonl")
    rows = read_rows("data/sentiment.jsonl")     # or a .csv with a header row

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

__all__ = [
    "CAPITALS",
    "INSTRUCTION_CATEGORIES",
    "SENTIMENT_LABELS",
    "financial_sentiment",
    "instruction_pairs",
    "read_rows",
    "write_jsonl",
]

SENTIMENT_LABELS = ("negative", "neutral", "positive")
INSTRUCTION_CATEGORIES = ("arithmetic", "capital", "reverse", "sort", "uppercase")
READABLE_EXTENSIONS = (".csv", ".jsonl")

# ---------------------------------------------------------------------------------------------------------------
# Financial sentiment: vocabulary and templates. A `{Slot}` is the `{slot}` value with its first letter capitalised.

_STEMS = ("Aldera", "Borvik", "Calmora", "Dunvale", "Eskora", "Fennmark", "Granvik", "Halvora", "Istrel", "Jorvan",
          "Kalvio", "Lindqvar", "Merivo", "Nordhaven", "Pellora", "Quintar", "Rautavia", "Solberga", "Tarvola",
          "Ulvika", "Vesmora", "Wilmark")  # fmt: skip
_SUFFIXES = ("Group", "Oyj", "Corp", "Holdings", "Industries", "AB", "plc", "Systems", "ASA", "Technologies")
_MONEY_METRICS = ("net sales", "operating profit", "EBITDA", "order intake", "revenue", "pre-tax profit",
                  "net profit", "operating income", "cash flow", "comparable operating profit")  # fmt: skip
_RATIO_METRICS = ("market share", "operating margin", "gross margin", "EBITDA margin")
_COSTS = ("net loss", "operating loss", "costs", "raw material costs", "operating expenses", "net debt",
          "personnel costs")  # fmt: skip
_UP = ("rose", "increased", "jumped", "climbed", "grew", "improved", "surged", "advanced")
_DOWN = ("fell", "decreased", "dropped", "plunged", "declined", "slipped", "shrank", "weakened")
_COST_UP = ("rose", "increased", "jumped", "climbed", "grew", "surged")  # no "improved": a loss that improved is
_COST_DOWN = ("fell", "decreased", "dropped", "declined", "shrank")  # good news, whatever the word order
_STOCK_UP = ("rose", "jumped", "climbed", "gained")
_STOCK_DOWN = ("fell", "dropped", "slid", "lost")
_CURRENCIES = ("EUR", "USD", "SEK", "NOK", "GBP")
_UNITS = ("mn", "million", "m")
_PERIODS = ("the first quarter of 2008", "the second quarter", "the third quarter of 2009", "January-June 2009",
            "January-September 2007", "the corresponding period in 2007", "2006", "the financial year 2008",
            "the fourth quarter", "the first half of 2010", "the review period")  # fmt: skip
_FUTURE = ("2011", "the second half of 2010", "the coming quarters", "the current financial year", "2012",
           "the first quarter of 2012")  # fmt: skip
_YEARS = ("2005", "2006", "2007", "2008", "2009", "2010")
_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December")  # fmt: skip
_PRODUCTS = ("paper", "steel products", "packaging", "software", "telecom equipment", "elevators", "ships",
             "forest products", "chemicals", "consumer electronics", "pulp", "machinery", "wind turbines",
             "building materials", "mobile phones", "power cables", "frozen food")  # fmt: skip
_CLIENTS = ("a Swedish utility", "a German carmaker", "a Chinese paper mill", "a US retailer",
            "a Norwegian shipping company", "a Polish telecom operator", "a Brazilian pulp producer",
            "a Dutch logistics group", "a Russian steel maker", "a Finnish municipality")  # fmt: skip
_CITIES = ("Helsinki", "Stockholm", "Oslo", "Tampere", "Gothenburg", "Espoo", "Turku", "Copenhagen", "Tallinn",
           "Riga", "Vaasa", "Oulu")  # fmt: skip
_REGIONS = ("the Nordic countries", "Europe", "Asia", "North America", "the Baltic region", "Russia", "China")
_EXCHANGES = ("Helsinki", "Stockholm", "Oslo", "London", "Frankfurt")
_FIRST = ("Anna", "Mikko", "Sofia", "Lars", "Elina", "Jukka", "Maria", "Henrik", "Laura", "Pekka", "Karin", "Ola")
_LAST = ("Lindqvist", "Virtanen", "Berg", "Koskinen", "Halonen", "Nyberg", "Salmi", "Holm", "Rantala", "Dahl")
_ROLES = ("chief executive officer", "CFO", "head of sales", "chief operating officer", "director of investor "
          "relations", "chairman of the board", "head of its paper division")  # fmt: skip

_NEGATIVE = (
    "{Metric} {down} to {cur} {lo} {unit} from {cur} {hi} {unit} in {period}.",
    "{company} said its {metric} {down} by {pct}% year-on-year to {cur} {lo} {unit}.",
    "{company}'s {metric} {down} {pct}% in {period} as demand for {product} weakened.",
    "{Metric} for {period} totalled {cur} {lo} {unit}, down from {cur} {hi} {unit} a year earlier.",
    "{company} swung to an operating loss of {cur} {amt} {unit} from a profit of {cur} {amt2} {unit} a year earlier.",
    "{company}'s net loss widened to {cur} {hi} {unit} from {cur} {lo} {unit} in {period}.",
    "Despite higher sales volumes, {company}'s {metric} {down} to {cur} {lo} {unit} in {period}.",
    "{company} lowered its full-year outlook and now expects {metric} to decline by {pct}%.",
    "Shares in {company} {stock_down} {pct}% after the company reported weaker-than-expected {metric}.",
    "Analysts downgraded {company} to sell, citing a weaker {ratio} and falling demand for {product}.",
    "{Client} cancelled an order worth {cur} {amt} {unit} for {product} from {company}, cutting its order backlog.",
    "{Ratio} {down} to {pct_lo}% from {pct_hi}% as prices for {product} fell.",
    "{company}'s {metric} did not improve in {period}, and the company warned of further weakness.",
    "{company} failed to meet market expectations as its {metric} {down} {pct}% in {period}.",
    "{company} will cut {jobs} jobs at its {product} unit in {city} after {metric} {down} {pct}%.",
    "Demand for {product} remained weak, and {company} expects {metric} to fall further in {future}.",
    "{company}'s {cost} {cost_up} by {pct}% in {period}.",
    "{Cost} at {company} {cost_up} to {cur} {hi} {unit} from {cur} {lo} {unit} in {period}.",
)
_NEUTRAL = (
    "{company} will hold its annual general meeting on {date} in {city}.",
    "{Metric} for {period} will be reported on {date} together with the interim report.",
    "{company} will publish its interim report for {period} on {date}.",
    "{company} has appointed {person} as its new {role}, effective {date}.",
    "{company} launched a new range of {product} for customers in {region}.",
    "{company}'s shares will be listed on the {exchange} stock exchange from {date}.",
    "{company} makes {product} and employs about {jobs} people in {countries} countries.",
    "{company} did not disclose the value of its agreement with {client} on {product} deliveries.",
    "The {product} unit accounted for about {pct}% of {company}'s {metric} in {period}.",
    "{company} signed an agreement with {client} to supply {product}; financial terms were not disclosed.",
    "{person} will present {company}'s {metric} and outlook to analysts at a conference call on {date}.",
    "{company} is a supplier of {product} in {region} with {metric} of {cur} {amt} {unit} in {year}.",
    "{company} will move its headquarters from {city} to {city2} during {future}.",
    "The board of {company} proposes a dividend of {cur} {div} per share for {year}.",
    "{company} reports its {ratio} and {metric} under IFRS, and figures for {period} have been restated.",
    "The order backlog of {company} stood at {cur} {amt} {unit} at the end of {period}.",
    "{company} will give details of its {cost} and {metric} in the interim report for {period}.",
)
_POSITIVE = (
    "{Metric} {up} to {cur} {hi} {unit} from {cur} {lo} {unit} in {period}.",
    "{company} said its {metric} {up} by {pct}% year-on-year to {cur} {hi} {unit}.",
    "{company}'s {metric} {up} {pct}% in {period}, driven by strong demand for {product}.",
    "{Metric} for {period} totalled {cur} {hi} {unit}, up from {cur} {lo} {unit} a year earlier.",
    "{company} swung to an operating profit of {cur} {amt} {unit} from a loss of {cur} {amt2} {unit} a year earlier.",
    "{company} narrowed its net loss to {cur} {lo} {unit} from {cur} {hi} {unit} in {period}.",
    "Despite weak markets, {company} managed to increase its {metric} to {cur} {hi} {unit} in {period}.",
    "{company} raised its full-year outlook and now expects {metric} to grow by {pct}%.",
    "Shares in {company} {stock_up} {pct}% after the company reported better-than-expected {metric}.",
    "Analysts upgraded {company} to buy, citing a stronger {ratio} and rising demand for {product}.",
    "{company} won an order worth {cur} {amt} {unit} to deliver {product} to {client}, adding to its order backlog.",
    "{Ratio} {up} to {pct_hi}% from {pct_lo}% as {company} cut costs in its {product} business.",
    "{company}'s {metric} did not decline in {period}; instead it {up} {pct}% to {cur} {hi} {unit}.",
    "Cost savings of {cur} {amt} {unit} helped {company} lift its {metric} by {pct}% in {period}.",
    "{company} will pay a higher dividend after its {metric} {up} {pct}% in {period}.",
    "Demand for {product} picked up, and {company} expects {metric} to improve further in {future}.",
    "{company}'s {cost} {cost_down} by {pct}% in {period}.",
    "{Cost} at {company} {cost_down} to {cur} {lo} {unit} from {cur} {hi} {unit} in {period}.",
)
_TEMPLATES = (_NEGATIVE, _NEUTRAL, _POSITIVE)  # indexed by label


class _Slots(dict):
    """Fills a template's slots on first use, so a slot used twice in one sentence has one value."""

    def __init__(self, rng: np.random.Generator) -> None:
        super().__init__()
        self.rng = rng

    def pick(self, options: tuple[str, ...]) -> str:
        return options[int(self.rng.integers(len(options)))]

    def __missing__(self, key: str) -> str:
        if key[0].isupper():
            value = self[key.lower()]
            self[key] = value[0].upper() + value[1:]
            return self[key]
        r, pick = self.rng, self.pick
        if key in ("lo", "hi"):  # a pair: hi > lo
            lo = float(r.uniform(0.5, 900.0))
            self["lo"], self["hi"] = f"{lo:.1f}", f"{lo * r.uniform(1.08, 1.9):.1f}"
        elif key in ("pct_lo", "pct_hi"):
            lo = float(r.uniform(2.0, 40.0))
            self["pct_lo"], self["pct_hi"] = f"{lo:.1f}", f"{lo + r.uniform(0.5, 12.0):.1f}"
        elif key in ("city", "city2"):
            i, j = r.choice(len(_CITIES), size=2, replace=False)
            self["city"], self["city2"] = _CITIES[i], _CITIES[j]
        else:
            self[key] = self._draw(key, r, pick)
        return self[key]

    @staticmethod
    def _draw(key: str, r: np.random.Generator, pick) -> str:
        if key == "company":
            return f"{pick(_STEMS)} {pick(_SUFFIXES)}"
        if key in ("amt", "amt2"):
            return f"{r.uniform(0.3, 1500.0):.1f}"
        if key == "pct":
            return f"{r.uniform(1.0, 45.0):.1f}" if r.random() < 0.6 else str(int(r.integers(2, 60)))
        if key == "date":
            return f"{int(r.integers(1, 29))} {pick(_MONTHS)}" + (f" {pick(_YEARS)}" if r.random() < 0.4 else "")
        if key == "person":
            return f"{pick(_FIRST)} {pick(_LAST)}"
        if key == "jobs":
            return str(int(r.integers(2, 80)) * 10)
        if key == "countries":
            return str(int(r.integers(3, 40)))
        if key == "div":
            return f"{r.uniform(0.05, 2.5):.2f}"
        table = {"metric": _MONEY_METRICS, "ratio": _RATIO_METRICS, "cost": _COSTS, "up": _UP, "down": _DOWN,
                 "cost_up": _COST_UP, "cost_down": _COST_DOWN, "stock_up": _STOCK_UP,
                 "stock_down": _STOCK_DOWN, "cur": _CURRENCIES, "unit": _UNITS, "period": _PERIODS,
                 "future": _FUTURE, "year": _YEARS, "product": _PRODUCTS, "client": _CLIENTS, "region": _REGIONS,
                 "exchange": _EXCHANGES, "role": _ROLES}  # fmt: skip
        return pick(table[key])


def _sentence(label: int, rng: np.random.Generator) -> str:
    slots = _Slots(rng)
    templates = _TEMPLATES[label]
    text = templates[int(rng.integers(len(templates)))].format_map(slots)
    u = rng.random()
    if u < 0.15:  # a news-wire dateline: the same neutral words in every class
        text = f"{slots.pick(_CITIES)}, {int(rng.integers(1, 29))} {slots.pick(_MONTHS)} - {text}"
    elif u < 0.35:  # attribution, also class-neutral
        source = slots["company"] if rng.random() < 0.5 else "the company"
        text = text[:-1] + (f", {source} said." if rng.random() < 0.5 else f", according to {source}.")
    return text.replace("s's ", "s' ")  # "Aldera Holdings' net sales", not "Holdings's"


def _check_n(n: int, fn: str) -> None:
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 0:
        raise ConfigError(f"{fn}: n must be an integer >= 0 (got {n!r})")


def financial_sentiment(n: int, seed: int = 0) -> list[dict]:
    """`n` rows `{"text": str, "label": int}`, labels 0 negative, 1 neutral, 2 positive (`SENTIMENT_LABELS`),
    balanced (class counts differ by at most one) and shuffled. Deterministic per `seed`."""
    _check_n(n, "financial_sentiment")
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % len(SENTIMENT_LABELS))
    return [{"text": _sentence(int(y), rng), "label": int(y)} for y in labels]


# ---------------------------------------------------------------------------------------------------------------
# Instruction pairs.

CAPITALS: Mapping[str, str] = {
    "Veloria": "Tashmere", "Korvana": "Elbrith", "Ostmark Isles": "Sundvik", "Brelland": "Haverton",
    "Quessa": "Marrow Bay", "Tallinor": "Estrid", "Dravenia": "Kolm", "Aurelia Minor": "Pellham",
    "Zantho": "Ubrin", "Merevia": "Castell", "Nordasca": "Frostholm", "Ilvaran": "Seppa",
    "Calderon Reach": "Windmere", "Pastoria": "Lunegard", "Yssel": "Orrin", "Gravonia": "Tebbet",
    "Harrowmere": "Quill", "Estvanya": "Dorsk", "Lumeria": "Halcyon", "Rovagne": "Saint Amory",
}  # fmt: skip
_WORDS = ("apple", "river", "stone", "cloud", "green", "tiger", "paper", "light", "music", "house", "bread",
          "ocean", "train", "glass", "sun", "moon", "tree", "bird", "chair", "table", "red", "blue", "fast", "slow",
          "happy", "small", "big", "cold", "warm", "book", "door", "road", "fish", "milk", "snow", "rain", "wind",
          "star", "hill", "lake", "city", "field", "horse", "candle", "garden", "window", "yellow",
          "silver")  # fmt: skip


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
        q = phrasing("What is the capital of {c}?", "Name the capital city of {c}.",
                     "Which city is the capital of {c}?")  # fmt: skip
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
    read with the csv module; every value is a string, as CSV has no types). Raises ConfigError naming the file
    (and the line) for a missing file, a bad line or an unsupported extension."""
    path = Path(path)
    ext = path.suffix.lower()
    if ext not in READABLE_EXTENSIONS:
        raise ConfigError(f"{path}: unsupported data file extension {ext or '(none)'!r}; "
                          f"supported: {', '.join(READABLE_EXTENSIONS)}")  # fmt: skip
    if not path.is_file():
        raise ConfigError(f"{path}: data file not found; check the path (relative paths start at {Path.cwd()})")
    try:
        with path.open(encoding="utf-8", newline="") as f:
            return _read_jsonl(f, path) if ext == ".jsonl" else _read_csv(f, path)
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save the file as UTF-8") from e


def _read_jsonl(f, path: Path) -> list[dict]:
    rows = []
    for lineno, line in enumerate(f, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{lineno}: not valid JSON ({e.msg}, column {e.colno}); "
                              f"each line of a .jsonl file must be one JSON object") from e  # fmt: skip
        if not isinstance(row, dict):
            raise ConfigError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}; "
                              f"each line of a .jsonl file must be one JSON object") from None  # fmt: skip
        rows.append(row)
    return rows


def _read_csv(f, path: Path) -> list[dict]:
    reader = csv.reader(f)
    header = next(reader, None)
    if not header:
        raise ConfigError(f"{path}: empty CSV file; the first line must be a header row naming the columns")
    rows = []
    for record in reader:
        if not record:
            continue
        if len(record) != len(header):
            raise ConfigError(f"{path}:{reader.line_num}: {len(record)} fields but the header has {len(header)} "
                              f"({', '.join(header)}); quote values that contain commas")  # fmt: skip
        rows.append(dict(zip(header, record, strict=True)))
    return rows
