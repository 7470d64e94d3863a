"""`tuneforge eval`: load a model as `chat` does, score it on a data file, report and save.

Arguments are checked (data readable, metric and pattern valid, `--out` writable) before the
model is loaded. A progress bar counts samples. The summary is printed (`--json`: as one JSON
object); `--out FILE.json` also writes it with the per-sample JSONL beside it
(`tuneforge.eval.report`). `--compare A.json B.json` compares two such files instead.
"""

from __future__ import annotations

import json
import sys
import time

from tuneforge.errors import UserError


def run_eval(args) -> int:
    if args.compare:
        from tuneforge.eval.compare import compare_reports, format_comparison

        if args.model:
            raise UserError("--compare takes two summaries and no model", hint="tuneforge eval --compare A.json B.json")
        result = compare_reports(*args.compare)
        print(json.dumps(result) if args.json else format_comparison(result, *args.compare))
        return 0
    if not args.model or not args.data:
        raise UserError("eval needs a model (MODEL_DIR, RUN_DIR or checkpoint) and --data FILE",
                        hint="tuneforge eval runs/my-run --data test.jsonl --metric gsm8k")
    for name in ("limit", "batch_size", "max_new_tokens", "max_length"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {value}")

    from tuneforge.eval.items import check_generation_items, parse_columns, read_items
    from tuneforge.eval.metrics import Scorer
    from tuneforge.eval.report import check_out, write_report
    from tuneforge.model.source import resolve_source

    scorer = Scorer(args.metric, args.pattern) if args.metric != "loss" else None
    items = read_items(args.data, args.format, parse_columns(args.columns), args.limit)
    if scorer is not None:
        check_generation_items(items, args.data)
    if args.out:
        check_out(args.out)
    source = resolve_source(args.model, args.adapter, args.template)

    from tqdm.auto import tqdm

    from tuneforge.data.templates import get_template
    from tuneforge.model.source import load_for_inference
    from tuneforge.quiet import quiet_libraries

    quiet_libraries()
    model, tokenizer = load_for_inference(source)
    get_template(source.template, tokenizer)  # a wrong --template fails before any work
    started = time.time()
    with tqdm(total=len(items), desc=f"eval {args.metric}", unit="sample", file=sys.stderr, dynamic_ncols=True,
              mininterval=0.5 if sys.stderr.isatty() else 10) as bar:
        if scorer is None:
            from tuneforge.eval.likelihood import likelihood

            per_item, result = likelihood(model, tokenizer, source.template, items, args.max_length,
                                          args.batch_size, progress=bar.update)
            records = [{"index": item.index, "prompt": item.prompt[-1].content if item.prompt else None,
                        "reference": item.reference, **(found or {"loss": None, "tokens": 0, "dropped": True})}
                       for item, found in zip(items, per_item)]
            result["n"] = sum(found is not None for found in per_item)
        else:
            from tuneforge.eval.generation import generate_and_score

            records, result = generate_and_score(model, tokenizer, source.template, items, scorer,
                                                 args.max_new_tokens, args.batch_size, progress=bar.update)
    summary = {"model": str(source.base), "adapter": str(source.adapter) if source.adapter else None,
               "template": source.template, "data": str(args.data), "format": args.format,
               "metric": args.metric, "pattern": args.pattern, "limit": args.limit, "n": result["n"],
               "accuracy": result.get("accuracy"), "ci95": result.get("ci95"),
               "loss": result.get("loss"), "perplexity": result.get("perplexity"),
               "tokens_per_s": result.get("tokens_per_s"), "samples_per_s": result.get("samples_per_s"),
               "time_s": time.time() - started, "batch_size": args.batch_size,
               "max_new_tokens": args.max_new_tokens if scorer is not None else None,
               **{k: result[k] for k in ("correct", "generated_tokens", "loss_tokens", "dropped", "truncated") if k in result}}
    print(json.dumps(summary) if args.json else _summary_line(summary))
    if args.out:
        out, lines = write_report(args.out, summary, records)
        print(f"wrote {out} and {lines}", file=sys.stderr)
    return 0


def _summary_line(s: dict) -> str:
    if s["metric"] == "loss":
        ppl = f", perplexity {s['perplexity']:.3f}" if s["perplexity"] is not None else ""
        dropped = f" ({s['dropped']} dropped: no answer token within --max-length)" if s.get("dropped") else ""
        return f"loss on {s['n']} samples{dropped}: {s['loss']:.4f}{ppl}; {s['time_s']:.1f}s"
    low, high = s["ci95"]
    speed = f", {s['tokens_per_s']:.1f} tokens/s" if s["tokens_per_s"] else ""
    return (f"{s['metric']}: {s['correct']}/{s['n']} correct, accuracy {s['accuracy']:.4f} "
            f"(95% CI {low:.4f}-{high:.4f}){speed}; {s['time_s']:.1f}s")
