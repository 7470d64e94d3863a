"""`tuneforge chat`: talk to a model folder (optionally with a LoRA adapter).

Uses the same template code as training (`--template`, default the tokenizer's own) and
stops at the template's end-of-turn token. With `--prompt` it prints one answer and exits;
otherwise it is a REPL (`/reset` clears the history, `/exit` or Ctrl-D quits).
"""

from __future__ import annotations

import sys
from pathlib import Path

from tuneforge.errors import UserError


def load_for_chat(model_dir: str, adapter: str | None):
    import torch

    from tuneforge.config import ModelConfig
    from tuneforge.model.load import load_model, load_tokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = "bfloat16" if device == "cuda" else "float32"
    model = load_model(ModelConfig(path=model_dir, dtype=dtype, attn_implementation="sdpa"), device=device)
    tokenizer_dir = adapter if adapter and (Path(adapter) / "tokenizer_config.json").is_file() else model_dir
    tokenizer = load_tokenizer(tokenizer_dir)
    if adapter:
        from peft import PeftModel

        if not (Path(adapter) / "adapter_config.json").is_file():
            raise UserError(f"{adapter} is not a LoRA adapter folder (no adapter_config.json)")
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    return model, tokenizer


def run_chat(args) -> int:
    from tuneforge.data.records import Message
    from tuneforge.generate import generate_reply
    from tuneforge.quiet import quiet_libraries

    quiet_libraries()
    model, tokenizer = load_for_chat(args.model_dir, args.adapter)
    template = args.template or "tokenizer"
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
