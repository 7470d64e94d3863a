"""The configuration reference page, generated from the pydantic schema in `config.py`.

Each key's meaning lives once, as the `Field(description=...)` of its field; this module walks
`Config` and writes one table per section (nested sections such as `model.lora` and the entries
of `data.datasets` get their own). `python -m tuneforge.docs_reference > docs/configuration.md`
regenerates the page; a test fails when the committed page and the schema disagree.
"""

from __future__ import annotations

import sys
import typing

import yaml
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from tuneforge.config import Config, Section

HEADER = """# Configuration reference

<!-- Generated from src/tuneforge/config.py by `python -m tuneforge.docs_reference > docs/configuration.md`.
     Do not edit by hand: change the Field(description=...) in config.py and regenerate. -->

A config is a YAML file with four sections: `model`, `data`, `train` and `parallel`. Unknown keys
and wrong types are errors that name the file, the line and the key, with a "did you mean"
suggestion. Paths in the file are relative to the file; paths given on the command line are
relative to the working directory. Any key can be overridden on the command line with its dotted
name: `tuneforge train cfg.yaml train.lr=1e-4 data.max_length=4096` (a list entry by its index:
`data.datasets.0.weight=2`). `tuneforge train CFG --print-config` prints the resolved config.
"""


def type_name(annotation) -> str:
    """A field's type as a reader would write it in YAML."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " \\| ".join(str(a) for a in args)
    if origin is typing.Union:
        names = [type_name(a) for a in args if a is not type(None)]
        return " or ".join(names) + (" or null" if type(None) in args else "")
    if origin is list:
        return f"list of {type_name(args[0])}"
    if origin is dict:
        return "mapping"
    if isinstance(annotation, type) and issubclass(annotation, Section):
        return "section"
    return {str: "string", int: "integer", float: "number", bool: "boolean"}.get(annotation, str(annotation))


def default_text(field: FieldInfo) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "required"
    value = field.default_factory() if field.default_factory is not None else field.default
    if isinstance(value, Section):
        return "(section)"
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()
    return f"`{text}`"


def _section_class(annotation):
    """The Section class inside Optional[X] / list[X], if any."""
    if isinstance(annotation, type) and issubclass(annotation, Section):
        return annotation
    for arg in typing.get_args(annotation):
        found = _section_class(arg)
        if found is not None:
            return found
    return None


def section_table(prefix: str, cls: type[Section], intro: str | None = None
                  ) -> tuple[list[str], list[tuple[str, type[Section]]]]:
    """Markdown lines for one section (`intro`, else the class docstring, above its table), and
    the nested sections it refers to."""
    lines = [f"## `{prefix}`" if prefix.count(".") == 0 else f"### `{prefix}`", ""]
    doc = (intro or cls.__doc__ or "").strip()
    if doc:
        lines += [doc, ""]
    lines += ["| key | type | default | description |", "|---|---|---|---|"]
    nested = []
    for name, field in cls.model_fields.items():
        if not field.description:
            raise ValueError(f"{cls.__name__}.{name} has no Field(description=...)")
        sub = _section_class(field.annotation)
        kind = type_name(field.annotation)
        if sub is not None:
            is_list = typing.get_origin(field.annotation) is list
            child = f"{prefix}.{name}" + ("[]" if is_list else "")
            nested.append((child, sub))
            kind = f"list of [entries](#{_anchor(child)})" if is_list else f"[section](#{_anchor(child)})" + (
                " or null" if type(None) in typing.get_args(field.annotation) else "")
        description = field.description.replace("|", "\\|")
        lines.append(f"| `{name}` | {kind} | {default_text(field)} | {description} |")
    return lines + [""], nested


def _anchor(path: str) -> str:
    """The id MkDocs gives the heading `### `path``."""
    return "".join(c for c in path.lower() if c.isalnum() or c in "-_")


def render() -> str:
    out = [HEADER]
    for name, field in Config.model_fields.items():
        queue = [(name, _section_class(field.annotation), field.description)]
        while queue:
            prefix, cls, intro = queue.pop(0)
            lines, nested = section_table(prefix, cls, intro)
            out += lines
            queue += [(child, sub, None) for child, sub in nested]
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
