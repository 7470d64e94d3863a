"""Eval records as items: the conversation up to the last answer (the prompt) and that answer.

The records are read exactly as training reads them (`tuneforge.data.records`: the same
formats, `columns:` mapping and errors). A conversation's last assistant message is the
reference; every message before it is the prompt. The whole sample is kept for the
likelihood metric, which scores every trained token as training would.
"""

from __future__ import annotations

from dataclasses import dataclass

from tuneforge.data.records import Message, Sample, read_samples
from tuneforge.errors import UserError


@dataclass
class EvalItem:
    index: int  # position in the data file(s)
    prompt: list[Message]  # what the model sees
    reference: str  # the answer it should give
    sample: Sample  # the whole record, for the likelihood metric


def parse_columns(text: str | None) -> dict[str, str]:
    """`"instruction=question,output=answer"` -> {"instruction": "question", "output": "answer"}."""
    if not text:
        return {}
    columns = {}
    for item in text.split(","):
        ours, sep, theirs = item.partition("=")
        if not sep or not ours.strip() or not theirs.strip():
            raise UserError(f"--columns: {item!r} is not OURS=YOURS", hint="e.g. --columns instruction=question,output=answer")
        columns[ours.strip()] = theirs.strip()
    return columns


def to_item(index: int, sample: Sample) -> EvalItem:
    messages = sample.messages or []
    last = max((i for i, m in enumerate(messages) if m.role == "assistant"), default=None)
    if last is None:
        return EvalItem(index, [], "", sample)
    return EvalItem(index, messages[:last], messages[last].content, sample)


def read_items(path: str, fmt: str, columns: dict[str, str] | None = None, limit: int | None = None,
               system: str | None = None) -> list[EvalItem]:
    """The first `limit` records of `path` as EvalItems."""
    samples = read_samples(path, fmt, columns or {}, system)
    if limit is not None:
        samples = samples[:limit]
    if not samples:
        raise UserError(f"{path} holds no records to evaluate")
    return [to_item(i, s) for i, s in enumerate(samples)]


def check_generation_items(items: list[EvalItem], path: str) -> None:
    """A generation metric needs a prompt and a reference in every record."""
    for item in items:
        if item.sample.text is not None or not item.prompt:
            raise UserError(f"{path}: record {item.index + 1} has no user prompt before an assistant answer",
                            hint="generation metrics need chat records (e.g. --format alpaca); plain text: --metric loss")
