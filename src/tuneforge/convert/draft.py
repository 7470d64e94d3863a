"""The converted config being built: values read from the source, comments, and the YAML text.

`Source` wraps a `PyConfig` and remembers which of its settings a converter read (by the
identity of the dict that holds them, so a dict bound to two names counts once); `leftovers`
then lists every setting nobody read, with the reason a converter gives for it (what
tuneforge does instead). `Draft` collects the tuneforge keys with a short note on where each
came from, and renders them as YAML with those notes and the leftovers as comments.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import yaml

from tuneforge.convert.pyconfig import Opaque, PyConfig, Unknown

MISSING = object()
SECTIONS = ("model", "data", "train", "parallel")


def _parts(path: str) -> list:
    return [int(p[1:-1]) if p.startswith("[") else p for p in re.findall(r"\[\d+\]|[^.\[\]]+", path)]


class Source:
    """Read access to a parsed config that records what was read."""

    def __init__(self, config: PyConfig):
        self.config = config
        self.used: set[tuple[int, Any]] = set()
        self.touched: set[tuple[int, Any]] = set()
        self.unevaluated: list[tuple[str, Any, Any]] = []

    def _resolve(self, path: str):
        node, trail = self.config.values, []
        for part in _parts(path):
            ok = (isinstance(node, dict) and part in node) or \
                 (isinstance(node, (list, tuple)) and isinstance(part, int) and part < len(node))
            if not ok:
                return MISSING, trail
            trail.append((node, part))
            node = node[part]
        return node, trail

    def get(self, *paths: str, default=None):
        """The value at the first of `paths` that exists (else `default`); all found are marked read."""
        found = MISSING
        for path in paths:
            value, trail = self._resolve(path)
            if value is MISSING:
                continue
            for holder, key in trail[:-1]:
                self.touched.add((id(holder), key))
            self.used.add((id(trail[-1][0]), trail[-1][1]))
            name = self.config.aliases.get((id(trail[-1][0]), trail[-1][1]))
            if name is not None:  # `lr=lr`: the PART 1 name was read too
                self.used.add((id(self.config.values), name))
            if found is MISSING:
                found = value
        return default if found is MISSING else found

    def number(self, *paths: str, default, cast=int):
        """`get` for a number: a value the reader could not evaluate (a call, an unknown name)
        is remembered for `unevaluated_notes` and `default` is used instead."""
        value = self.get(*paths, default=default)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.unevaluated.append((paths[0], value, default))
            return default
        return cast(value)

    def unevaluated_notes(self) -> list[str]:
        return [f"Not evaluated: {path} = {show(value)} (needs running the file); {default} was used: check it"
                for path, value, default in self.unevaluated]

    def has(self, path: str) -> bool:
        return self._resolve(path)[0] is not MISSING

    def leftovers(self, reason: Callable[[str, Any], str | None]) -> list[tuple[str, Any, str]]:
        """(path, value, why) for every setting not read; `reason(path, value)` explains a path
        (list indices written `[]`), None to look inside a dict/list or use a generic reason."""
        out: list[tuple[str, Any, str]] = []
        seen: set[int] = set()

        def walk(path: str, holder, key, value):
            ident = (id(holder), key)
            if ident in self.used:
                return
            if isinstance(value, (dict, list, tuple)):
                if id(value) in seen:
                    return
                seen.add(id(value))
            why = None if ident in self.touched else reason(re.sub(r"\[\d+\]", "[]", path), value)
            if why is None and isinstance(value, dict) and value:
                for k, v in value.items():
                    walk(f"{path}.{k}", value, k, v)
            elif why is None and isinstance(value, (list, tuple)) and any(isinstance(v, dict) for v in value):
                for i, v in enumerate(value):
                    walk(f"{path}[{i}]", value, i, v)
            else:
                out.append((path, value, why or "not read by tuneforge (no equivalent setting)"))

        for name, value in self.config.settings():
            walk(name, self.config.values, name, value)
        return out


def match_reason(table: list[tuple[str, str]], path: str, value=None) -> str | None:
    """The reason of the first `fnmatch` pattern in `table` that matches `path`, or for an
    imported name, `path=Name` (e.g. `*.type=ConcatDataset`)."""
    names = [path] + ([f"{path}={value.leaf}"] if isinstance(value, Opaque) else [])
    for pattern, why in table:
        if any(fnmatch.fnmatchcase(name, pattern) for name in names):
            return why
    return None


def show(value, limit: int = 70) -> str:
    """A value as the source wrote it, shortened for a comment."""
    if isinstance(value, (Opaque, Unknown)):
        text = str(value)
    elif isinstance(value, dict):
        text = "dict(" + ", ".join(f"{k}={show(v, limit)}" for k, v in value.items()) + ")"
    elif isinstance(value, (list, tuple)):
        inner = ", ".join(show(v, limit) for v in value)
        text = f"[{inner}]" if isinstance(value, list) else f"({inner}{',' if len(value) == 1 else ''})"
    else:
        text = repr(value)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass
class Draft:
    """tuneforge keys with their provenance notes, plus header lines and unmapped settings."""

    source_name: str
    kind: str  # "XTuner" | "InternEvo"
    values: dict[str, dict[str, Any]] = field(default_factory=lambda: {s: {} for s in SECTIONS})
    notes: dict[tuple[str, str], str] = field(default_factory=dict)
    header: list[str] = field(default_factory=list)
    summary: list[str] = field(default_factory=list)  # also printed by the verb
    unmapped: list[tuple[str, Any, str]] = field(default_factory=list)

    def set(self, section: str, key: str, value, note: str | None = None) -> None:
        self.values[section][key] = value
        if note:
            self.notes[(section, key)] = note

    def tree(self) -> dict:
        return {s: dict(v) for s, v in self.values.items() if v}

    def render(self) -> str:
        lines = [f"# Converted by `tuneforge convert-config` from the {self.kind} config {self.source_name}."]
        lines += [f"# {line}" if line else "#" for line in self.header + self.summary]
        for section in SECTIONS:
            entries = self.values[section]
            if not entries:
                continue
            lines.append(f"{section}:")
            for key, value in entries.items():
                note = self.notes.get((section, key))
                if key == "datasets" and value:
                    lines.append(f"  {key}:" + (f"  # {note}" if note else ""))
                    lines += [f"    - {_flow(item)}" for item in value]
                    continue
                text = f"  {key}: {_flow(value)}"
                lines.append(f"{text:<40} # {note}" if note else text)
        if self.unmapped:
            lines += ["", f"# Settings of {self.source_name} with no tuneforge equivalent (what tuneforge does instead):"]
            lines += [f"#   {path} = {show(value)}: {why}" for path, value, why in self.unmapped]
        return "\n".join(lines) + "\n"


def _flow(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=1_000_000, allow_unicode=True,
                          sort_keys=False).strip().removesuffix("...").strip()
