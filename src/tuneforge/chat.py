"""`tuneforge chat`: talk to a model folder (optionally with a LoRA adapter).

Uses the same template code as training (`--template`, default the tokenizer's own) and
stops at the template's end-of-turn token. With `--prompt` it prints one answer and exits;
otherwise it is a REPL (`/reset` clears the history, `/exit` or Ctrl-D quits).
"""

from __future__ import annotations

import sys
from pathlib import Path

from tuneforge.errors import UserError


def load_for_chat(model_dir: str, adapter: str | None, template: str | None = None):
    """(model, tokenizer) for chatting; with `template`, that is checked before the model loads."""
    import torch

    from tuneforge.config import ModelConfig
    from tuneforge.model.load import load_model, load_tokenizer

    if adapter:
        from tuneforge.model.adapter_base import check_adapter_base

        if not (Path(adapter) / "adapter_config.json").is_file():
            raise UserError(f"{adapter} is not a LoRA adapter folder (no adapter_config.json)")
        check_adapter_base(model_dir, adapter, warn=lambda m: print(m, file=sys.stderr))
    tokenizer_dir = adapter if adapter and (Path(adapter) / "tokenizer_config.json").is_file() else model_dir
    if not Path(model_dir).is_dir():
        raise UserError(f"model folder not found: {model_dir}", hint="check the MODEL_DIR argument")
    tokenizer = load_tokenizer(tokenizer_dir)
    if template is not None:
        check_template(template, tokenizer, tokenizer_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = "bfloat16" if device == "cuda" else "float32"
    model = load_model(ModelConfig(path=model_dir, dtype=dtype, attn_implementation="sdpa"), device=device)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    return model, tokenizer


def check_template(name: str, tokenizer, folder: str) -> None:
    """The template exists and fits the tokenizer; errors name `--template`, chat's own option."""
    from tuneforge.data.templates import NAMED_TEMPLATES, get_template
    from tuneforge.errors import ConfigError

    if name == "tokenizer" and not getattr(tokenizer, "chat_template", None):
        raise UserError(f"the tokenizer in {folder} has no chat template",
                        hint=f"pass --template NAME, one of: {', '.join(NAMED_TEMPLATES)}")
    try:
        get_template(name, tokenizer)
    except ConfigError as exc:
        raise UserError(exc.message.replace("data.template", "--template"),
                        hint=(exc.hint or "").replace("data.template=", "--template ") or None) from None


def run_chat(args) -> int:
    from tuneforge.data.records import Message
    from tuneforge.generate import generate_reply
    from tuneforge.quiet import quiet_libraries

    quiet_libraries()
    template = args.template or "tokenizer"
    model, tokenizer = load_for_chat(args.model_dir, args.adapter, template)
    system = [Message("system", args.system)] if args.system else []
    if args.prompt is not None:
        print(generate_reply(model, tokenizer, template, system + [Message("user", args.prompt)], args.max_new_tokens))
        return 0
    history: list[Message] = []
    print("chat: /reset clears the history, /exit quits", file=sys.stderr)
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print()
            return 0
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            history = []
            continue
        if not line:
            continue
        history.append(Message("user", line))
        reply = generate_reply(model, tokenizer, template, system + history, args.max_new_tokens)
        history.append(Message("assistant", reply))
        print(f"bot> {reply}")
