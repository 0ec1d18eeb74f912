"""A built-in task's rows as token ids and labels: classification rows, instruction/response pairs and chat
conversations, with the loss mask `task.train_on` asks for, truncated to `task.max_length` or packed (no torch).

    instruction/response   [bos] PROMPT.format(instruction=...) response [eos]; the loss covers the response and
                           its eos (`train_on: responses`, the default) or every token (`train_on: all`)
    chat (`messages`)      the tokenizer's chat template renders the conversation; the loss covers the assistant
                           turns (each turn's content and the template's end-of-turn tokens after it), or all tokens

An assistant turn's tokens are found by rendering the conversation up to the turn with the generation prompt
(where the turn starts) and up to the turn's end: every chat template that renders a prefix of a conversation as
a prefix of its rendering works (most do); one that does not is refused with a message. The text between is
tokenized piece by piece (masked, unmasked), so a token never straddles a mask boundary.

Packing (`task.packing`, training rows only) concatenates the examples, an eos between where an example does not
end with one, and cuts the stream into rows of `max_length` tokens, each token keeping its label; packed examples
attend to the ones before them in their row (plain concatenation, as most SFT packers do). Validation rows stay one
example a row, so a validation loss means the same with or without packing. An example with no label left within
`max_length` (a prompt longer than it) is left out, with a warning.

`CharTokenizer` is the character-level tokenizer of models built from a config (`{build: llama}`); its chat
format, in place of a chat template, is `<s>` then, for each message, `### {role}:\\n{content}` followed by `</s>`
for an assistant message and a newline otherwise; the generation prompt is `### assistant:\\n`.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from fl_plugins.errors import ConfigError
from fl_plugins.tasks.spec import TaskSpec

log = logging.getLogger(__name__)

PROMPT = "### Instruction:\n{instruction}\n### Response:\n"
IGNORE = -100  # the label the loss skips


class CharTokenizer:
    """A character-level tokenizer for models built from a config (no tokenizer to download). Its special tokens
    are recognised in text (`</s>` is the eos id), as a Hugging Face tokenizer's are."""

    def __init__(self) -> None:
        self.specials = ["<pad>", "<s>", "</s>", "<unk>"]
        chars = [chr(c) for c in range(32, 127)] + ["\n"]
        self.vocab = {t: i for i, t in enumerate(self.specials + chars)}
        self.pad_token_id, self.bos_token_id, self.eos_token_id, self.unk_token_id = 0, 1, 2, 3
        self._split = re.compile("(" + "|".join(re.escape(s) for s in self.specials) + ")")

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        out: list[int] = []
        for piece in self._split.split(text):
            if piece in self.specials:
                out.append(self.vocab[piece])
            else:
                out.extend(self.vocab.get(ch, self.unk_token_id) for ch in piece)
        return out

    def decode(self, ids: list[int]) -> str:
        inv = {i: t for t, i in self.vocab.items()}
        return "".join(inv[i] for i in ids if i >= len(self.specials))

    def apply_chat_template(
        self, conversation: list[dict], tokenize: bool = False, add_generation_prompt: bool = False
    ) -> str:
        """The conversation in this tokenizer's chat format (the module docstring); text only (`tokenize` False)."""
        if tokenize:
            raise ValueError("CharTokenizer.apply_chat_template renders text only; encode() the text")
        text = "<s>" + "".join(
            f"### {m['role']}:\n{m['content']}" + ("</s>" if m["role"] == "assistant" else "\n") for m in conversation
        )
        return text + ("### assistant:\n" if add_generation_prompt else "")


class Encoded:
    """A list of tokenized examples as a torch map-style dataset."""

    def __init__(self, items: list[dict]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def encode(spec: TaskSpec, tok: Any, rows: list[dict], *, pack: bool = False) -> Encoded:
    """`rows` (shares.py's roles) as model inputs with labels; `pack`: causal-lm rows packed (module docstring)."""
    if spec.type == "sequence-classification":
        enc = tok([r["text"] for r in rows], truncation=True, max_length=spec.max_length)
        return Encoded(
            [
                {"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i], "labels": r["label"]}
                for i, r in enumerate(rows)
            ]
        )
    examples = []
    for i, r in enumerate(rows):
        examples.append(
            chat_example(spec, tok, r["messages"], i) if "messages" in r else instruction_example(spec, tok, r)
        )
    if pack:
        return Encoded(packed(examples, spec.max_length, tok.eos_token_id, spec.train_on == "all"))
    return Encoded(truncated(examples, spec.max_length))


def instruction_example(spec: TaskSpec, tok: Any, row: dict) -> tuple[list[int], list[int]]:
    """(ids, labels) of one instruction/response pair, untruncated."""
    p_ids = token_ids(tok, PROMPT.format(instruction=row["instruction"]))
    r_ids = token_ids(tok, row["response"]) + ([tok.eos_token_id] if tok.eos_token_id is not None else [])
    ids = ([tok.bos_token_id] if tok.bos_token_id is not None else []) + p_ids + r_ids
    if spec.train_on == "all":
        return ids, list(ids)
    return ids, [IGNORE] * (len(ids) - len(r_ids)) + r_ids


def chat_example(spec: TaskSpec, tok: Any, messages: list[dict], row: int = 0) -> tuple[list[int], list[int]]:
    """(ids, labels) of one conversation rendered with the tokenizer's chat template, untruncated; the labels
    cover the assistant turns (`train_on: responses`) or every token."""
    if not isinstance(tok, CharTokenizer) and not getattr(tok, "chat_template", None):
        raise ConfigError(
            f"task.model's tokenizer ({type(tok).__name__}) has no chat template, so chat data (`messages`) cannot be "
            "rendered; use a model whose tokenizer has one (`chat_template` in tokenizer_config.json), or "
            "instruction/response columns (`task.columns`)"
        )

    def render(msgs: list[dict], gen: bool) -> str:
        try:
            return str(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen))
        except Exception as e:  # jinja's TemplateError and whatever a template raises
            raise ConfigError(f"row {row}: the tokenizer's chat template refused the messages: {e}") from e

    full = render(messages, False)
    if spec.train_on == "all":
        every = token_ids(tok, full)
        return every, list(every)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            head, upto = render(messages[:i], True) if i else "", render(messages[: i + 1], False)
            if not (upto.startswith(head) and full.startswith(upto)):
                raise ConfigError(
                    f"row {row}: the chat template does not render a conversation's beginning as the beginning of "
                    "its rendering, so the assistant turns cannot be found; set `task.train_on: all`"
                )
            spans.append((len(head), len(upto)))
    ids: list[int] = []
    labels: list[int] = []
    at = 0
    for start, end in [*spans, (len(full), len(full))]:
        masked, kept = token_ids(tok, full[at:start]), token_ids(tok, full[start:end])
        ids += masked + kept
        labels += [IGNORE] * len(masked) + kept
        at = end
    return ids, labels


def token_ids(tok: Any, text: str) -> list[int]:
    if not text:
        return []
    if isinstance(tok, CharTokenizer):
        return tok.encode(text)
    return list(tok(text, add_special_tokens=False)["input_ids"])


def _item(ids: list[int], labels: list[int]) -> dict:
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def _learns(labels: list[int]) -> bool:
    return any(x != IGNORE for x in labels[1:])  # the first token is never predicted


def truncated(examples: list[tuple[list[int], list[int]]], max_length: int) -> list[dict]:
    """One example a row, cut to `max_length` tokens; an example with no label left is left out (warned)."""
    items = [_item(ids[:max_length], labels[:max_length]) for ids, labels in examples]
    return _kept(items, len(examples), max_length)


def packed(examples: list[tuple[list[int], list[int]]], max_length: int, eos: int | None, all_: bool) -> list[dict]:
    """The examples concatenated (an eos between, labelled only with `all_`, where one does not end with eos) and
    cut into rows of `max_length` tokens, each token keeping its label; rows with no label are left out."""
    ids: list[int] = []
    labels: list[int] = []
    for x, y in examples:
        ids += x
        labels += y
        if eos is not None and x and x[-1] != eos:
            ids.append(eos)
            labels.append(eos if all_ else IGNORE)
    items = [_item(ids[i : i + max_length], labels[i : i + max_length]) for i in range(0, len(ids), max_length)]
    return _kept(items, len(examples), max_length)


def _kept(items: list[dict], n: int, max_length: int) -> list[dict]:
    kept = [it for it in items if _learns(it["labels"])]
    if not kept and items:
        raise ConfigError(
            f"none of the {n} examples has a response token within the first {max_length} tokens; raise "
            "`task.max_length` (or set `task.train_on: all`)"
        )
    if len(kept) < len(items):
        log.warning(
            "%d of %d rows have no response token within task.max_length=%d tokens; they are left out",
            len(items) - len(kept),
            len(items),
            max_length,
        )
    return kept
