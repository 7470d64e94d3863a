"""Reading dataset files and turning each record into a conversation or a plain text.

Owns the on-disk formats (`alpaca`, `openai`, `sharegpt`, `xtuner`, `text`), the per-dataset
`columns:` mapping, and the file/line-precise errors for bad records. Output is a list of
`Sample`s; nothing here knows about tokenizers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from itertools import chain
from typing import Iterator, Optional

from tuneforge.errors import DataError

CHAT_FORMATS = ("alpaca", "openai", "sharegpt", "xtuner")
FORMATS = CHAT_FORMATS + ("text", "internevo")
ROLES = ("system", "user", "assistant")


@dataclass(slots=True)
class Message:
    role: str  # system | user | assistant
    content: str
    loss: Optional[bool] = None  # None = default (assistant trained, others not)

    @property
    def trained(self) -> bool:
        return self.role == "assistant" if self.loss is None else self.loss


@dataclass(slots=True)
class Sample:
    """One training example: a conversation (`messages`) or a raw `text`."""

    messages: Optional[list[Message]] = None
    text: Optional[str] = None


def _hidden(relative: Path) -> bool:
    """A dot-file, or a file inside a dot-folder (`.ipynb_checkpoints/`, `.git/`): never data."""
    return any(part.startswith(".") for part in relative.parts)


MISSING_HINT = "paths in a config file are relative to the file, paths on the command line to the working directory"


def data_files(path: str | Path, suffixes=(".json", ".jsonl")) -> list[Path]:
    """The files behind a dataset path: the file itself, or a folder's files (dot-entries skipped), sorted."""
    root = Path(path)
    if root.is_file():
        return [root]
    if root.is_dir():
        files = sorted(p for p in root.rglob("*")
                       if p.is_file() and p.suffix in suffixes and not _hidden(p.relative_to(root)))
        if not files:
            raise DataError(f"folder {root} holds no {'/'.join(suffixes)} files (dot-files and dot-folders are skipped)")
        return files
    raise DataError(f"data file not found: {root}", hint=MISSING_HINT)


BOM = "\ufeff"
NOT_UTF8_HINT = "save the file as UTF-8, e.g. `iconv -f latin1 -t utf-8 FILE > NEW`"


def _not_utf8(file: Path, line: int, raw: bytes, exc: UnicodeDecodeError) -> DataError:
    return DataError(f"not UTF-8: byte 0x{raw[exc.start]:02x} at byte {exc.start + 1} of the line",
                     where=f"{file}:{line}", hint=NOT_UTF8_HINT)


def _lines(file: Path) -> Iterator[tuple[int, str]]:
    """(1-based number, text) of each line of a UTF-8 file; a leading BOM is dropped."""
    with file.open("rb") as handle:
        for number, raw in enumerate(handle, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise _not_utf8(file, number, raw, exc) from None
            yield number, line.removeprefix(BOM) if number == 1 else line


def _read_text(file: Path) -> str:
    raw = file.read_bytes()
    try:
        return raw.decode("utf-8").removeprefix(BOM)
    except UnicodeDecodeError as exc:
        start = raw.rfind(b"\n", 0, exc.start) + 1
        line_exc = UnicodeDecodeError(exc.encoding, exc.object, exc.start - start, exc.end - start, exc.reason)
        raise _not_utf8(file, raw.count(b"\n", 0, exc.start) + 1, raw[start:], line_exc) from None


def _jsonl_records(file: Path, lines, hint: str | None = None) -> Iterator[tuple[str, object]]:
    for number, line in lines:
        if not line.strip():
            continue
        try:
            yield f"{file}:{number}", json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"malformed JSON ({exc.msg} at column {exc.colno})", where=f"{file}:{number}",
                            hint=hint) from None


def _array_records(file: Path, records) -> Iterator[tuple[str, object]]:
    if isinstance(records, dict):
        records = [records]
    if not isinstance(records, list):
        raise DataError(f"expected a JSON list of records, got {type(records).__name__}", where=str(file))
    for i, record in enumerate(records):
        yield f"{file}[{i}]", record


def iter_json_records(file: Path) -> Iterator[tuple[str, object]]:
    """Yield (where, record) for each record of a .json list or a .jsonl file.

    Both are read as UTF-8 (a byte that is not is an error at its line; a BOM is dropped).
    What is unambiguous is accepted: a `.jsonl` file that is one JSON array (its first
    non-blank line starts with `[`, which no JSON-lines record does), and a `.json` file
    holding JSON lines (one document per line, which a single JSON value cannot be).
    """
    if file.suffix == ".jsonl":
        lines = _lines(file)
        for number, line in lines:
            if not line.strip():
                continue
            if line.lstrip().startswith("["):  # a JSON array of records saved as .jsonl?
                text = "\n" * (number - 1) + line + "".join(rest for _, rest in lines)
                try:
                    records = json.loads(text)
                except json.JSONDecodeError:
                    records = None
                if isinstance(records, list) and all(isinstance(r, dict) for r in records):
                    yield from _array_records(file, records)
                    return
                lines = enumerate(text.splitlines(True), 1)
                yield from _jsonl_records(file, lines, hint="this .jsonl file starts with '[': if it is one JSON "
                                          "array of records, rename it to .json")
                return
            yield from _jsonl_records(file, chain([(number, line)], lines))
            return
        return
    text = _read_text(file)
    try:
        records = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg != "Extra data":
            raise DataError(f"malformed JSON ({exc.msg})", where=f"{file}:{exc.lineno}") from None
        # several JSON documents: JSON lines in a .json file
        yield from _jsonl_records(file, enumerate(text.splitlines(), 1),
                                  hint="a .json file holds one JSON value; if this is JSON lines, rename it to .jsonl")
        return
    yield from _array_records(file, records)


def _field(record: dict, name: str, columns: dict, where: str, *, required=True, kind=str):
    key = columns.get(name, name)
    if key not in record or record[key] is None:
        if required:
            have = ", ".join(sorted(map(str, record))) or "nothing"
            raise DataError(f"missing field '{key}' (record has: {have})", where=where,
                            hint=f"map your field with columns: {{{name}: <your field>}}")
        return None
    value = record[key]
    if not isinstance(value, kind):
        raise DataError(f"field '{key}' must be a {kind.__name__}, got {type(value).__name__}", where=where)
    return value


def _checked(messages: list[Message], where: str) -> list[Message]:
    if not messages:
        raise DataError("empty conversation", where=where)
    if not any(m.trained for m in messages):
        raise DataError("conversation has no assistant turn (nothing to train on)", where=where,
                        hint='add an assistant message or mark a message with "loss": true')
    return messages


def _alpaca(record, columns, system, where) -> Sample:
    instruction = _field(record, "instruction", columns, where)
    extra = _field(record, "input", columns, where, required=False)
    output = _field(record, "output", columns, where)
    sys_text = _field(record, "system", columns, where, required=False) or system
    user = f"{instruction}\n{extra}" if extra else instruction
    messages = [Message("system", sys_text)] if sys_text else []
    messages += [Message("user", user), Message("assistant", output)]
    return Sample(messages=messages)


def _openai(record, columns, system, where) -> Sample:
    raw = _field(record, "messages", columns, where, kind=list)
    messages = [Message("system", system)] if system and not (raw and isinstance(raw[0], dict) and raw[0].get("role") == "system") else []
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise DataError(f"message {i} must be an object, got {type(item).__name__}", where=where)
        role = item.get("role")
        if role not in ROLES:
            raise DataError(f"message {i}: unknown role {role!r} (expected one of {', '.join(ROLES)})", where=where)
        content = item.get("content")
        if not isinstance(content, str):
            raise DataError(f"message {i}: 'content' must be a string, got {type(content).__name__}", where=where)
        loss = item.get("loss")
        if loss is not None and not isinstance(loss, bool):
            raise DataError(f"message {i}: 'loss' must be true or false", where=where)
        messages.append(Message(role, content, loss))
    return Sample(messages=_checked(messages, where))


SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def _sharegpt(record, columns, system, where) -> Sample:
    raw = _field(record, "conversations", columns, where, kind=list)
    messages = [Message("system", system)] if system else []
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise DataError(f"turn {i} must be an object, got {type(item).__name__}", where=where)
        speaker = item.get("from")
        if speaker not in SHAREGPT_ROLES:
            raise DataError(f"turn {i}: unknown speaker {speaker!r} (expected system, human or gpt)", where=where)
        value = item.get("value")
        if not isinstance(value, str):
            raise DataError(f"turn {i}: 'value' must be a string, got {type(value).__name__}", where=where)
        messages.append(Message(SHAREGPT_ROLES[speaker], value))
    return Sample(messages=_checked(messages, where))


def _xtuner(record, columns, system, where) -> Sample:
    raw = _field(record, "conversation", columns, where, kind=list)
    messages = []
    for i, turn in enumerate(raw):
        if not isinstance(turn, dict):
            raise DataError(f"turn {i} must be an object, got {type(turn).__name__}", where=where)
        sys_text = turn.get("system") or (system if i == 0 else None)
        if sys_text:
            messages.append(Message("system", sys_text))
        for key, role in (("input", "user"), ("output", "assistant")):
            value = turn.get(key)
            if not isinstance(value, str):
                raise DataError(f"turn {i}: missing or non-string '{key}'", where=where)
            messages.append(Message(role, value))
    return Sample(messages=_checked(messages, where))


def _text(record, columns, system, where) -> Sample:
    text = _field(record, "text", columns, where)
    if not text:
        raise DataError("empty text", where=where)
    return Sample(text=text)


PARSERS = {"alpaca": _alpaca, "openai": _openai, "sharegpt": _sharegpt, "xtuner": _xtuner, "text": _text}


def conversation_issues(messages: list[Message]) -> list[str]:
    """What is odd about a conversation that still trains: `empty_turns` (a message with no
    text) and `roles_out_of_order` (a system message after the first turn, two user or two
    assistant messages in a row, or an assistant speaking first)."""
    found = []
    if any(not m.content.strip() for m in messages):
        found.append("empty_turns")
    turns = [m.role for m in messages]
    first = next((i for i, role in enumerate(turns) if role != "system"), len(turns))
    body = turns[first:]
    if ("system" in body or (body and body[0] == "assistant")
            or any(a == b for a, b in zip(body, body[1:]))):
        found.append("roles_out_of_order")
    return found


ISSUE_TEXT = {"empty_turns": "conversations with an empty turn",
              "roles_out_of_order": "conversations with roles out of order"}


def read_samples(path: str | Path, fmt: str, columns: dict | None = None, system: str | None = None,
                 issues: dict | None = None) -> list[Sample]:
    """All samples of one dataset entry, in file order; any bad record raises DataError.

    Conversations that train but look wrong are counted in `issues` (when given) as
    `{kind: [count, where of the first]}`, kinds as in `conversation_issues`.
    """
    if fmt == "internevo":
        raise DataError("format internevo holds token ids, not records",
                        hint="it is read by tuneforge.data.internevo.read_internevo")
    if fmt not in PARSERS:
        raise DataError(f"unknown format {fmt!r} (expected one of {', '.join(PARSERS)})")
    parse = PARSERS[fmt]
    columns = columns or {}
    samples = []
    for file in data_files(path):
        for where, record in iter_json_records(file):
            if not isinstance(record, dict):
                raise DataError(f"expected a JSON object per record, got {type(record).__name__}", where=where)
            sample = parse(record, columns, system, where)
            if issues is not None and sample.messages is not None:
                for kind in conversation_issues(sample.messages):
                    issues.setdefault(kind, [0, where])[0] += 1
            samples.append(sample)
    return samples
