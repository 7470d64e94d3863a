"""A named template written as a Jinja chat template, so it travels with the model.

`to_jinja(template)` turns a `NamedTemplate` into the Jinja text that Hugging Face's
`apply_chat_template` (and llama.cpp, Ollama, vLLM...) render to exactly the string
`NamedTemplate.render` builds: same turns, same system-prompt folding, same trimming, the
generation prompt when asked. Every piece of output is a Jinja expression, so the result does
not depend on the engine's whitespace options (`trim_blocks`, `lstrip_blocks`).
"""

from __future__ import annotations

from string import Formatter

# the Jinja expression for each placeholder a NamedTemplate string may hold
_FIELDS = {"bos": "(bos_token or '')", "eos": "(eos_token or '')", "content": "content",
           "system": "ns.system", "user": "content"}


def _literal(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
    return f"'{escaped}'"


def _expr(fmt: str) -> str:
    """A Jinja expression producing `fmt.format(...)` with the placeholders as Jinja variables."""
    parts = []
    for literal, field, _, _ in Formatter().parse(fmt):
        if literal:
            parts.append(_literal(literal))
        if field is not None:
            parts.append(_FIELDS[field])
    return " + ".join(parts) or "''"


def _emit(fmt: str) -> str:
    return "{{- " + _expr(fmt) + " -}}" if fmt else ""


def to_jinja(template) -> str:
    """The Jinja chat template equivalent to the NamedTemplate `template`."""
    t = template
    assistant = _emit(t.assistant_head + "{content}" + t.assistant_end + t.after_assistant)
    out = ["{%- set ns = namespace(system=none) -%}", _emit(t.begin), "{%- for message in messages -%}",
           "{%- set content = message['content'] -%}"]
    if t.system is None:  # folded into the next user turn
        out += ["{%- if message['role'] == 'system' -%}{%- set ns.system = content -%}{%- else -%}",
                "{%- if message['role'] == 'user' and ns.system is not none -%}",
                "{%- set content = " + _expr(t.fold_system) + " -%}{%- set ns.system = none -%}{%- endif -%}"]
    if t.strip:
        out.append("{%- set content = content | trim -%}")
    if t.system is not None:
        out.append("{%- if message['role'] == 'system' -%}" + _emit(t.system) + "{%- elif message['role'] == 'user' -%}")
    else:
        out.append("{%- if message['role'] == 'user' -%}")
    out += [_emit(t.user), "{%- else -%}", assistant, "{%- endif -%}"]
    if t.system is None:
        out.append("{%- endif -%}")
    out += ["{%- endfor -%}", "{%- if add_generation_prompt -%}" + _emit(t.assistant_head) + "{%- endif -%}"]
    return "".join(out)
