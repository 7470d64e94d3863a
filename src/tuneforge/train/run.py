"""`tuneforge train`: prepare the work dir and the process context, then run the loop.

Owns the work-dir rules: a dir that already holds a run is refused unless `--resume`
(continue it, with a compatible config) or `--force` (start over, clearing its
checkpoints, metrics and final model).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import yaml

from tuneforge.errors import UserError

RUN_FILES = ("checkpoints", "final", "metrics.jsonl", "tensorboard")


def prepare_work_dir(cfg, work_dir: Path, resume: str | None, force: bool) -> None:
    """Check that `work_dir` may be used for this run, clearing it under --force."""
    saved = work_dir / "config.yaml"
    holds_run = saved.is_file() and any((work_dir / name).exists() for name in RUN_FILES)
    if resume is not None:
        if resume == "latest" and not (work_dir / "checkpoints").is_dir():
            raise UserError(f"--resume: {work_dir} holds no checkpoints", hint="start without --resume")
        if saved.is_file():
            old = yaml.safe_load(saved.read_text()) or {}
            for key in ("path", "lora"):
                was, now = (old.get("model") or {}).get(key), cfg.model.model_dump(mode="json")[key]
                if was != now:
                    raise UserError(f"--resume: model.{key} was {was!r} in {saved}, now {now!r}",
                                    hint="resume with the config the run started with, or use a new train.work_dir")
        return
    if holds_run and not force:
        raise UserError(f"{work_dir} already holds a run", hint="continue it with --resume, start over with --force, "
                        "or set train.work_dir")
    if holds_run and force:
        for name in RUN_FILES:
            path = work_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()


def run_train(cfg, args) -> int:
    from tuneforge.parallel.context import LocalContext
    from tuneforge.quiet import quiet_libraries
    from tuneforge.train.loop import train

    if args.work_dir:
        cfg.train.work_dir = args.work_dir
    if not cfg.data.datasets:
        raise UserError("data.datasets is empty", hint="add at least one {path, format} entry")
    work_dir = Path(cfg.train.work_dir)
    prepare_work_dir(cfg, work_dir, args.resume, args.force)
    work_dir.mkdir(parents=True, exist_ok=True)
    quiet_libraries()
    ctx = LocalContext()
    return train(cfg, resume=args.resume, work_dir=work_dir, ctx=ctx, log=lambda m: print(m, file=sys.stderr))
