"""The shipped YAML recipes: listing them and copying one out to edit.

Each recipe is a `*.yaml` file in this folder whose first comment line is its summary.
"""

from __future__ import annotations

import fnmatch
import shutil
from pathlib import Path

from tuneforge.errors import UserError, did_you_mean

RECIPES = Path(__file__).parent


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPES.glob("*.yaml"))


def recipe_path(name: str) -> Path:
    path = RECIPES / f"{Path(name).stem}.yaml"
    if not path.is_file():
        raise UserError(f"no shipped config named {name!r}",
                        hint=did_you_mean(name, recipe_names()) or "see `tuneforge list-configs`")
    return path


def summary(path: Path) -> str:
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def list_recipes(pattern: str | None = None) -> list[tuple[str, str]]:
    names = recipe_names()
    if pattern:
        names = [n for n in names if fnmatch.fnmatch(n, f"*{pattern}*")]
    return [(n, summary(RECIPES / f"{n}.yaml")) for n in names]


def copy_recipe(name: str, dest: str | Path) -> Path:
    src = recipe_path(name)
    target = Path(dest)
    if target.is_dir():
        target = target / src.name
    if target.exists():
        raise UserError(f"{target} already exists", hint="choose another destination")
    shutil.copyfile(src, target)
    return target
