"""The chat template a run trained with, travelling with everything the run writes.

A folder written by tuneforge (`final/`, a checkpoint's `model/`, `export` and `merge`
outputs) holds
- `chat_template.jinja`: the Jinja of the template training used (`data.template`: a named
  template as `tuneforge.data.template_jinja` writes it, or the tokenizer's own), so any
  Hugging Face / llama.cpp user of the folder prompts the model as it was trained;
- `tuneforge.json`: `{"template": NAME}`, so `chat`, `eval` and GGUF export know which named
  template that is, and use tuneforge's own template code for it.
`template_for` is the lookup `chat` and `eval` use when no `--template` is given.
"""

from __future__ import annotations

import json
from pathlib import Path

RUN_INFO = "tuneforge.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"


def template_jinja(template_name: str, tokenizer) -> str | None:
    """The Jinja text of `data.template` (None for a tokenizer without a chat template)."""
    from tuneforge.data.template_jinja import to_jinja
    from tuneforge.data.templates import NAMED_TEMPLATES

    if template_name in NAMED_TEMPLATES:
        return to_jinja(NAMED_TEMPLATES[template_name])
    return getattr(tokenizer, "chat_template", None) or None


def stamp_template(folder: str | Path, template_name: str, tokenizer) -> None:
    """Write `chat_template.jinja` (the training template) and `tuneforge.json` into `folder`."""
    folder = Path(folder)
    jinja = template_jinja(template_name, tokenizer)
    if jinja is not None:
        (folder / CHAT_TEMPLATE_FILE).write_text(jinja)
        config = folder / "tokenizer_config.json"  # an inline template would shadow the file
        if config.is_file():
            data = json.loads(config.read_text())
            if data.pop("chat_template", None) is not None:
                config.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    info = read_run_info(folder)
    info["template"] = template_name
    (folder / RUN_INFO).write_text(json.dumps(info, indent=1) + "\n")


def read_run_info(folder: str | Path) -> dict:
    path = Path(folder) / RUN_INFO
    if not path.is_file():
        return {}
    try:
        info = json.loads(path.read_text())
    except ValueError:
        return {}
    return info if isinstance(info, dict) else {}


def template_for(*folders) -> str:
    """The template recorded in the first of `folders` that has one, else "tokenizer"."""
    for folder in folders:
        if folder is not None:
            name = read_run_info(folder).get("template")
            if isinstance(name, str) and name:
                return name
    return "tokenizer"


def copy_run_info(source: str | Path, dest: str | Path) -> None:
    """Carry `tuneforge.json` over to a folder derived from `source` (merge, export)."""
    path = Path(source) / RUN_INFO
    if path.is_file():
        (Path(dest) / RUN_INFO).write_text(path.read_text())
