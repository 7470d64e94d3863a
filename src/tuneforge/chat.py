"""`tuneforge chat`: talk to a model folder, a run or a checkpoint (optionally with a LoRA adapter).

Uses the same template code as training: `--template`, else the template the run trained
with (recorded in `tuneforge.json` beside the weights, see `model.run_template`), else the
tokenizer's own. Stops at the template's end-of-turn token. With `--prompt` it prints one
answer and exits; otherwise it is a REPL (`/reset` clears the history, `/exit` or Ctrl-D quits).
"""

from __future__ import annotations

import sys


def load_for_chat(model_dir: str, adapter: str | None, template: str | None = None):
    """(model, tokenizer, template name) for a MODEL_DIR|RUN_DIR|CKPT and optional adapter."""
    from tuneforge.model.source import load_for_inference, resolve_source

    source = resolve_source(model_dir, adapter, template)
    model, tokenizer = load_for_inference(source)
    check_template(source.template, tokenizer, str(source.tokenizer))
    return model, tokenizer, source.template


def check_template(name: str, tokenizer, folder: str) -> None:
    """The template exists and fits the tokenizer; errors name `--template`, chat's own option."""
    from tuneforge.data.templates import NAMED_TEMPLATES, get_template
    from tuneforge.errors import ConfigError, UserError

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
    model, tokenizer, template = load_for_chat(args.model_dir, args.adapter, args.template)
    system = [Message("system", args.system)] if args.system else []
    if args.prompt is not None:
        print(generate_reply(model, tokenizer, template, system + [Message("user", args.prompt)], args.max_new_tokens))
        return 0
    history: list[Message] = []
    print(f"chat ({template} template): /reset clears the history, /exit quits", file=sys.stderr)
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
