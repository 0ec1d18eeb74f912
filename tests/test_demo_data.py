"""fl_plugins.tasks.demo_data: deterministic, balanced, varied demo data, learnable, not trivial; jsonl/csv reading."""

from __future__ import annotations

import csv
import re
from collections import Counter

import numpy as np
import pytest

from fl_plugins.errors import ConfigError
from fl_plugins.tasks.demo_data import (
    CAPITALS,
    INSTRUCTION_CATEGORIES,
    SENTIMENT_LABELS,
    financial_sentiment,
    instruction_pairs,
    read_rows,
    write_jsonl,
)

ROWS = financial_sentiment(3000, seed=0)


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+(?:-[a-z]+)*", text.lower())


@pytest.mark.parametrize("make", [financial_sentiment, instruction_pairs])
def test_deterministic_per_seed_and_seeds_differ(make):
    assert make(200, seed=7) == make(200, seed=7)
    assert make(200, seed=7) != make(200, seed=8)
    assert make(200) == make(200, seed=0)


@pytest.mark.parametrize("n", [0, 1, 2, 3, 100, 3001])
def test_classes_are_balanced(n):
    labels = Counter(r["label"] for r in financial_sentiment(n, seed=1))
    assert set(labels) <= {0, 1, 2} and sum(labels.values()) == n
    assert n < 3 or max(labels.values()) - min(labels.values()) <= 1
    cats = Counter(r["category"] for r in instruction_pairs(n, seed=1))
    assert set(cats) <= set(INSTRUCTION_CATEGORIES) and sum(cats.values()) == n
    assert n < len(INSTRUCTION_CATEGORIES) or max(cats.values()) - min(cats.values()) <= 1


def test_sentences_are_well_formed_and_varied():
    assert SENTIMENT_LABELS == ("negative", "neutral", "positive")
    assert all(set(r) == {"text", "label"} and isinstance(r["label"], int) for r in ROWS)
    lengths = [len(r["text"].split()) for r in ROWS]
    assert 8 <= min(lengths) and max(lengths) <= 40
    assert all(r["text"][0].isupper() and r["text"].endswith(".") for r in ROWS)
    duplicates = len(ROWS) - len({r["text"] for r in ROWS})
    assert duplicates / len(ROWS) <= 0.2


@pytest.mark.parametrize("word", ["sales", "profit", "net", "company", "order"])
def test_classes_share_vocabulary(word):
    classes_with_word = {r["label"] for r in ROWS if word in _words(r["text"])}
    assert classes_with_word == {0, 1, 2}


def _bag_of_words_accuracy(train: list[dict], test: list[dict]) -> float:
    """Softmax regression on binary unigram features, full-batch gradient descent."""
    vocab = {w: i for i, w in enumerate(sorted({w for r in train for w in _words(r["text"])}))}

    def features(rows):
        x = np.zeros((len(rows), len(vocab)))
        for i, r in enumerate(rows):
            x[i, [vocab[w] for w in _words(r["text"]) if w in vocab]] = 1.0
        return x, np.array([r["label"] for r in rows])

    (x, y), (x_test, y_test) = features(train), features(test)
    w, b, onehot = np.zeros((len(vocab), 3)), np.zeros(3), np.eye(3)[y]
    for _ in range(300):
        z = x @ w + b
        p = np.exp(z - z.max(1, keepdims=True))
        grad = (p / p.sum(1, keepdims=True) - onehot) / len(y)
        w -= x.T @ grad + 1e-3 * w
        b -= grad.sum(0)
    return float((np.argmax(x_test @ w + b, 1) == y_test).mean())


def test_sentiment_is_learnable_but_not_by_a_keyword_list():
    rows = financial_sentiment(3000, seed=1)
    accuracy = _bag_of_words_accuracy(rows[:2000], rows[2000:])
    print(f"bag-of-words logistic regression, 2000 train / 1000 held-out rows: accuracy {accuracy:.3f}")
    assert accuracy > 0.8
    good = {"rose", "increased", "jumped", "climbed", "grew", "improved", "surged", "up", "higher", "profit", "won"}
    bad = {"fell", "decreased", "dropped", "plunged", "declined", "weakened", "down", "loss", "lower", "cut", "failed"}

    def keyword_rule(text):
        ws = set(_words(text))
        return 2 if len(ws & good) > len(ws & bad) else 0 if len(ws & bad) > len(ws & good) else 1

    keyword_accuracy = np.mean([keyword_rule(r["text"]) == r["label"] for r in rows[2000:]])
    print(f"fixed keyword list: accuracy {keyword_accuracy:.3f}")
    assert keyword_accuracy < 0.85 and keyword_accuracy < accuracy - 0.1


def test_instruction_responses_are_correct():
    rows = instruction_pairs(500, seed=3)
    assert all(set(r) == {"instruction", "response", "category"} for r in rows)
    for r in rows:
        q, a = r["instruction"], r["response"]
        if r["category"] == "arithmetic":
            x, y = (int(v) for v in re.findall(r"\d+", q))
            assert int(a) == (x + y if ("plus" in q or "Add" in q or "+" in q) else (y - x if "from" in q else x - y))
            assert int(a) >= 0
        elif r["category"] == "capital":
            assert a == next(CAPITALS[c] for c in CAPITALS if f" {c}?" in q or f" {c}." in q)
        elif r["category"] == "reverse":
            assert a.split() == q.split(": ", 1)[1].split()[::-1]
        elif r["category"] == "sort":
            assert a.split() == [str(v) for v in sorted(int(v) for v in q.split(": ", 1)[1].split())]
        else:
            assert a == q.split(": ", 1)[1].upper()


def test_jsonl_round_trip(tmp_path):
    rows = financial_sentiment(30) + [{"text": 'Ünïcode, "quotes" and\nnewlines', "label": 1}]
    path = write_jsonl(rows, tmp_path / "sub" / "data.jsonl")
    assert read_rows(path) == rows
    assert read_rows(str(path)) == rows


def test_csv_round_trip(tmp_path):
    rows = instruction_pairs(30) + [{"instruction": 'a, "b"\nc', "response": "Ü", "category": "x"}]
    path = tmp_path / "data.csv"
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["instruction", "response", "category"])
        writer.writeheader()
        writer.writerows(rows)
    assert read_rows(path) == rows
    sentiment = financial_sentiment(5)
    with path.open("w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows([["text", "label"]] + [[r["text"], r["label"]] for r in sentiment])
    assert read_rows(path) == [{"text": r["text"], "label": str(r["label"])} for r in sentiment]  # CSV has no types


def test_read_errors_name_the_file_and_the_fix(tmp_path):
    with pytest.raises(ConfigError, match=r"missing\.jsonl: data file not found"):
        read_rows(tmp_path / "missing.jsonl")
    (tmp_path / "data.txt").write_text("hello\n")
    with pytest.raises(ConfigError, match=r"data\.txt: unsupported data file extension '\.txt'; supported: \.csv"):
        read_rows(tmp_path / "data.txt")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok", "label": 0}\n\n{"text": "broken", \n')
    with pytest.raises(ConfigError, match=r"bad\.jsonl:3: not valid JSON .*one JSON object"):
        read_rows(bad)
    bad.write_text('{"text": "ok", "label": 0}\n[1, 2]\n')
    with pytest.raises(ConfigError, match=r"bad\.jsonl:2: expected a JSON object, got list"):
        read_rows(bad)
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("text,label\nfine,1\ntoo,many,fields\n")
    with pytest.raises(ConfigError, match=r"bad\.csv:3: 3 fields but the header has 2 \(text, label\)"):
        read_rows(bad_csv)
    bad_csv.write_text("")
    with pytest.raises(ConfigError, match=r"bad\.csv: empty CSV file"):
        read_rows(bad_csv)
    bad.write_bytes(b'{"text": "\xff"}\n')
    with pytest.raises(ConfigError, match=r"bad\.jsonl: not UTF-8"):
        read_rows(bad)


@pytest.mark.parametrize("n", [-1, 2.5, "10", True])
def test_bad_n_is_a_config_error(n):
    with pytest.raises(ConfigError, match=r"n must be an integer >= 0"):
        financial_sentiment(n)
    with pytest.raises(ConfigError, match=r"n must be an integer >= 0"):
        instruction_pairs(n)
