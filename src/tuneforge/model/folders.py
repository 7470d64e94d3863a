"""Which model folder a path means: a run dir's `final/`, a checkpoint's `model/`, else the path.

A leaf module (no tuneforge imports), so that loading, LoRA and inference code can all ask.
"""

from __future__ import annotations

from pathlib import Path


def model_folder(path: Path) -> Path:
    """The model folder a path means: a run dir's final/, a checkpoint's model/, else the path."""
    if (path / "final").is_dir() and (path / "config.yaml").is_file():  # a run dir
        return path / "final"
    if (path / "model").is_dir() and (path / "state.json").is_file():  # a checkpoint
        return path / "model"
    return path
