"""Batched greedy generation (tuneforge eval) vs one-by-one `generate`, on real GSM8K questions.

    python benchmarks/eval_speed.py [--model .cache/smollm2-135m-instruct] [--samples 32] [--batch-size 8]
                                    [--max-new-tokens 192] [--write-heldout FILE.jsonl --heldout-count 100]

Questions: lines of ../shared/data/gsm8k_train.jsonl that are NOT in the demo's training excerpt
(src/tuneforge/demo/gsm8k_excerpt.jsonl), the first `--samples` of them in file order. The model
is loaded as `tuneforge eval` loads it (fp32 on the CPU, SDPA) and prompted with the `chatml`
template the demo recipe trains with. Both ways decode greedily with the KV cache and stop at
`<|im_end|>`: one-by-one runs `generate_batch` with batch 1 (one `model.generate` per prompt,
no padding), batched runs it with `--batch-size` (left-padded rows). Reported: samples/s and
generated tokens/s of each, their ratio, and how many answers differ (fp32 batched and unbatched
matmuls can round differently, so a near-tie may flip a token; the test suite checks exact
equality on a tiny model). `--write-heldout` also writes `--heldout-count` held-out questions as
a JSONL file for `tuneforge eval --metric gsm8k`. Writes benchmarks/results/eval_speed.json.
Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GSM8K = ROOT.parent / "shared" / "data" / "gsm8k_train.jsonl"
EXCERPT = ROOT / "src" / "tuneforge" / "demo" / "gsm8k_excerpt.jsonl"


def held_out(count: int) -> list[dict]:
    trained = {json.loads(line)["question"] for line in EXCERPT.read_text().splitlines() if line.strip()}
    out = []
    with GSM8K.open() as handle:
        for line in handle:
            record = json.loads(line)
            if record["question"] not in trained:
                out.append(record)
                if len(out) == count:
                    break
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / ".cache" / "smollm2-135m-instruct"))
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=192)
    parser.add_argument("--write-heldout", metavar="FILE.jsonl")
    parser.add_argument("--heldout-count", type=int, default=100)
    args = parser.parse_args()
    if not GSM8K.is_file():
        print(f"needs {GSM8K}", file=sys.stderr)
        return 2
    if args.write_heldout:
        rows = held_out(args.heldout_count)
        Path(args.write_heldout).write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"wrote {len(rows)} held-out questions to {args.write_heldout}")

    import torch
    from tqdm.auto import tqdm

    from tuneforge.data.records import Message
    from tuneforge.eval.metrics import Scorer
    from tuneforge.generate import generate_batch, prompt_ids, stop_token_ids
    from tuneforge.model.source import load_for_inference, resolve_source
    from tuneforge.quiet import quiet_libraries

    quiet_libraries()
    model, tokenizer = load_for_inference(resolve_source(args.model, template="chatml"), device="cpu")
    records = held_out(args.samples)
    prompts = [prompt_ids(tokenizer, "chatml", [Message("user", r["question"])]) for r in records]
    stops = stop_token_ids(tokenizer, "chatml")
    results = {}
    outputs = {}
    for name, batch in (("one_by_one", 1), ("batched", args.batch_size)):
        started = time.perf_counter()
        with tqdm(total=len(prompts), desc=name, unit="sample", file=sys.stderr) as bar:
            outputs[name] = generate_batch(model, prompts, stops, tokenizer.pad_token_id, args.max_new_tokens,
                                           batch_size=batch, progress=bar.update)
        seconds = time.perf_counter() - started
        tokens = sum(len(o) for o in outputs[name])
        results[name] = {"batch_size": batch, "seconds": seconds, "samples_per_s": len(prompts) / seconds,
                         "tokens_per_s": tokens / seconds, "generated_tokens": tokens}
        print(f"{name:>10}: {len(prompts)} samples in {seconds:.1f}s = {len(prompts) / seconds:.3f} samples/s, "
              f"{tokens / seconds:.1f} tokens/s", flush=True)
    differ = sum(a != b for a, b in zip(outputs["one_by_one"], outputs["batched"]))
    scorer = Scorer("gsm8k")
    correct = {name: sum(scorer.score(tokenizer.decode(o), r["answer"])[2] for o, r in zip(outs, records))
               for name, outs in outputs.items()}
    ratio = results["batched"]["samples_per_s"] / results["one_by_one"]["samples_per_s"]
    summary = {"model": Path(args.model).name, "samples": len(prompts), "max_new_tokens": args.max_new_tokens,
               "torch_threads": torch.get_num_threads(), **results, "samples_per_s_ratio": ratio,
               "answers_differing": differ, "gsm8k_correct": correct}
    print(f"batched / one-by-one: {ratio:.2f}x samples/s; {differ} of {len(prompts)} answers differ; "
          f"gsm8k correct {correct}")
    out = ROOT / "benchmarks" / "results" / "eval_speed.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
