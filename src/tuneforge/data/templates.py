"""Chat templates: turning a conversation into text pieces marked trained or not.

Owns the named prompt formats (`chatml`/`qwen_chat`, `internlm2_chat`, `llama3_chat`,
`llama2_chat`, `mistral`, `default`) and `template: tokenizer`, which renders with the
tokenizer's own Jinja chat template. Every template returns `segments`: a list of
`(text, trained)` pieces whose concatenation is the full prompt string; a trained piece is
the content of a trained message plus the end-of-turn token that closes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from tuneforge.data.records import Message, Sample
from tuneforge.errors import ConfigError, DataError, did_you_mean

Segments = list[tuple[str, bool]]


@dataclass(frozen=True)
class NamedTemplate:
    """A prompt format written out as strings; `{bos}`/`{eos}` are the tokenizer's tokens."""

    name: str
    begin: str  # once at the start of every sample
    system: Optional[str]  # a system turn with {content}; None = folded into the first user turn
    user: str  # a user turn with {content}
    assistant_head: str  # untrained text before assistant content (the generation prompt)
    assistant_end: str  # trained end-of-turn after the content
    after_assistant: str = ""  # untrained separator after the end-of-turn
    fold_system: str = "{system}\n\n{user}"  # how a system prompt joins the first user turn
    strip: bool = False  # the official template trims message content
    stop: str = "{eos}"  # the string generation stops at

    def special(self, tokenizer) -> dict:
        return {"bos": tokenizer.bos_token or "", "eos": tokenizer.eos_token or ""}

    def render(self, messages: list[Message], tokenizer, add_generation_prompt: bool = False) -> Segments:
        tok = self.special(tokenizer)
        out: Segments = [(self.begin.format(**tok), False)] if self.begin else []
        pending_system = None
        for message in messages:
            content = message.content
            if message.role == "system" and self.system is None:
                pending_system = content
                continue
            if message.role == "user" and pending_system is not None:
                content = self.fold_system.format(system=pending_system, user=content)
                pending_system = None
            content = content.strip() if self.strip else content
            if message.role == "system":
                _put(out, self.system.format(content="\0", **tok), content, message.loss is True)
            elif message.role == "user":
                _put(out, self.user.format(content="\0", **tok), content, message.loss is True)
            else:
                trained = message.trained
                out.append((self.assistant_head.format(**tok), False))
                out.append((content + self.assistant_end.format(**tok), trained))
                if self.after_assistant:
                    out.append((self.after_assistant.format(**tok), False))
        if add_generation_prompt:
            out.append((self.assistant_head.format(**tok), False))
        return [(text, trained) for text, trained in out if text]

    def stop_strings(self, tokenizer) -> list[str]:
        return [s for s in {self.assistant_end.format(**self.special(tokenizer)).strip(), self.stop.format(**self.special(tokenizer))} if s]


def _put(out: Segments, shell: str, content: str, trained: bool) -> None:
    head, tail = shell.split("\0")
    out.append((head, False))
    out.append((content, trained))
    out.append((tail, False))


CHATML = dict(
    system="<|im_start|>system\n{content}<|im_end|>\n",
    user="<|im_start|>user\n{content}<|im_end|>\n",
    assistant_head="<|im_start|>assistant\n",
    assistant_end="<|im_end|>",
    after_assistant="\n",
    stop="<|im_end|>",
)

NAMED_TEMPLATES = {
    "chatml": NamedTemplate("chatml", begin="", **CHATML),
    "qwen_chat": NamedTemplate("qwen_chat", begin="", **CHATML),
    "internlm2_chat": NamedTemplate("internlm2_chat", begin="{bos}", **CHATML),
    "llama3_chat": NamedTemplate(
        "llama3_chat",
        begin="{bos}",
        system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
        user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>",
        assistant_head="<|start_header_id|>assistant<|end_header_id|>\n\n",
        assistant_end="<|eot_id|>",
        strip=True,
        stop="<|eot_id|>",
    ),
    "llama2_chat": NamedTemplate(
        "llama2_chat",
        begin="",
        system=None,
        user="{bos}[INST] {content} [/INST]",
        assistant_head=" ",
        assistant_end=" {eos}",
        fold_system="<<SYS>>\n{system}\n<</SYS>>\n\n{user}",
        strip=True,
    ),
    "mistral": NamedTemplate(
        "mistral",
        begin="{bos}",
        system=None,
        user="[INST] {content} [/INST]",
        assistant_head="",
        assistant_end="{eos}",
    ),
    "default": NamedTemplate(
        "default",
        begin="",
        system="<|System|>:{content}\n",
        user="<|User|>:{content}\n",
        assistant_head="<|Bot|>:",
        assistant_end="{eos}",
        after_assistant="\n",
    ),
}


class TokenizerTemplate:
    """`template: tokenizer`: the tokenizer's own Jinja template, with masks found by prefixes.

    The text of message i is what rendering messages[:i+1] adds to rendering messages[:i];
    an assistant turn's trained span starts after the generation prompt and ends with its
    end-of-turn token (trailing whitespace the template adds after it is not trained); for
    another message marked `"loss": true` only its content is trained.
    """

    name = "tokenizer"

    def __init__(self, tokenizer):
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError("data.template is 'tokenizer' but the tokenizer has no chat template",
                              hint=f"pick a named template: {', '.join(NAMED_TEMPLATES)}")
        self.tokenizer = tokenizer

    def _text(self, messages, generation_prompt=False) -> str:
        if not messages:
            return ""
        rows = [{"role": m.role, "content": m.content} for m in messages]
        return self.tokenizer.apply_chat_template(rows, tokenize=False, add_generation_prompt=generation_prompt)

    def render(self, messages: list[Message], tokenizer=None, add_generation_prompt: bool = False) -> Segments:
        full = self._text(messages, add_generation_prompt)
        spans = []
        done = ""
        for i, message in enumerate(messages):
            upto = self._text(messages[: i + 1])
            if not full.startswith(upto) or not upto.startswith(done):
                raise DataError("the tokenizer's chat template does not render conversations prefix by prefix, "
                                "so trained spans cannot be located", hint="use a named data.template")
            if message.trained:
                if message.role == "assistant":  # content and the end-of-turn that closes it
                    start, end = len(self._text(messages[:i], True)), len(upto.rstrip())
                else:  # only the content of a non-assistant message marked "loss": true
                    start = upto.find(message.content, len(done))
                    end = start + len(message.content) if start >= 0 else start
                if end > start:
                    spans.append((start, end))
            done = upto
        segments: Segments = []
        cursor = 0
        for start, end in spans:
            segments += [(full[cursor:start], False), (full[start:end], True)]
            cursor = end
        segments.append((full[cursor:], False))
        return [(text, trained) for text, trained in segments if text]

    def stop_strings(self, tokenizer) -> list[str]:
        return [tokenizer.eos_token] if tokenizer.eos_token else []


def get_template(name: str, tokenizer):
    """The template object for `data.template` (checked against the tokenizer's vocabulary)."""
    if name == "tokenizer":
        return TokenizerTemplate(tokenizer)
    if name not in NAMED_TEMPLATES:
        raise ConfigError(f"data.template: unknown template {name!r}", hint=did_you_mean(name, ["tokenizer", *NAMED_TEMPLATES])
                          or f"choose tokenizer or one of {', '.join(NAMED_TEMPLATES)}")
    template = NAMED_TEMPLATES[name]
    for marker in ("<|im_start|>", "<|im_end|>", "<|eot_id|>", "<|start_header_id|>"):
        uses = marker in (template.user + template.assistant_end)
        if uses and len(tokenizer.encode(marker, add_special_tokens=False)) != 1:
            raise ConfigError(f"data.template {name!r} needs the special token {marker} but the tokenizer splits it",
                              hint="use the template that matches the model, or data.template=tokenizer")
    return template


def render_sample(sample: Sample, template, tokenizer, add_bos_to_text: bool) -> Segments:
    """Segments for one sample: chat through the template, plain text fully trained."""
    if sample.text is not None:
        bos = tokenizer.bos_token if add_bos_to_text and tokenizer.bos_token else ""
        return [(bos, False), (sample.text + (tokenizer.eos_token or ""), True)] if bos else [(sample.text + (tokenizer.eos_token or ""), True)]
    return template.render(sample.messages, tokenizer)
