"""`tuneforge convert-config`: an XTuner or InternEvo `.py` config as a tuneforge YAML.

Detects which of the two a file is, converts it (see `xtuner.py`, `internevo.py`), checks
that the YAML validates against the schema, and writes it to `-o OUT.yaml` (never over an
existing file unless `--force`) or prints it. The global batch, both ways, is printed too.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import yaml

from tuneforge.convert.common import GPUS_PER_NODE, deepspeed_name
from tuneforge.convert.draft import Draft, Source
from tuneforge.convert.pyconfig import read_py_config
from tuneforge.errors import ConfigError, UserError

XTUNER_NAMES = ("train_dataloader", "optim_wrapper", "train_dataset", "pretrained_model_name_or_path")
INTERNEVO_NAMES = ("hybrid_zero_optimizer", "adam", "ckpt")


def detect(names) -> str:
    """'xtuner' | 'internevo' for the names a config binds."""
    if any(n in names for n in XTUNER_NAMES):
        return "xtuner"
    if any(n in names for n in INTERNEVO_NAMES) or isinstance(names.get("data"), dict) and "seq_len" in names["data"]:
        return "internevo"
    raise ConfigError("neither an XTuner config (no train_dataloader / optim_wrapper) nor an InternEvo one "
                      "(no data=dict(seq_len=...) / hybrid_zero_optimizer)",
                      hint="convert-config reads XTuner (mmengine) and InternEvo .py configs")


def convert_file(path: str, gpus: int = GPUS_PER_NODE, deepspeed: str | None = None,
                 out_name: str = "OUT.yaml") -> Draft:
    """The draft (keys, notes, unmapped settings) for the config at `path`."""
    if gpus < 1:
        raise UserError(f"--gpus {gpus}: must be at least 1")
    config = read_py_config(path)
    kind = detect(config.values)
    src = Source(config)
    if kind == "xtuner":
        from tuneforge.convert.xtuner import convert_xtuner

        return convert_xtuner(src, gpus, deepspeed_name(deepspeed), out_name)
    from tuneforge.convert.internevo import convert_internevo

    return convert_internevo(src, gpus, deepspeed_name(deepspeed), out_name)


def validate(text: str) -> None:
    """The YAML must load as a tuneforge Config; a failure here is a converter bug."""
    from pydantic import ValidationError

    from tuneforge.config import Config

    try:
        Config.model_validate(yaml.safe_load(text))
    except ValidationError as exc:  # pragma: no cover - would be a bug in the converter
        raise RuntimeError(f"convert-config produced an invalid config: {exc.errors()[0]}") from exc


def run_convert(path: str, out: str | None, gpus: int | None, deepspeed: str | None, force: bool) -> int:
    if out is not None and Path(out).exists() and not force:
        raise UserError(f"{out} already exists", hint="choose another -o file, or add --force to replace it")
    if out is not None and Path(out).resolve() == Path(path).resolve():
        raise UserError(f"-o {out} is the config being converted", hint="choose another -o file")
    draft = convert_file(path, gpus or GPUS_PER_NODE, deepspeed, Path(out).name if out else "OUT.yaml")
    text = draft.render()
    validate(text)
    if out is None:
        sys.stdout.write(text)
        print("\n".join(draft.summary), file=sys.stderr)
        return 0
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=target.parent, prefix=f".{target.name}.", delete=False,
                                     encoding="utf-8") as tmp:
        tmp.write(text)
    os.replace(tmp.name, target)  # whole or absent, never half-written
    print("\n".join(draft.summary))
    print(f"wrote {out} ({len(draft.unmapped)} settings without an equivalent are listed at its end)")
    return 0
