"""The shipped YAML recipes: listing them and copying one out to edit.

Each recipe is a `*.yaml` file in this folder whose first comment line is its summary.
Paths in a config are relative to its file, so `copy_recipe` rewrites every relative data or
model path that points at something shipped or present (the demo data) to an absolute path:
the copy then reads the same files from its new place. Placeholders that exist nowhere
(`models/internlm2-7b`) and `train.work_dir` stay relative to the copy, comments and layout
untouched.
"""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path

import yaml

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
    target.write_text(_with_absolute_paths(src.read_text(), src.parent))
    return target


def _path_nodes(root) -> list:
    """The YAML scalar nodes of model.path, data.cache_dir and every data (eval) dataset path."""
    def child(node, key):
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if k.value == key:
                    return v
        return None

    found = [child(child(root, "model"), "path"), child(child(root, "data"), "cache_dir")]
    data = child(root, "data")
    for name in ("datasets", "eval_datasets"):
        entries = child(data, name)
        for entry in entries.value if isinstance(entries, yaml.SequenceNode) else []:
            found.append(child(entry, "path"))
    return [n for n in found if isinstance(n, yaml.ScalarNode)]


def _with_absolute_paths(text: str, base: Path) -> str:
    """`text` with each relative path that exists from `base` made absolute (in place, as a quoted scalar)."""
    edits = []
    for node in _path_nodes(yaml.compose(text, Loader=yaml.SafeLoader)):
        value = node.value
        if value and not Path(value).expanduser().is_absolute() and (base / value).exists():
            edits.append((node.start_mark.index, node.end_mark.index, json.dumps(str((base / value).resolve()))))
    for start, end, new in sorted(edits, reverse=True):
        text = text[:start] + new + text[end:]
    return text
