"""What `train` and `check-data` say about the data they built: one shared wording.

Owns the sample-count line (read, dropped, truncated), the list of files read per dataset,
and the warnings: more than `DROP_WARNING_FRACTION` of the samples dropped (with the reasons
counted), and conversations that train but look wrong (`records.conversation_issues`),
each with its count and the first file:line. Input is `build_data`'s report dict.
"""

from __future__ import annotations

import os

from tuneforge.data.records import ISSUE_TEXT

DROP_WARNING_FRACTION = 0.05
FILES_SHOWN = 10


def count_text(report: dict) -> str:
    """`64 samples read, 58 dropped, 0 truncated to data.max_length=64`."""
    return (f"{report['samples']:,} samples read, {report['dropped']:,} dropped, {report['truncated']:,} truncated "
            f"to data.max_length={report['max_length']}")


def files_lines(report: dict) -> list[str]:
    """One line per dataset: the files it was read from (a folder's files relative to it)."""
    lines = []
    for d in report["datasets"]:
        files = d.get("files") or []
        names = [os.path.relpath(f, d["path"]) if f != d["path"] else os.path.basename(f) for f in files]
        shown = ", ".join(names[:FILES_SHOWN]) + (f" and {len(names) - FILES_SHOWN} more" if len(names) > FILES_SHOWN else "")
        lines.append(f"  {d['path']}: {len(files)} file{'s' if len(files) != 1 else ''} read: {shown}")
    return lines


def _reasons(report: dict) -> str:
    totals: dict = {}
    for d in report["datasets"]:
        for kind, n in (d.get("drop_reasons") or {}).items():
            totals[kind] = totals.get(kind, 0) + n
    words = {"too_long": f"longer than data.max_length={report['max_length']}", "no_loss": "without trained tokens",
             "short": "shorter than the dataset's min_length"}
    return ", ".join(f"{n:,} {words.get(kind, kind)}" for kind, n in totals.items())


def warning_lines(report: dict) -> list[str]:
    """`warning: ...` lines: too many samples dropped, odd conversations."""
    out = []
    samples, dropped = report["samples"], report["dropped"]
    if samples and dropped > DROP_WARNING_FRACTION * samples:
        reasons = _reasons(report)
        out.append(f"warning: {dropped:,} of {samples:,} samples ({dropped / samples:.0%}) were dropped"
                   + (f" ({reasons})" if reasons else "")
                   + "; raise data.max_length, or use data.truncation: right to keep long samples cut")
    for d in report["datasets"]:
        for kind, (count, where) in sorted((d.get("issues") or {}).items()):
            out.append(f"warning: {count:,} {ISSUE_TEXT.get(kind, kind)} in {d['path']} (first at {where}); "
                       "they are trained as they are")
    return out


def summary_lines(report: dict) -> list[str]:
    """What `train` prints once the data is built: counts, files read, warnings."""
    head = (f"data: {count_text(report)}; {report['packs']:,} rows ({report['packing']} packing), "
            f"{report['tokens']:,} tokens, {report['loss_tokens']:,} trained")
    return [head, *files_lines(report), *warning_lines(report)]
