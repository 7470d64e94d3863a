"""The `tuneforge` command line: argument parsing and error reporting, nothing heavy.

Every verb's work lives in its own module, imported only when that verb runs, so that
`tuneforge --help` starts without torch or transformers. A `UserError` becomes one line on
stderr and exit code 2; any other exception one line and exit code 1; `--debug` shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path


def _config(args):
    from tuneforge.config import load_config

    return load_config(args.config, args.overrides)


def _warn(message: str) -> None:
    print(message, file=sys.stderr)


def cmd_check_data(args) -> int:
    cfg = _config(args)
    if args.print_config:
        return _print_config(cfg)
    from tuneforge.preflight import check_before_loading  # before torch: a wrong path fails at once

    check_before_loading(cfg)
    from tuneforge.check_data import run_check_data

    return run_check_data(cfg, show=args.show, as_json=args.json)


def cmd_tokenize(args) -> int:
    from tuneforge.preflight import check_before_loading

    cfg = _config(args)
    check_before_loading(cfg)
    from tuneforge.data.export_internevo import run_tokenize

    return run_tokenize(cfg, args.out_dir)


def _print_config(cfg) -> int:
    from tuneforge.config import dump_config

    print(dump_config(cfg), end="")
    return 0


def cmd_train(args) -> int:
    cfg = _config(args)
    if args.work_dir:  # a command-line path: relative to the working directory
        cfg.train.work_dir = str(Path(args.work_dir).expanduser().resolve())
    if args.print_config:
        return _print_config(cfg)
    from tuneforge.preflight import check_before_loading  # before torch: a wrong path fails at once

    check_before_loading(cfg, training=True, warn=_warn)
    from tuneforge.train.run import run_train

    return run_train(cfg, args)


def cmd_chat(args) -> int:
    from tuneforge.chat import run_chat

    return run_chat(args)


def cmd_eval(args) -> int:
    from tuneforge.eval.run import run_eval

    return run_eval(args)


def cmd_export(args) -> int:
    from tuneforge.model.export import export_checkpoint
    from tuneforge.quiet import quiet_libraries

    quiet_libraries()
    if (args.format or ("gguf" if args.out_dir.endswith(".gguf") else "hf")) == "gguf":
        return _export_gguf(args)
    if args.quant is not None:
        from tuneforge.errors import UserError

        raise UserError("--quant is for GGUF files", hint="add --format gguf, or use --dtype for a Hugging Face folder")
    export_checkpoint(args.ckpt_dir, args.out_dir, merge_lora=args.merge_lora, dtype=args.dtype, force=args.force)
    print(f"wrote {args.out_dir}")
    return 0


def _export_gguf(args) -> int:
    from tuneforge.errors import UserError
    from tuneforge.model.gguf_export import export_gguf

    if args.dtype is not None:
        raise UserError("--dtype is for Hugging Face folders", hint="use --quant f32|f16|bf16|q8_0 with --format gguf")
    quant = args.quant or "f16"
    out = export_gguf(args.ckpt_dir, args.out_dir, quant=quant, merge_lora=args.merge_lora, force=args.force)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {quant})")
    return 0


def cmd_merge(args) -> int:
    from tuneforge.model.export import merge_adapter
    from tuneforge.quiet import quiet_libraries

    quiet_libraries()
    merge_adapter(args.base_dir, args.adapter_dir, args.out_dir, dtype=args.dtype, force=args.force)
    print(f"wrote {args.out_dir}")
    return 0


def cmd_import_gguf(args) -> int:
    from tuneforge.model.gguf_import import import_gguf
    from tuneforge.quiet import quiet_libraries

    quiet_libraries()
    import_gguf(args.file, args.out_dir)
    print(f"wrote {args.out_dir}")
    return 0


def cmd_plot(args) -> int:
    from tuneforge.train.plot import plot_run

    out = plot_run(args.run_dir, args.out)
    print(f"wrote {out}")
    return 0


def cmd_plan(args) -> int:
    from tuneforge.plan import run_plan

    return run_plan(_config(args), args.gpus, args.gpu_memory, args.json)


def cmd_list_configs(args) -> int:
    from tuneforge.recipes import list_recipes

    for name, summary in list_recipes(args.pattern):
        print(f"{name:<32} {summary}")
    return 0


def cmd_copy_config(args) -> int:
    from tuneforge.recipes import copy_recipe

    print(f"wrote {copy_recipe(args.name, args.dest)}")
    return 0


def cmd_convert_config(args) -> int:
    from tuneforge.convert.run import run_convert

    return run_convert(args.file, args.out, args.gpus, args.deepspeed, args.force)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tuneforge", description="Fine-tune causal language models, from one CPU to many GPUs.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")

    def verb(name, func, help_text):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks on errors")
        p.set_defaults(func=func)
        return p

    p = verb("train", cmd_train, "fine-tune a model as a config describes")
    p.add_argument("config", help="YAML config file")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    p.add_argument("--deepspeed", metavar="NAME|FILE.json", help="zero1|zero2|zero2_offload|zero3|zero3_offload or a JSON file")
    p.add_argument("--launcher", choices=["none", "pytorch", "slurm", "mpi"], default=None,
                   help="how processes were started: torchrun (pytorch), srun (slurm) or Open MPI's mpirun (mpi)")
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CKPT_DIR",
                   help="resume from the latest complete checkpoint, or from CKPT_DIR")
    p.add_argument("--work-dir", help="override train.work_dir")
    p.add_argument("--force", action="store_true", help="reuse a work dir that holds a different run")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")

    p = verb("check-data", cmd_check_data, "tokenize and pack the data as training would, and report on it")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value")
    p.add_argument("--show", type=int, default=0, metavar="N", help="print N rendered rows, trained tokens highlighted")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")

    p = verb("tokenize", cmd_tokenize, "write the config's datasets, tokenized, as an InternEvo train_folder: OUT_DIR/NAME/NAME.bin(.meta)")
    p.add_argument("config")
    p.add_argument("out_dir")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value")

    p = verb("chat", cmd_chat, "talk to a model (interactive, or one answer with --prompt)")
    p.add_argument("model_dir", help="a model folder, a run's work dir (its final/) or a checkpoint")
    p.add_argument("--adapter", help="a LoRA adapter folder to apply")
    p.add_argument("--template", default=None,
                   help="chat template name (default: the one the run trained with, else the tokenizer's)")
    p.add_argument("--prompt", help="answer this one prompt and exit")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--max-new-tokens", type=int, default=256)

    p = verb("eval", cmd_eval, "score a model, run or checkpoint on a data file (or --compare two results)")
    p.add_argument("model", nargs="?", help="a model folder, a run's work dir (its final/), a checkpoint or an adapter")
    p.add_argument("--adapter", help="a LoRA adapter folder to apply")
    p.add_argument("--data", help="records to score (.jsonl, .json or a folder)")
    p.add_argument("--format", default="alpaca", choices=["alpaca", "openai", "sharegpt", "xtuner", "text"])
    p.add_argument("--columns", metavar="OURS=YOURS,...", help="field mapping, e.g. instruction=question,output=answer")
    p.add_argument("--metric", default="loss", choices=["gsm8k", "exact", "regex", "contains", "loss"],
                   help="how an answer is scored (default loss: mean loss and perplexity of the references)")
    p.add_argument("--pattern", metavar="REGEX", help="--metric regex: the answer is the pattern's one group")
    p.add_argument("--template", default=None, help="chat template (default: the one the run trained with)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="score the first N records")
    p.add_argument("--batch-size", type=int, default=8, metavar="B")
    p.add_argument("--max-new-tokens", type=int, default=256, metavar="N")
    p.add_argument("--max-length", type=int, default=2048, metavar="N", help="--metric loss: tokens per record")
    p.add_argument("--out", metavar="FILE.json", help="write the summary here and the samples to FILE.samples.jsonl")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    p.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"), help="compare two --out summaries (paired test)")

    p = verb("export", cmd_export, "write a checkpoint as a plain Hugging Face model folder or a GGUF file")
    p.add_argument("ckpt_dir")
    p.add_argument("out_dir", metavar="OUT_DIR|OUT.gguf")
    p.add_argument("--merge-lora", action="store_true", help="merge a LoRA adapter into the base weights")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None)
    p.add_argument("--format", choices=["hf", "gguf"], default=None,
                   help="hf: a model folder; gguf: one file for llama.cpp / Ollama (default: gguf for OUT ending in .gguf)")
    p.add_argument("--quant", default=None, metavar="f32|f16|bf16|q8_0", help="GGUF tensor type (default f16)")
    p.add_argument("--force", action="store_true", help="replace an existing output (a non-empty OUT_DIR whole)")

    p = verb("merge", cmd_merge, "merge a LoRA adapter into its base model")
    p.add_argument("base_dir")
    p.add_argument("adapter_dir")
    p.add_argument("out_dir")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None)
    p.add_argument("--force", action="store_true", help="replace a non-empty OUT_DIR whole")

    p = verb("import-gguf", cmd_import_gguf, "turn a GGUF file into a trainable safetensors model folder")
    p.add_argument("file")
    p.add_argument("out_dir")

    p = verb("plot", cmd_plot, "plot loss, lr and tokens/s of a run")
    p.add_argument("run_dir")
    p.add_argument("--out", help="PNG file (default RUN_DIR/metrics.png)")

    p = verb("plan", cmd_plan, "estimate per-device memory and the smallest change that fits")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value")
    p.add_argument("--gpus", type=_positive_int, default=None, metavar="N", help="number of GPUs (default: one CPU process)")
    p.add_argument("--gpu-memory", type=_positive_number, default=None, metavar="GB", help="memory per device")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = verb("convert-config", cmd_convert_config, "turn an XTuner or InternEvo .py config into a tuneforge YAML")
    p.add_argument("file", help="the XTuner (mmengine) or InternEvo .py config; read, never executed")
    p.add_argument("-o", "--out", metavar="OUT.yaml", help="write here (default: print)")
    p.add_argument("--gpus", type=_positive_int, default=None, metavar="N", help="GPUs the global batch assumes (default 8)")
    p.add_argument("--deepspeed", metavar="NAME|FILE.json", help="XTuner's --deepspeed choice (deepspeed_zero2 ...)")
    p.add_argument("--force", action="store_true", help="replace an existing -o file")

    p = verb("list-configs", cmd_list_configs, "list the shipped recipes")
    p.add_argument("pattern", nargs="?", default=None)

    p = verb("copy-config", cmd_copy_config, "copy a shipped recipe to edit it")
    p.add_argument("name")
    p.add_argument("dest")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    for item in extra:  # overrides may come after options: `train cfg.yaml --resume a.b=1`
        if hasattr(args, "overrides") and "=" in item and not item.startswith("-"):
            args.overrides.append(item)
        else:
            parser.error(f"unrecognized argument: {item}")
    resume = getattr(args, "resume", None)
    if resume and "=" in resume and not os.path.exists(resume):  # `--resume key=value`: an override, not a dir
        args.overrides.append(resume)
        args.resume = "latest"
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    args.argv = list(sys.argv[1:] if argv is None else argv)  # `train` re-runs it under torchrun
    debug = args.debug or os.environ.get("TUNEFORGE_DEBUG") == "1"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded at run time
    if not os.path.exists("/proc/driver/nvidia"):  # no NVIDIA driver: tell DeepSpeed (imported by accelerate
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # when installed) instead of letting it warn that it guessed
    from tuneforge.errors import UserError

    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        if debug:
            raise
        _end_progress_bars()
        print(f"error: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:  # training's first Ctrl-C saves and returns 130 itself (train/stops.py)
        _end_progress_bars()
        print("interrupted: stopped at once, nothing more was saved", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - one line unless --debug
        if debug:
            raise
        _end_progress_bars()
        print(f"error: {type(exc).__name__}: {exc} (run with --debug for the traceback)", file=sys.stderr)
        return 1


def _end_progress_bars() -> None:
    """A training progress bar left mid-line would swallow the start of the error line."""
    progress = sys.modules.get("tuneforge.train.progress")
    if progress is not None:
        progress.close_open_bars()


if __name__ == "__main__":
    raise SystemExit(main())
