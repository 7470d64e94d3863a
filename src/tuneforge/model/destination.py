"""Where `export` and `merge` may write: the rules that keep a user's files safe.

`check_destination(out, sources, force)` runs before anything is loaded or written:
- a destination that is, contains, or lies inside a source folder or the training run a
  source belongs to (`RUN/` of `RUN/final` or `RUN/checkpoints/step_N`) is always refused:
  replacing it would delete what is being read, or the run itself;
- an existing destination that is a file or a non-empty folder is refused unless `force`
  (then it is replaced whole, atomically, by `export.atomic_dir`); an empty folder is used.
"""

from __future__ import annotations

from pathlib import Path

from tuneforge.errors import UserError

RUN_MARKERS = ("checkpoints", "final", "metrics.jsonl")


def run_dir_of(source: Path) -> Path | None:
    """The training run `source` belongs to (itself, its parent or grandparent), if any."""
    for folder in (source, *list(source.parents)[:2]):
        if (folder / "config.yaml").is_file() and any((folder / name).exists() for name in RUN_MARKERS):
            return folder
    return None


def _overlap(out: Path, protected: Path) -> str | None:
    if out == protected:
        return "is"
    if out.is_relative_to(protected):
        return "is inside"
    if protected.is_relative_to(out):
        return "contains"
    return None


def check_destination(out: str | Path, sources: list[str | Path], force: bool) -> Path:
    """Refuse an unsafe destination (see the module docstring); returns `out` made absolute."""
    target = Path(out).resolve()
    for source in sources:
        source = Path(source).resolve()
        run = run_dir_of(source)
        for protected, what in ((source, f"the source {source}"), (run, f"the run {run} of the source")):
            relation = _overlap(target, protected) if protected is not None else None
            if relation:
                raise UserError(f"destination {out} {relation} {what}", hint="write to a folder outside the source and its run")
    if target.exists() and not target.is_dir():
        if not force:
            raise UserError(f"destination {out} is an existing file", hint="choose another path, or --force to replace it")
    elif target.is_dir() and any(target.iterdir()) and not force:
        names = sorted(p.name for p in target.iterdir())
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        raise UserError(f"destination {out} is not empty ({shown})",
                        hint="choose a new or empty folder, or --force to replace it whole")
    return target
