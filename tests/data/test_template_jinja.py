"""Each named template written as Jinja renders exactly what tuneforge's template code renders."""

import pytest

from tuneforge.data.records import Message
from tuneforge.data.template_jinja import to_jinja
from tuneforge.data.templates import NAMED_TEMPLATES

CONVERSATIONS = [
    [Message("user", "hi there "), Message("assistant", " hello\n")],
    [Message("system", "be brief"), Message("user", "q1"), Message("assistant", "a1"), Message("user", "q2")],
    [Message("user", "it's a \\ \"quoted\" {{ test }} {% raw %}\n\tline")],
    [Message("system", "sys"), Message("user", "a"), Message("assistant", "b"), Message("user", "c"), Message("assistant", "d")],
]


@pytest.mark.parametrize("name", sorted(NAMED_TEMPLATES))
@pytest.mark.parametrize("generation_prompt", [False, True])
def test_jinja_equals_named_template(tokenizer, name, generation_prompt):
    template = NAMED_TEMPLATES[name]
    jinja = to_jinja(template)
    for messages in CONVERSATIONS:
        want = "".join(piece for piece, _ in template.render(messages, tokenizer, add_generation_prompt=generation_prompt))
        got = tokenizer.apply_chat_template([{"role": m.role, "content": m.content} for m in messages],
                                            chat_template=jinja, tokenize=False, add_generation_prompt=generation_prompt)
        assert got == want
