"""The files `tuneforge eval --out FILE.json` writes, and reading them back for `--compare`.

`FILE.json` is the summary (model, adapter, template, data, metric, n, accuracy with its 95%
Wilson interval, loss/perplexity, tokens/s, time...); beside it `FILE.samples.jsonl` holds one
object per sample (index, prompt, reference, generation, extracted, expected, correct; or loss
and tokens for `--metric loss`). Both are written to a temporary name and renamed into place.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tuneforge.errors import UserError


def samples_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_suffix(".samples.jsonl") if out.suffix == ".json" else out.with_name(out.name + ".samples.jsonl")


def check_out(out: str | Path) -> None:
    parent = Path(out).resolve().parent
    if not parent.is_dir():
        raise UserError(f"--out {out}: folder {parent} does not exist", hint="create it first")
    if Path(out).is_dir():
        raise UserError(f"--out {out} is a folder", hint="name a .json file")


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)


def write_report(out: str | Path, summary: dict, records: list[dict]) -> tuple[Path, Path]:
    out = Path(out)
    lines = samples_path(out)
    summary = {**summary, "samples_file": lines.name}
    _atomic_write(lines, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    _atomic_write(out, json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
    return out, lines


def read_report(path: str | Path) -> tuple[dict, list[dict]]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--compare: {path} not found", hint="pass two files written by `tuneforge eval --out`")
    try:
        summary = json.loads(path.read_text())
        lines = path.parent / summary["samples_file"]
        records = [json.loads(line) for line in lines.read_text().splitlines() if line.strip()]
    except (ValueError, KeyError, TypeError, OSError) as exc:
        raise UserError(f"--compare: {path} is not a `tuneforge eval --out` summary with its samples file ({exc})") from None
    return summary, records
