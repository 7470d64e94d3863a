"""Answer extraction and correctness for the generation metrics of `tuneforge eval`.

- `gsm8k`: the number after `####`, else the last number in the text; compared as numbers
  (thousands separators, `$`, trailing zeros after a decimal point do not matter);
- `exact`: normalised exact match (case, surrounding whitespace and punctuation, runs of spaces);
- `regex`: the first group of a user pattern, found in the generation (and in the reference;
  a reference it does not match is taken whole); compared normalised;
- `contains`: the normalised reference occurs in the normalised generation.
`Scorer(metric, pattern)` holds the choice; `scorer.score(generation, reference)` returns
`(extracted, expected, correct)`.
Likelihood (`loss`) lives in `tuneforge.eval.likelihood`. Reward accuracy on preference pairs
(`chosen` scored above `rejected`) belongs beside it and is not implemented here.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

from tuneforge.errors import UserError

GENERATION_METRICS = ("gsm8k", "exact", "regex", "contains")
METRICS = GENERATION_METRICS + ("loss",)

_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?|-?\$?\.\d+")
_AFTER_HASHES = re.compile(r"####\s*(" + _NUMBER.pattern + ")")


def parse_number(text: str | None) -> Decimal | None:
    """`"1,234.50"` -> Decimal('1234.50'); None for anything that is not a number."""
    if text is None:
        return None
    cleaned = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    return value if value.is_finite() else None


def extract_gsm8k(text: str) -> str | None:
    """The answer of a GSM8K-style solution: the number after `####`, else the last number."""
    found = _AFTER_HASHES.search(text)
    if found:
        return found.group(1)
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def normalize(text: str) -> str:
    return " ".join(text.lower().split()).strip(" .,;:!?\"'")


class Scorer:
    """Extraction and comparison for one generation metric."""

    def __init__(self, metric: str, pattern: str | None = None):
        if metric not in GENERATION_METRICS:
            raise UserError(f"unknown generation metric {metric!r}", hint=f"use one of {', '.join(GENERATION_METRICS)}")
        self.metric = metric
        self.pattern = None
        if metric == "regex":
            if not pattern:
                raise UserError("--metric regex needs --pattern REGEX (with one group: the answer)")
            try:
                self.pattern = re.compile(pattern)
            except re.error as exc:
                raise UserError(f"--pattern {pattern!r} is not a valid regular expression: {exc}") from None
            if self.pattern.groups != 1:
                raise UserError(f"--pattern {pattern!r} has {self.pattern.groups} groups; it needs exactly one",
                                hint="wrap the answer in (...) and use (?:...) for other groups")

    def _regex(self, text: str) -> str | None:
        found = self.pattern.search(text)
        return found.group(1) if found else None

    def score(self, generation: str, reference: str) -> tuple[str | None, str | None, bool]:
        """(answer extracted from the generation, expected answer, correct)."""
        if self.metric == "gsm8k":
            got, want = extract_gsm8k(generation), extract_gsm8k(reference)
            a, b = parse_number(got), parse_number(want)
            return got, want, a is not None and b is not None and a == b
        if self.metric == "exact":
            return generation.strip(), reference.strip(), normalize(generation) == normalize(reference)
        if self.metric == "contains":
            want = normalize(reference)
            return generation.strip(), reference.strip(), bool(want) and want in normalize(generation)
        got = self._regex(generation)
        want = self._regex(reference)
        want = reference.strip() if want is None else want
        return got, want, got is not None and normalize(got) == normalize(want)
