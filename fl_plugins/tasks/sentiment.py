"""The financial-sentiment demo sentences (demo_data.financial_sentiment): vocabulary, templates, and
`sentence(label, rng)`.

All templates were written for this module; the company names are made up. The three classes share their
vocabulary (the same metrics, amounts and periods appear in every class: "Net sales will be reported on ..." is
neutral), and some templates turn on negation, contrast or what moved ("despite", "did not improve", "costs fell"
is good news, "profit fell" bad), so no keyword list decides the label.

A template's `{slot}` is drawn once per sentence; a `{Slot}` is the `{slot}` value with its first letter capitalised.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

_STEMS = (
    "Aldera",
    "Borvik",
    "Calmora",
    "Dunvale",
    "Eskora",
    "Fennmark",
    "Granvik",
    "Halvora",
    "Istrel",
    "Jorvan",
    "Kalvio",
    "Lindqvar",
    "Merivo",
    "Nordhaven",
    "Pellora",
    "Quintar",
    "Rautavia",
    "Solberga",
    "Tarvola",
    "Ulvika",
    "Vesmora",
    "Wilmark",
)
_SUFFIXES = ("Group", "Oyj", "Corp", "Holdings", "Industries", "AB", "plc", "Systems", "ASA", "Technologies")
_MONEY_METRICS = (
    "net sales",
    "operating profit",
    "EBITDA",
    "order intake",
    "revenue",
    "pre-tax profit",
    "net profit",
    "operating income",
    "cash flow",
    "comparable operating profit",
)
_RATIO_METRICS = ("market share", "operating margin", "gross margin", "EBITDA margin")
_COSTS = (
    "net loss",
    "operating loss",
    "costs",
    "raw material costs",
    "operating expenses",
    "net debt",
    "personnel costs",
)
_UP = ("rose", "increased", "jumped", "climbed", "grew", "improved", "surged", "advanced")
_DOWN = ("fell", "decreased", "dropped", "plunged", "declined", "slipped", "shrank", "weakened")
_COST_UP = ("rose", "increased", "jumped", "climbed", "grew", "surged")  # no "improved": a loss that improved is
_COST_DOWN = ("fell", "decreased", "dropped", "declined", "shrank")  # good news, whatever the word order
_STOCK_UP = ("rose", "jumped", "climbed", "gained")
_STOCK_DOWN = ("fell", "dropped", "slid", "lost")
_CURRENCIES = ("EUR", "USD", "SEK", "NOK", "GBP")
_UNITS = ("mn", "million", "m")
_PERIODS = (
    "the first quarter of 2008",
    "the second quarter",
    "the third quarter of 2009",
    "January-June 2009",
    "January-September 2007",
    "the corresponding period in 2007",
    "2006",
    "the financial year 2008",
    "the fourth quarter",
    "the first half of 2010",
    "the review period",
)
_FUTURE = (
    "2011",
    "the second half of 2010",
    "the coming quarters",
    "the current financial year",
    "2012",
    "the first quarter of 2012",
)
_YEARS = ("2005", "2006", "2007", "2008", "2009", "2010")
_MONTHS = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)
_PRODUCTS = (
    "paper",
    "steel products",
    "packaging",
    "software",
    "telecom equipment",
    "elevators",
    "ships",
    "forest products",
    "chemicals",
    "consumer electronics",
    "pulp",
    "machinery",
    "wind turbines",
    "building materials",
    "mobile phones",
    "power cables",
    "frozen food",
)
_CLIENTS = (
    "a Swedish utility",
    "a German carmaker",
    "a Chinese paper mill",
    "a US retailer",
    "a Norwegian shipping company",
    "a Polish telecom operator",
    "a Brazilian pulp producer",
    "a Dutch logistics group",
    "a Russian steel maker",
    "a Finnish municipality",
)
_CITIES = (
    "Helsinki",
    "Stockholm",
    "Oslo",
    "Tampere",
    "Gothenburg",
    "Espoo",
    "Turku",
    "Copenhagen",
    "Tallinn",
    "Riga",
    "Vaasa",
    "Oulu",
)
_REGIONS = ("the Nordic countries", "Europe", "Asia", "North America", "the Baltic region", "Russia", "China")
_EXCHANGES = ("Helsinki", "Stockholm", "Oslo", "London", "Frankfurt")
_FIRST = ("Anna", "Mikko", "Sofia", "Lars", "Elina", "Jukka", "Maria", "Henrik", "Laura", "Pekka", "Karin", "Ola")
_LAST = ("Lindqvist", "Virtanen", "Berg", "Koskinen", "Halonen", "Nyberg", "Salmi", "Holm", "Rantala", "Dahl")
_ROLES = (
    "chief executive officer",
    "CFO",
    "head of sales",
    "chief operating officer",
    "director of investor relations",
    "chairman of the board",
    "head of its paper division",
)

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
    def _draw(key: str, r: np.random.Generator, pick: Callable[[tuple[str, ...]], str]) -> str:
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
        table = {
            "metric": _MONEY_METRICS,
            "ratio": _RATIO_METRICS,
            "cost": _COSTS,
            "up": _UP,
            "down": _DOWN,
            "cost_up": _COST_UP,
            "cost_down": _COST_DOWN,
            "stock_up": _STOCK_UP,
            "stock_down": _STOCK_DOWN,
            "cur": _CURRENCIES,
            "unit": _UNITS,
            "period": _PERIODS,
            "future": _FUTURE,
            "year": _YEARS,
            "product": _PRODUCTS,
            "client": _CLIENTS,
            "region": _REGIONS,
            "exchange": _EXCHANGES,
            "role": _ROLES,
        }
        return pick(table[key])


def sentence(label: int, rng: np.random.Generator) -> str:
    """One financial-news-like sentence of class `label` (0 negative, 1 neutral, 2 positive), drawn from `rng`."""
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
